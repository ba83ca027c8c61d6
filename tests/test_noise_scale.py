"""The gradient noise scale of lars_tf.DistributedOptimizer against the closed form of a
problem with a known gradient covariance (tests/workers/noise_scale.py), in one process
with accumulation and on 2 ranks under loss scaling; and in lars-train's outputs."""

import numpy as np
import pytest

from lars_tf.testing import launcher, run_job

G2, TRACE, B_PASS = 4.0, 64.0, 8  # |mu|^2, d sigma^2 and b of the worker


def _check(rows: np.ndarray, updates_per_chunk: int) -> None:
    """Each chunk's mean estimates of |G|^2, tr(S) and B_simple are independent draws:
    their mean is within 4 standard errors of the closed form, and that error is small
    enough to tell a wrong estimator (the wrong number of gradients per update, or the
    accumulated gradients taken for per-pass ones) from the right one."""
    assert (rows[:, 2] == updates_per_chunk).all(), rows[:, 2]
    g2 = rows[:, 0] / rows[:, 2]
    trace = B_PASS * rows[:, 1] / rows[:, 2]
    b_simple = trace / g2
    for name, values, truth in (("|G|^2", g2, G2), ("tr(S)", trace, TRACE),
                                ("B_simple", b_simple, TRACE / G2)):
        mean, se = values.mean(), values.std(ddof=1) / np.sqrt(len(values))
        assert se < 0.1 * truth, (name, mean, se)
        assert abs(mean - truth) < 4 * se, (name, mean, truth, se)


@pytest.mark.multiprocess
def test_one_process_accumulating_4_passes_matches_the_closed_form(tmp_path):
    """One rank, 4 backward passes per update: the passes' gradients are the small
    batches (8 examples), their mean the large one (32)."""
    run_job(["python", "tests/workers/noise_scale.py", str(tmp_path), "4", "1"], timeout=180)
    _check(np.load(tmp_path / "rank0.npy"), updates_per_chunk=40)


@pytest.mark.multiprocess
def test_two_ranks_under_loss_scaling_match_the_closed_form_and_agree(tmp_path):
    """2 ranks x 2 passes, gradients scaled by 1024 (unscaled for the estimate): both
    ranks hold the same sums, which match the closed form."""
    out = run_job(launcher("gloo", 2) + ["python", "tests/workers/noise_scale.py",
                                         str(tmp_path), "2", "1024"], timeout=240).stdout
    assert "ranks 2" in out
    a, b = (np.load(tmp_path / f"rank{r}.npy") for r in range(2))
    np.testing.assert_array_equal(a, b)
    _check(a, updates_per_chunk=40)


def test_one_gradient_per_update_is_refused_naming_the_flag():
    import tensorflow as tf

    import lars_tf

    opt = lars_tf.DistributedOptimizer(tf.keras.optimizers.SGD(0.1), noise_scale_every=1)
    with pytest.raises(ValueError, match="--noise_scale_every=1: .*2\\+ ranks"):
        opt.build([tf.Variable([1.0])])
    with pytest.raises(ValueError, match="--noise_scale_every=-1"):
        lars_tf.DistributedOptimizer(tf.keras.optimizers.SGD(0.1), noise_scale_every=-1)


@pytest.mark.multiprocess
def test_lars_train_logs_the_noise_scale_per_epoch(tmp_path):
    """--noise_scale_every on 2 ranks (Fashion-MNIST, the MLP, one epoch): B_simple is in
    the epoch's log line, the summary's history and TensorBoard."""
    import json

    import tensorflow as tf

    proc = run_job(launcher("gloo") + [
        "lars-train", f"--model_dir={tmp_path}", "--model=mlp", "--global_batch_size=1024",
        "--epochs=1", "--learning_rate=2.0", "--warmup_epochs=0.5", "--noise_scale_every=2",
        "--noprogress_bar"], timeout=300)
    row = json.loads((tmp_path / "summary.json").read_text())["history"][0]
    assert row["grad_sq_norm"] > 0 and row["grad_noise_trace"] > 0, row
    assert row["noise_scale"] == row["grad_noise_trace"] / row["grad_sq_norm"]
    assert f"B_simple {row['noise_scale']:.0f}" in proc.stderr
    tags = set()
    for path in (tmp_path / "tensorboard").rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(v.tag for v in event.summary.value)
    assert any("noise_scale" in t for t in tags), tags
