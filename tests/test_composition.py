"""LARS + loss scaling + Horovod composed: equal to one big batch, and overflow-safe.

Every job here is a real Horovod run (Gloo, 2 ranks) or a single process.
"""

import numpy as np
import pytest

from lars_tf.testing import launcher, run_job

pytestmark = [pytest.mark.multiprocess, pytest.mark.legacy]

GLOBAL = 512


def _weights(path, prefix="w"):
    with np.load(path) as f:
        n = len([k for k in f.files if k.startswith(prefix)])
        return [f[f"{prefix}{i}"] for i in range(n)]


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """one_process(*options): (weights, initial weights) of one process at the global
    batch with these options, trained once per module and option set."""
    done = {}

    def reference(*options):
        if options not in done:
            out = tmp_path_factory.mktemp("ref")
            run_job(["python", "tests/workers/equivalence.py", str(out), str(GLOBAL), "1",
                     *options])
            done[options] = _weights(out / "rank0.npz"), _weights(out / "rank0.npz", "init")
        return done[options]

    return reference


@pytest.mark.parametrize("ranks, passes", [(2, 1), (1, 2), (2, 2)])
def test_split_batch_equals_one_big_batch(ranks, passes, one_process, tmp_path):
    ref, init = one_process()
    cmd = ["python", "tests/workers/equivalence.py", str(tmp_path), str(GLOBAL), str(passes)]
    run_job((launcher("gloo", ranks) if ranks > 1 else []) + cmd)
    for r in range(ranks):
        got = _weights(tmp_path / f"rank{r}.npz")
        for i, (g, want, w0) in enumerate(zip(got, ref, init)):
            assert _rel_err(want, w0) > 1e-3, f"weight {i} barely trained"
            assert _rel_err(g, want) < 1e-5, (
                f"rank {r} weight {i}: relative difference {_rel_err(g, want):.2e} from "
                f"one process at batch {GLOBAL}")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_keras_optimizers_through_the_distributed_optimizer(optimizer, one_process, tmp_path):
    """lars_tf.DistributedOptimizer wraps any Keras optimizer: Keras' SGD (momentum, the
    schedule) and Adam (whose bias correction counts updates, not backward passes), on 2
    ranks x 2 passes, equal one process at the same global batch."""
    ref, init = one_process(f"optimizer={optimizer}")
    run_job(launcher("gloo", 2) + ["python", "tests/workers/equivalence.py", str(tmp_path),
                                   str(GLOBAL), "2", f"optimizer={optimizer}"])
    for r in range(2):
        for i, (g, want, w0) in enumerate(zip(_weights(tmp_path / f"rank{r}.npz"), ref, init)):
            assert _rel_err(want, w0) > 1e-3, f"weight {i} barely trained"
            assert _rel_err(g, want) < 1e-5, (optimizer, r, i, _rel_err(g, want))


@pytest.mark.parametrize("options, reference, tolerance", [
    (["predivide=2", "bucket_mb=0.004"], [], 1e-5),
    (["precision=mixed_float16"], ["precision=mixed_float16"], 1e-2),
    (["precision=mixed_float16", "fp16_allreduce=1", "predivide=2", "bucket_mb=0"],
     ["precision=mixed_float16"], 1e-2),
], ids=["predivide-small-buckets", "fp16", "fp16-allreduce-predivide-per-tensor"])
def test_predivide_and_loss_scaling_keep_the_equivalence(options, reference, tolerance,
                                                         one_process, tmp_path):
    """2 ranks x 2 passes against one process at the same global batch: with
    gradient_predivide_factor 2 (divide by 2 before the sum, by size/2 after) and buckets of
    4 KiB (2 per update) exactly as fp32; the whole mixed_float16 stack (loss
    scaling around the all-reduce), with float32 or float16 on the wire (one all-reduce per
    gradient), within 1% of one process in mixed_float16. (Float16 compute rounds per-pass
    sums differently from one big batch; the error must also stay far below
    how far training moved each weight.) Float16 on the wire takes the predivide factor:
    without it the float16 sum of the scaled gradients overflows at the initial scale 2^15
    and the loss scaling skips (here 2 of the 5 updates) until the scale is low enough."""
    ref, init = one_process(*reference)
    run_job(launcher("gloo", 2) + ["python", "tests/workers/equivalence.py", str(tmp_path),
                                   str(GLOBAL), "2", *options])
    for r in range(2):
        for i, (g, want, w0) in enumerate(zip(_weights(tmp_path / f"rank{r}.npz"), ref, init)):
            moved, err = _rel_err(want, w0), _rel_err(g, want)
            assert moved > 1e-3, f"weight {i} barely trained"
            assert err < tolerance and err < 0.1 * moved, (
                f"rank {r} weight {i}: relative difference {err:.2e} (training moved it "
                f"{moved:.2e})")


def _overflow_run(tmp_path, passes, bad_pass, *extra):
    run_job(launcher("gloo", 2) + ["python", "tests/workers/overflow.py", str(tmp_path),
                                   str(passes), str(bad_pass), *extra])
    recs = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    n = int(recs[0]["passes"])
    nw = len([k for k in recs[0] if k.startswith("p0_w")])
    weights = [[[rec[f"p{p}_w{i}"] for i in range(nw)] for p in range(n)] for rec in recs]
    scales = [[float(rec[f"scale{p}"]) for p in range(n)] for rec in recs]
    return n, weights, scales, recs


def _moved(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("extra", [(), ("fp16_allreduce",)])
def test_overflow_on_one_rank_skips_the_step_on_both(tmp_path, extra):
    """...and the skipped update still counts for LARS's schedule, on both stacks (Keras 3's
    own loss-scale optimizer did not count it, Keras 2's does): update j uses lr(j)."""
    n, weights, scales, recs = _overflow_run(tmp_path, 1, 2, *extra)
    assert [int(rec["lars_iterations"]) for rec in recs] == [4, 4]
    for p in range(n):  # identical across ranks after every step
        for a, b in zip(weights[0][p], weights[1][p]):
            np.testing.assert_array_equal(a, b, err_msg=f"ranks differ after step {p}")
    for r in range(2):
        assert scales[r] == [2.0 ** 15, 2.0 ** 15, 2.0 ** 14, 2.0 ** 14], f"rank {r}"
    w = weights[0]
    assert _moved(w[1], w[0]) and _moved(w[3], w[2])  # good steps update
    assert not _moved(w[2], w[1])                     # the poisoned step is skipped
    assert all(np.isfinite(x).all() for x in w[3])


def test_overflow_inside_an_accumulation_window_skips_that_update(tmp_path):
    # 2 passes per update; rank 1 overflows on pass 2, the first pass of update 2, where
    # its local gradient sum is Inf but no all-reduce has told rank 0 yet
    n, weights, scales, recs = _overflow_run(tmp_path, 2, 2)
    assert n == 8 and int(recs[0]["iterations"]) == 8
    for p in range(n):
        for a, b in zip(weights[0][p], weights[1][p]):
            np.testing.assert_array_equal(a, b, err_msg=f"ranks differ after pass {p}")
    for r in range(2):  # the scale changes once, at the end of the poisoned window
        assert scales[r] == [2.0 ** 15] * 3 + [2.0 ** 14] * 5, f"rank {r}"
    w = weights[0]
    init = [recs[0][f"init_w{i}"] for i in range(len(w[0]))]
    assert not _moved(w[2], w[1]) and not _moved(w[3], w[2])  # no update in window 2
    # mid-window passes (0, 4, 6) leave the weights as they were before them
    assert not _moved(w[0], init) and not _moved(w[4], w[3]) and not _moved(w[6], w[5])
    assert _moved(w[1], w[0]) and _moved(w[5], w[4]) and _moved(w[7], w[6])
