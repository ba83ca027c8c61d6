"""The pieces of the Horovod layer that are pure functions: GPU pinning and CPU sharing."""

import pytest

from lars_tf import distributed


def test_each_rank_owns_the_gpu_of_its_local_rank():
    gpus = ["GPU:0", "GPU:1", "GPU:2", "GPU:3"]
    assert [distributed.gpu_for_local_rank(gpus, r) for r in range(4)] == gpus
    with pytest.raises(RuntimeError, match="local rank 4 has no GPU: this node shows 4"):
        distributed.gpu_for_local_rank(gpus, 4)


@pytest.mark.parametrize("cpus, ranks, want", [(2, 2, 1), (2, 1, 2), (64, 8, 8), (4, 8, 1),
                                               (48, 5, 9)])
def test_threads_per_rank_split_the_node(cpus, ranks, want):
    assert distributed.threads_per_rank(ranks, cpu_count=cpus, affinity=cpus) == want


@pytest.mark.parametrize("cpus, bound, ranks, want", [(64, 16, 4, 16), (64, 1, 2, 1),
                                                      (2, 1, 2, 1)])
def test_a_bound_rank_uses_exactly_its_cores(cpus, bound, ranks, want):
    """mpirun --bind-to core / srun --cpu-bind already split the node: a rank bound to 16 of
    64 cores runs 16 threads, whatever the number of ranks on the node."""
    assert distributed.threads_per_rank(ranks, cpu_count=cpus, affinity=bound) == want


_ONEDNN = """
import os, sys
if sys.argv[1] != "lars_tf-first":
    import tensorflow
    if sys.argv[1] == "tf-alone":
        from tensorflow.python.util import _pywrap_util_port
        print("RESULT", _pywrap_util_port.IsMklEnabled())
        sys.exit()
import lars_tf
from lars_tf import distributed
lars_tf.init()
print("RESULT", os.environ.get("TF_ENABLE_ONEDNN_OPTS"), distributed.onednn_enabled())
"""


def _onednn(*cases: tuple[str, str | None]) -> list[tuple[str, str]]:
    """(RESULT line, stderr) of the script above for each (import order, the environment's
    TF_ENABLE_ONEDNN_OPTS or None), the processes run side by side."""
    import subprocess
    import sys

    from lars_tf.testing import job_env

    procs = []
    for order, env in cases:
        environ = {k: v for k, v in job_env().items() if k != "TF_ENABLE_ONEDNN_OPTS"}
        if env is not None:
            environ["TF_ENABLE_ONEDNN_OPTS"] = env
        procs.append(subprocess.Popen([sys.executable, "-c", _ONEDNN, order], env=environ,
                                      text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    found = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            [result] = [line for line in out.splitlines() if line.startswith("RESULT")]
            found.append((result, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return found


@pytest.mark.multiprocess
def test_onednn_is_on_unless_the_user_said_no():
    (tf_default, _), (first, _), (first_no, _), (late, stderr) = _onednn(
        ("tf-alone", None), ("lars_tf-first", None), ("lars_tf-first", "0"),
        ("tf-first", None))
    # TensorFlow alone turns oneDNN on only on CPUs with AVX-512 VNNI or newer
    tf_default = tf_default.split()[1]
    # lars_tf imported first turns it on, never over the user's choice
    assert first == "RESULT 1 True"
    assert first_no == "RESULT 0 False"
    # imported after TensorFlow it is too late: lars_tf changes nothing and says so if off
    assert late == f"RESULT None {tf_default}"
    assert ("oneDNN CPU kernels are off" in stderr) == (tf_default == "False")
