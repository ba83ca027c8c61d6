"""The rank side of the all-reduce benchmarks (``allreduce``, ``cluster_allreduce``): one
process of a job that all-reduces the gradients of real models' variable shapes and times it.

    python -m benchmarks.allreduce_worker --out FILE [--models resnet50,alexnet_bn] [--mpi4py]

Under Horovod (the default): per model, the step without Horovod (the gradient computation
alone), the step with the all-reduce through ``lars_tf.DistributedOptimizer`` (its default
buckets) uncompressed (``fp32``) and with fp16 compression (``fp16``), the same with one
all-reduce op per gradient (``fp32_per_tensor``, ``bucket_mb=0``), the same through Horovod's
own ``hvd.DistributedGradientTape`` (``horovod_fp32``, the baseline), in alternating blocks,
and a local memory copy of the same bytes on every rank at once. With ``--mpi4py`` (started
by ``mpirun``, no Horovod): mpi4py's ``Allreduce`` of one float32 buffer of each model's
gradient bytes, the raw-MPI baseline. Rank 0 writes ``{model: figures}``
(median seconds) to --out.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

from lars_tf import testing

# Whose gradients a worker all-reduces: (input shape, classes) to build the model with.
MODELS = {"resnet50": ((224, 224, 3), 1000), "alexnet_bn": ((224, 224, 3), 1000)}

FLAGS = flags.FLAGS


def _define_flags() -> None:  # only when run: the benchmarks that import this have their own
    flags.DEFINE_string("out", None, "Rank 0 writes the figures here (JSON).")
    flags.DEFINE_list("models", ["resnet50"], f"Whose gradient shapes: of {', '.join(MODELS)}.")
    flags.DEFINE_integer("steps", 20, "Timed steps per block.")
    flags.DEFINE_integer("blocks", 3, "Alternating blocks (local, fp32, fp16) per model.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps before each timed block.")
    flags.DEFINE_bool("mpi4py", False, "Time mpi4py's Allreduce of one buffer (no Horovod).")


def command(out, models: list[str], steps: int, blocks: int, warmup: int = 3,
            mpi4py: bool = False) -> list[str]:
    """The command line of a worker (what follows a launcher's ``--``)."""
    return [sys.executable, "-m", "benchmarks.allreduce_worker", f"--out={out}",
            f"--models={','.join(models)}", f"--steps={steps}", f"--blocks={blocks}",
            f"--warmup={warmup}", f"--{'' if mpi4py else 'no'}mpi4py"]


def gradient_shapes(name: str) -> list[tuple]:
    """The shapes of ``name``'s trainable variables (its gradients), built at ImageNet size."""
    import tensorflow as tf

    from lars_tf import models

    shapes = [tuple(v.shape) for v in models.get(name, *MODELS[name]).trainable_variables]
    tf.keras.backend.clear_session()
    return shapes


def horovod_worker(out: str, names: list[str]) -> None:
    import horovod.tensorflow as hvd

    hvd.init()
    found = {name: _time_horovod(hvd, gradient_shapes(name)) for name in names}
    if hvd.rank() == 0:
        Path(out).write_text(json.dumps(found))


def _time_horovod(hvd, shapes: list[tuple]) -> dict:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(hvd.rank())
    variables = [tf.Variable(tf.zeros(s)) for s in shapes]
    grads = [tf.constant(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
    n_floats = sum(int(np.prod(s)) for s in shapes)

    import lars_tf

    allreducers = {c: lars_tf.DistributedOptimizer(tf.keras.optimizers.SGD(0.0), compression=c)
                   for c in ("none", "fp16")}
    allreducers["per_tensor"] = lars_tf.DistributedOptimizer(tf.keras.optimizers.SGD(0.0),
                                                             bucket_mb=0)

    def make_step(compression, horovod_tape=False):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.add_n([tf.reduce_sum(v * g) for v, g in zip(variables, grads)])
            if horovod_tape:
                tape = hvd.DistributedGradientTape(
                    tape, compression=getattr(hvd.Compression, compression))
            out = tape.gradient(loss, variables)
            if compression is not None and not horovod_tape:
                out = allreducers[compression].allreduce(out)
            return out
        return step

    steps = {"local": make_step(None), "fp32": make_step("none"), "fp16": make_step("fp16"),
             "fp32_per_tensor": make_step("per_tensor"),
             "horovod_fp32": make_step("none", horovod_tape=True)}

    def timed(fn):
        for _ in range(FLAGS.warmup):
            fn()
        hvd.allreduce(tf.constant(0.0), name="sync")  # start the block together
        out = []
        for _ in range(FLAGS.steps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    times = {k: [] for k in steps}
    for _ in range(FLAGS.blocks):
        for name, fn in steps.items():
            times[name] += timed(fn)

    # the same bytes copied locally, every rank at once
    src = np.ones(n_floats, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    hvd.allreduce(tf.constant(0.0), name="sync_copy")
    copies = []
    for _ in range(10):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copies.append(time.perf_counter() - t0)
    result = {k: statistics.median(v) for k, v in times.items()}
    result.update(copy_sec=statistics.median(copies), bytes=4 * n_floats,
                  tensors=len(shapes), size=hvd.size(),
                  peak_rss_mb_per_rank=hvd.allgather_object(testing.peak_rss_mb(), name="rss"),
                  hosts=hvd.allgather_object(os.uname().nodename, name="hosts"),
                  fusion_threshold=os.environ.get("HOROVOD_FUSION_THRESHOLD"),
                  cycle_time=os.environ.get("HOROVOD_CYCLE_TIME"))
    return result


def mpi4py_worker(out: str, names: list[str]) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    found = {}
    for name in names:
        n_floats = sum(int(np.prod(s)) for s in gradient_shapes(name))
        buf = np.ones(n_floats, np.float32)
        times = []
        for i in range(FLAGS.warmup + FLAGS.steps * FLAGS.blocks):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            if i >= FLAGS.warmup:
                times.append(time.perf_counter() - t0)
        found[name] = {"allreduce": statistics.median(times), "bytes": 4 * n_floats,
                       "size": comm.Get_size(),
                       "hosts": comm.allgather(os.uname().nodename),
                       "peak_rss_mb_per_rank": comm.allgather(testing.peak_rss_mb())}
    if comm.Get_rank() == 0:
        Path(out).write_text(json.dumps(found))


def main(argv):
    del argv
    if not FLAGS.out:
        raise app.UsageError("--out is required")
    unknown = sorted(set(FLAGS.models) - set(MODELS))
    if unknown:
        raise app.UsageError(f"--models: unknown {', '.join(unknown)} (of {', '.join(MODELS)})")
    (mpi4py_worker if FLAGS.mpi4py else horovod_worker)(FLAGS.out, FLAGS.models)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
