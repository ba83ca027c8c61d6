"""lars_tf: LARS + mixed precision + Horovod for large-batch distributed training."""

from lars_tf.config import TrainConfig
from lars_tf.optimizers import LARS
from lars_tf.schedules import WarmupPolynomialDecay, scale_learning_rate

__all__ = [
    "LARS",
    "TrainConfig",
    "Trainer",
    "WarmupPolynomialDecay",
    "build_optimizer",
    "init",
    "scale_learning_rate",
]
__version__ = "0.1.0"


def __getattr__(name):
    # The trainer imports Horovod; load it only when asked, so that LARS and the schedules
    # work in a plain TensorFlow process.
    if name in ("Trainer", "build_optimizer"):
        from lars_tf import train

        return getattr(train, name)
    if name == "init":
        from lars_tf import distributed

        return distributed.init
    raise AttributeError(f"module 'lars_tf' has no attribute {name!r}")
