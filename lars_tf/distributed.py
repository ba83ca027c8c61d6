"""The one module that imports Horovod: init, device pinning, optimizer wrapping, collectives."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import horovod.tensorflow as hvd_tf
import numpy as np
import tensorflow as tf
from absl import logging

from lars_tf import keras_compat


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


_WORLD: World | None = None


def threads_per_rank(local_size: int, cpu_count: int | None = None,
                     affinity: int | None = None) -> int:
    """CPU cores each rank on a node may use.

    A rank that the launcher bound to some cores (``mpirun --bind-to core``, ``srun
    --cpu-bind``) uses exactly those; an unbound rank takes the node's cores split evenly
    between the ranks on the node. At least 1.
    """
    cpus = cpu_count or os.cpu_count() or 1
    bound = len(os.sched_getaffinity(0)) if affinity is None else affinity
    if 0 < bound < cpus:
        return bound
    return max(1, cpus // max(1, local_size))


def gpu_for_local_rank(gpus: list, local_rank: int):
    """The one GPU a rank owns: the local_rank-th visible GPU (one process per GPU)."""
    if local_rank >= len(gpus):
        raise RuntimeError(
            f"local rank {local_rank} has no GPU: this node shows {len(gpus)} GPU(s); "
            "start one process per GPU (horovodrun -np <gpus> ... or -H host:<gpus>)")
    return gpus[local_rank]


def init(intra_op_threads: int | None = None, inter_op_threads: int | None = None,
         deterministic: bool = False) -> World:
    """Start Horovod and give this rank its device and its share of the CPU.

    On GPU nodes each rank sees only the GPU of its local rank (memory growth on). On CPU
    nodes the node's cores are split between the ranks on it, so that ranks do not fight
    over cores. ``deterministic`` runs one op at a time on each rank (inter-op threads 1,
    unless ``inter_op_threads`` is given): on TensorFlow 2.20, with ops running side by
    side, two identical 2-rank runs differed (first in the gradient of the first
    convolution, by one rounding, at the second update); one op at a time, they repeat.
    Horovod's ops are asynchronous, so the all-reduce still overlaps the backward pass.
    Call it before building a model (TensorFlow fixes its thread pools at the first op);
    later calls return the same World.
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    hvd_tf.init()
    world = World(hvd_tf.rank(), hvd_tf.size(), hvd_tf.local_rank(), hvd_tf.local_size())
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        gpu = gpu_for_local_rank(gpus, world.local_rank)
        tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.set_visible_devices(gpu, "GPU")
    if not gpus and not onednn_enabled() and world.rank == 0 \
            and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0":
        logging.warning(
            "TensorFlow's oneDNN CPU kernels are off: TensorFlow was imported before lars_tf, "
            "so lars_tf could not turn them on. Import lars_tf first, or set "
            "TF_ENABLE_ONEDNN_OPTS=1 (about 2x faster CPU training on AVX2 CPUs; "
            "docs/clusters.md, \"oneDNN on CPUs\").")
    threads = intra_op_threads or threads_per_rank(world.local_size)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(
        inter_op_threads or (1 if deterministic else max(2, threads)))
    _WORLD = world
    return world


def reinit() -> World:
    """Horovod restarted in this process with the ranks that are now in the job (an elastic
    job's reset: ``lars_tf.elastic``): this rank's new place. TensorFlow's thread pools
    and the device stay as ``init`` set them."""
    global _WORLD
    hvd_tf.shutdown()
    hvd_tf.init()
    _WORLD = World(hvd_tf.rank(), hvd_tf.size(), hvd_tf.local_rank(), hvd_tf.local_size())
    return _WORLD


def needs_dense_gradients(backward_passes_per_step: int, gradient_predivide_factor: float,
                          sparse_as_dense: bool | None = None) -> bool:
    """Whether sparse gradients go through the all-reduce as dense tensors: as asked, or,
    when not asked (``None``), whenever accumulation or a predivide factor is used."""
    if sparse_as_dense is not None:
        return bool(sparse_as_dense)
    return backward_passes_per_step > 1 or gradient_predivide_factor != 1.0


def broadcast_state(model: tf.keras.Model, optimizer: tf.keras.optimizers.Optimizer) -> None:
    """Give every rank rank 0's complete state before the first step: every variable a
    checkpoint of ``model`` and ``optimizer`` holds (weights, BatchNorm statistics,
    optimizer slots and step counter, the loss scale and its good-step counter), so that
    after a resume, which only rank 0 reads, no rank differs in anything."""
    from lars_tf import checkpoint

    if size_or_one("lars_tf broadcast of rank 0's state") == 1 and not is_initialized():
        return  # a world of one: nothing to broadcast
    optimizer.build(model.trainable_variables)
    hvd_tf.broadcast_variables(
        keras_compat.plain_variables(checkpoint.state_variables(model=model,
                                                                optimizer=optimizer)),
        root_rank=0)


def allreduce_sum(values, name: str) -> np.ndarray:
    """Element-wise sum of a small float64 vector over all ranks (every rank must call it)."""
    x = tf.constant(np.asarray(values, dtype=np.float64))
    return hvd_tf.allreduce(x, op=hvd_tf.Sum, name=name).numpy()


def allreduce_min_max(values, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise minimum and maximum of a float64 vector over all ranks."""
    x = tf.constant(np.asarray(values, dtype=np.float64))
    return (hvd_tf.allreduce(x, op=hvd_tf.Min, name=f"{name}.min").numpy(),
            hvd_tf.allreduce(x, op=hvd_tf.Max, name=f"{name}.max").numpy())


def broadcast_object(obj, name: str):
    """Rank 0's picklable ``obj`` on every rank."""
    return hvd_tf.broadcast_object(obj, root_rank=0, name=name)


# What a launcher (horovodrun, mpirun, srun) sets in each rank's environment: the job's size.
_LAUNCHER_SIZE_VARIABLES = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def launched_ranks() -> int:
    """The number of ranks the launcher that started this process asked for (1 when no
    launcher did)."""
    sizes = [os.environ.get(v, "") for v in _LAUNCHER_SIZE_VARIABLES]
    return max([int(s) for s in sizes if s.isdigit()] + [1])


def is_initialized() -> bool:
    """Whether Horovod has been started in this process (``lars_tf.init()``)."""
    return hvd_tf.is_initialized()


def size() -> int:
    """The number of ranks."""
    return hvd_tf.size()


def size_or_one(where: str) -> int:
    """The number of ranks; 1 in a plain process that no launcher started and that never
    called ``lars_tf.init()`` (a world of one, where there is nothing to all-reduce). A
    process that a launcher started as one of several ranks must call ``lars_tf.init()``
    first: ``ValueError`` naming ``where`` otherwise."""
    if hvd_tf.is_initialized():
        return hvd_tf.size()
    launched = launched_ranks()
    if launched > 1:
        raise ValueError(
            f"{where}: this process is one of {launched} ranks, but Horovod was not started "
            "in it: call lars_tf.init() at the top of the script, before building the model")
    return 1


def allreduce_gradient(tensor: tf.Tensor, prescale_factor: float = 1.0,
                       postscale_factor: float = 1.0) -> tf.Tensor:
    """The sum over ranks of ``tensor``, scaled by ``prescale_factor`` before and by
    ``postscale_factor`` after: one all-reduce op, which starts as soon as ``tensor``
    exists; Horovod's background thread fuses the tensors that are ready together."""
    return hvd_tf.allreduce(tensor, op=hvd_tf.Sum, prescale_factor=prescale_factor,
                            postscale_factor=postscale_factor)


def grouped_allreduce_gradients(tensors: list, prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> list:
    """The sums over ranks of ``tensors`` (one dtype), scaled as in ``allreduce_gradient``:
    one Horovod op for the group, which starts once all of them exist, and whose tensors
    Horovod all-reduces together (one negotiation, one fused buffer)."""
    if len(tensors) == 1:
        return [allreduce_gradient(tensors[0], prescale_factor, postscale_factor)]
    return hvd_tf.grouped_allreduce(tensors, op=hvd_tf.Sum, prescale_factor=prescale_factor,
                                    postscale_factor=postscale_factor)


def allreduce_sparse(grad: tf.IndexedSlices, average: bool = True) -> tf.IndexedSlices:
    """Every rank's sparse gradient rows, gathered (divided by the ranks for the mean)."""
    return hvd_tf.allreduce(grad, op=hvd_tf.Average if average else hvd_tf.Sum)


def peer_lost(message: str) -> bool:
    """Whether a failed op's ``message`` says a peer rank is gone: Horovod shut down (a rank
    exited, or its stall check gave up), or Gloo's transport to a peer broke or timed out (a
    host that vanished: its collectives time out on the survivors before Horovod notices;
    Gloo's errors carry the path of its ``transport`` sources)."""
    return "Horovod has been shut down" in message or "gloo/transport/" in message


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels in this process."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def rank_settings() -> dict:
    """What this rank runs with: the Horovod/NCCL/Open MPI/OpenMP environment the launcher
    gave it, TensorFlow's thread pools, whether its oneDNN CPU kernels are on, and the cores
    it may run on."""
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith(("HOROVOD_", "NCCL_", "OMPI_MCA_")) or k == "OMP_NUM_THREADS"}
    return {
        "host": socket.gethostname(),
        "env": env,
        "onednn": onednn_enabled(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
    }


def gather_object(obj, name: str) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    return hvd_tf.allgather_object(obj, name=name)


def versions() -> dict:
    import horovod

    return {"tensorflow": tf.__version__, "horovod": horovod.__version__}


def average_variables(variables, name: str) -> None:
    """Set each variable to its mean over ranks (one grouped all-reduce).

    For state that each rank updates from its own data, such as BatchNorm's moving mean and
    variance: afterwards every rank holds the same values.
    """
    variables = [v for v in variables if tf.as_dtype(v.dtype).is_floating]
    if not variables:
        return
    means = hvd_tf.grouped_allreduce([tf.convert_to_tensor(v) for v in variables],
                                     op=hvd_tf.Average, name=name)
    for v, m in zip(variables, means):
        v.assign(m)
