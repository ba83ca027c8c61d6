"""Real 2-rank training jobs under horovodrun (Gloo) and the pip Open MPI's mpirun."""

import json
import re

import numpy as np
import pytest

from lars_tf import keras_compat
from lars_tf.testing import launcher, run_job, run_jobs

pytestmark = [pytest.mark.multiprocess, pytest.mark.legacy]


def _load(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


# Gloo: the plain fp32 stack, and bfloat16 compute. MPI: the whole stack, mixed_float16 with
# loss scaling, float16 all-reduce and 2 accumulated backward passes per update. The 16-bit
# runs train the mlp: TensorFlow's CPU float16 convolutions are ~15x slower than float32, and
# bfloat16 ones are emulated on CPUs without bfloat16 instructions (an epoch of small_cnn
# took 295 s on an AVX2 EPYC). The fp32 run covers the convolutions and BatchNorm.
FULL_STACK = ["model=mlp", "precision=mixed_float16", "fp16_allreduce=True",
              "backward_passes_per_step=2", "train_examples=30720"]  # 30 updates


@pytest.mark.parametrize("kind, extra", [
    ("gloo", ["train_examples=30720"]),  # 30 updates of small_cnn
    ("gloo", ["model=mlp", "precision=mixed_bfloat16"]),
    ("mpirun", FULL_STACK),
], ids=["gloo-fp32", "gloo-bf16", "mpirun-fp16-accum"])
def test_two_ranks_end_with_identical_trained_weights(kind, extra, tmp_path):
    run_job(launcher(kind) + ["python", "tests/workers/train_dump.py", str(tmp_path), *extra],
            timeout=600)  # the mpirun job takes about 90 s alone (148 s for 58 updates)
    init = [_load(tmp_path / f"init_rank{r}.npz") for r in range(2)]
    final = [_load(tmp_path / f"final_rank{r}.npz") for r in range(2)]
    # the ranks started apart (different seeds) ...
    assert any(not np.array_equal(a, b) for a, b in zip(*init))
    # ... and end bit-identical, BatchNorm statistics included ...
    for i, (a, b) in enumerate(zip(*final)):
        np.testing.assert_array_equal(a, b, err_msg=f"weight {i} differs between ranks")
    # ... having trained: every weight moved away from rank 0's (broadcast) start
    for i, (a, b) in enumerate(zip(init[0], final[0])):
        assert not np.allclose(a, b), f"weight {i} did not change"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 1024
    config = dict(a.split("=") for a in extra)
    assert summary["per_rank_batch_size"] == 1024 // 2 // int(
        config.get("backward_passes_per_step", 1))
    assert summary["precision"] == config.get("precision", "fp32")
    # one epoch of LARS on Fashion-MNIST is far above chance (10%)
    assert summary["final_test_accuracy"] > 0.6
    assert summary["images_per_sec"] > 0


@pytest.mark.parametrize("precision, passes", [("mixed_float16", 1), ("fp32", 2)])
def test_after_a_resume_every_rank_holds_rank_0s_complete_state(precision, passes, tmp_path):
    """Only rank 0 reads the checkpoint; afterwards every variable it holds (model, optimizer,
    and under mixed_float16 the loss scale 1024 and its 7 good steps, which Keras keeps out of
    the optimizer's ``variables``) is equal on both ranks, and --check_replicas_every=1
    finds the ranks identical on every step of the resumed epoch."""
    cmd = ["python", "tests/workers/resume_state.py", str(tmp_path)]
    run_job(launcher("gloo") + cmd + ["first", precision, str(passes)], timeout=240)
    run_job(launcher("gloo") + cmd + ["resume", precision, str(passes)], timeout=240)
    states = [dict(np.load(tmp_path / f"state_rank{r}.npz")) for r in range(2)]
    assert states[0].keys() == states[1].keys() and len(states[0]) >= 10
    for key in states[0]:
        np.testing.assert_array_equal(states[1][key], states[0][key], err_msg=key)
    scale = [k for k in states[0] if re.search(r"current_loss_scale|dynamic_scale", k)]
    good = [k for k in states[0] if re.search(r"good_steps|step_counter", k)]
    if precision == "mixed_float16":
        assert float(states[1][scale[0]]) == 1024.0 and int(states[1][good[0]]) == 7
    else:
        assert not scale and not good
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_done"] == 2
    # the step counters: the distributed optimizer's counts backward passes (Keras 2 names
    # it backward_passes), the one inside it updates
    steps = [int(states[1][k]) for k in states[0]
             if re.search(r"(iteration|backward_passes)(:0)?$", k)]
    assert max(steps) == summary["steps_per_epoch"] == 8 * passes  # epoch 1


def test_ranks_draw_different_dropout_masks_and_a_resumed_run_repeats_them(tmp_path):
    """Dropout masks come from (seed, rank) and, on Keras 3, the epoch: the ranks draw
    differently, and a run that stopped after epoch 1 and resumed draws epoch 2's masks as
    the run that went straight through (before, the resumed run restarted every layer's
    generator, so its masks and weights differed). On Keras 2 the layers draw through
    stateful ops that no checkpoint holds: there a plain rerun repeats them."""
    def job(out, *part):
        out.mkdir(exist_ok=True)
        return launcher("gloo") + ["python", "tests/workers/dropout_masks.py", str(out), *part]

    straight, split = tmp_path / "straight", tmp_path / "split"
    if keras_compat.KERAS3:
        run_jobs(job(straight), job(split, "stop"), timeout=240)
        run_job(job(split, "resume"), timeout=240)
    else:
        run_jobs(job(straight), job(split), timeout=240)
    for rank in range(2):
        masks = [np.load(out / f"kept_rank{rank}.npy") for out in (straight, split)]
        np.testing.assert_array_equal(masks[1], masks[0])
        assert 0.3 < masks[0].mean() < 0.7  # dropout(0.5) ran
        weights = [np.load(out / f"weights_rank{rank}.npz") for out in (straight, split)]
        for k in weights[0].files:
            np.testing.assert_allclose(weights[1][k], weights[0][k], rtol=1e-6, atol=1e-7,
                                       err_msg=f"rank {rank} {k}")
    kept = [np.load(straight / f"kept_rank{r}.npy") for r in range(2)]
    assert (kept[0] != kept[1]).mean() > 0.3  # independent draws differ ~half


def test_embedding_gradients_with_accumulation_and_predivide(tmp_path):
    """Sparse gradients (an Embedding) with 2 passes per update and predivide factor 2: Horovod
    raised on both; sparse_as_dense is now on for them, and the ranks end identical."""
    run_job(launcher("gloo") + ["python", "tests/workers/embedding.py", str(tmp_path)],
            timeout=240)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for k in ranks[0].files:
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k], err_msg=k)
