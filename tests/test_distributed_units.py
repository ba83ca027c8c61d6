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
