"""Learning-rate schedules and batch-size scaling rules (TensorFlow only)."""

from __future__ import annotations

import math

import tensorflow as tf

from lars_tf import keras_compat
from lars_tf.validation import check_number

SCALING_RULES = ("linear", "sqrt")


@keras_compat.register
class WarmupPolynomialDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    r"""Linear warmup to ``peak_learning_rate``, then polynomial decay to ``end_learning_rate``.

    With ``t`` the optimizer step, ``W = warmup_steps``, ``T = total_steps`` and
    ``start = warmup_start_learning_rate`` (0 by default):

    .. math::

        lr(t) = start + (peak - start) \frac{t}{W}             \quad t < W \\
        lr(t) = (peak - end) (1 - \frac{t - W}{T - W})^{power} + end  \quad W \le t \le T \\
        lr(t) = end                                              \quad t > T

    This is the schedule of "ImageNet Training in Minutes" (power 2 by default). Steps count
    weight updates: inside ``lars_tf.DistributedOptimizer`` the optimizer's step counter
    advances once per update whatever the gradient accumulation.

    >>> s = WarmupPolynomialDecay(peak_learning_rate=2.0, warmup_steps=10, total_steps=110)
    >>> float(s(5)), float(s(10)), float(s(60)), float(s(110))
    (1.0, 2.0, 0.5, 0.0)
    """

    def __init__(
        self,
        peak_learning_rate: float,
        warmup_steps: int,
        total_steps: int,
        end_learning_rate: float = 0.0,
        power: float = 2.0,
        warmup_start_learning_rate: float = 0.0,
        name: str | None = None,
    ):
        super().__init__()
        # step counts may come as whole floats (3.0), as Keras' own schedules allow
        warmup_steps, total_steps = (
            int(x) if isinstance(x, float) and x.is_integer() else x
            for x in (warmup_steps, total_steps))
        name_ = "WarmupPolynomialDecay"
        check_number(f"{name_} peak_learning_rate", peak_learning_rate, lo=0, lo_open=True)
        check_number(f"{name_} end_learning_rate", end_learning_rate, lo=0,
                     hi=peak_learning_rate)
        check_number(f"{name_} warmup_start_learning_rate", warmup_start_learning_rate, lo=0,
                     hi=peak_learning_rate)
        check_number(f"{name_} total_steps", total_steps, lo=1, integer=True)
        check_number(f"{name_} warmup_steps", warmup_steps, lo=0, hi=total_steps,
                     integer=True)
        check_number(f"{name_} power", power, lo=0, lo_open=True)
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.end_learning_rate = float(end_learning_rate)
        self.power = float(power)
        self.warmup_start_learning_rate = float(warmup_start_learning_rate)
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name or "WarmupPolynomialDecay"):
            t = tf.cast(step, tf.float32)
            peak = tf.constant(self.peak_learning_rate, tf.float32)
            end = tf.constant(self.end_learning_rate, tf.float32)
            start = tf.constant(self.warmup_start_learning_rate, tf.float32)
            warm = float(max(self.warmup_steps, 1))
            warmup_lr = start + (peak - start) * t / warm
            decay_len = float(max(self.total_steps - self.warmup_steps, 1))
            frac = tf.clip_by_value((t - self.warmup_steps) / decay_len, 0.0, 1.0)
            decay_lr = (peak - end) * tf.pow(1.0 - frac, self.power) + end
            return tf.where(t < self.warmup_steps, warmup_lr, decay_lr)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "end_learning_rate": self.end_learning_rate,
            "power": self.power,
            "warmup_start_learning_rate": self.warmup_start_learning_rate,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # lars_tf <= 0.1 saved the accumulation (Horovod's counter stepped every backward
        # pass); with lars_tf.DistributedOptimizer the step counts updates
        k = config.pop("backward_passes_per_step", 1)
        if k != 1:
            raise ValueError(
                f"WarmupPolynomialDecay: this schedule was saved with backward_passes_per_step"
                f"={k}, for Horovod's Keras 2 optimizer, whose step counter advanced every "
                "backward pass. lars_tf.DistributedOptimizer counts updates: rebuild the "
                "schedule in updates (warmup_steps and total_steps divided by "
                f"{k}) and train through it")
        return cls(**config)




def scale_learning_rate(
    reference_learning_rate: float,
    reference_batch_size: int,
    global_batch_size: int,
    rule: str = "linear",
) -> float:
    """Scale a learning rate tuned at ``reference_batch_size`` to ``global_batch_size``.

    ``linear``: ``lr * B / B_ref`` (Goyal et al.); ``sqrt``: ``lr * sqrt(B / B_ref)``
    (Krizhevsky; often the better start for LARS at 16K+).

    >>> scale_learning_rate(0.1, 256, 8192)
    3.2
    """
    if rule not in SCALING_RULES:
        raise ValueError(f"rule must be one of {SCALING_RULES}, got {rule!r}")
    check_number("reference_batch_size", reference_batch_size, lo=1, integer=True)
    check_number("global_batch_size", global_batch_size, lo=1, integer=True)
    ratio = global_batch_size / reference_batch_size
    return reference_learning_rate * (ratio if rule == "linear" else math.sqrt(ratio))
