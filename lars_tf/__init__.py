"""lars_tf: LARS + mixed precision + Horovod for large-batch distributed training."""

import os as _os
import sys as _sys

# oneDNN's CPU kernels. TensorFlow turns them on by itself only on CPUs with AVX-512 VNNI or
# newer; on an AVX2 CPU they train about twice as fast (benchmarks/onednn.py; docs/clusters.md,
# "oneDNN on CPUs"). TensorFlow reads the variable when it loads, so lars_tf sets it only before
# that, and never over a value the user gave (TF_ENABLE_ONEDNN_OPTS=0 turns them off).
if "tensorflow" not in _sys.modules:
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from lars_tf.config import TrainConfig  # noqa: E402
from lars_tf.distributed_optimizer import DistributedOptimizer  # noqa: E402
from lars_tf.optimizers import LARS  # noqa: E402
from lars_tf.precision import minimize  # noqa: E402
from lars_tf.schedules import WarmupPolynomialDecay, scale_learning_rate  # noqa: E402

__all__ = [
    "BroadcastState",
    "DistributedOptimizer",
    "LARS",
    "TrainConfig",
    "Trainer",
    "WarmupPolynomialDecay",
    "build_optimizer",
    "init",
    "minimize",
    "scale_learning_rate",
]
__version__ = "0.1.0"


def __getattr__(name):
    # The trainer imports Horovod; load it only when asked, so that LARS and the schedules
    # work in a plain TensorFlow process.
    if name == "BroadcastState":
        from lars_tf import callbacks

        return callbacks.BroadcastState
    if name == "Trainer":
        from lars_tf import train

        return train.Trainer
    if name == "build_optimizer":
        from lars_tf import build

        return build.build_optimizer
    if name == "init":
        from lars_tf import distributed

        return distributed.init
    raise AttributeError(f"module 'lars_tf' has no attribute {name!r}")
