"""Real 2-rank training jobs under horovodrun (Gloo) and the pip Open MPI's mpirun."""

import json

import numpy as np
import pytest

from tests.conftest import launcher, run_job


def _load(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


# Gloo: the plain fp32 stack, and bfloat16 compute. MPI: the whole stack, mixed_float16 with
# loss scaling, float16 all-reduce and 2 accumulated backward passes per update. The 16-bit
# runs train the mlp: TensorFlow's CPU float16 convolutions are ~15x slower than float32, and
# bfloat16 ones are emulated on CPUs without bfloat16 instructions (an epoch of small_cnn
# took 295 s on an AVX2 EPYC). The fp32 run covers the convolutions and BatchNorm.
FULL_STACK = ["model=mlp", "precision=mixed_float16", "fp16_allreduce=True",
              "backward_passes_per_step=2"]


@pytest.mark.parametrize("kind, extra", [
    ("gloo", []),
    ("gloo", ["model=mlp", "precision=mixed_bfloat16"]),
    ("mpirun", FULL_STACK),
], ids=["gloo-fp32", "gloo-bf16", "mpirun-fp16-accum"])
def test_two_ranks_end_with_identical_trained_weights(kind, extra, tmp_path):
    run_job(launcher(kind) + ["python", "tests/workers/train_dump.py", str(tmp_path), *extra],
            timeout=300)
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
