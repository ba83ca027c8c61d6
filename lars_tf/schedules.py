"""Learning-rate schedules and batch-size scaling rules for large-batch training."""

from __future__ import annotations

import math

import tensorflow as tf

SCALING_RULES = ("linear", "sqrt")


@tf.keras.utils.register_keras_serializable(package="lars_tf")
class WarmupPolynomialDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    r"""Linear warmup to ``peak_learning_rate``, then polynomial decay to ``end_learning_rate``.

    With ``t`` the optimizer step, ``W = warmup_steps`` and ``T = total_steps``:

    .. math::

        lr(t) = peak \cdot \frac{t}{W}                          \quad t < W \\
        lr(t) = (peak - end) (1 - \frac{t - W}{T - W})^{power} + end  \quad W \le t \le T \\
        lr(t) = end                                              \quad t > T

    This is the schedule of "ImageNet Training in Minutes" (power 2 by default). Steps count
    weight updates. With Horovod gradient accumulation the optimizer's step counter advances
    once per backward pass, ``backward_passes_per_step`` times per update; give that number
    here and the schedule divides the counter by it, so that the ``j``-th update uses
    ``lr(j)`` whatever the accumulation.

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
        backward_passes_per_step: int = 1,
        name: str | None = None,
    ):
        super().__init__()
        if int(backward_passes_per_step) != backward_passes_per_step \
                or backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be an integer >= 1, got "
                             f"{backward_passes_per_step!r}")
        if not peak_learning_rate > 0:
            raise ValueError(f"peak_learning_rate must be > 0, got {peak_learning_rate!r}")
        if not 0 <= end_learning_rate <= peak_learning_rate:
            raise ValueError(
                f"end_learning_rate must be in [0, peak_learning_rate={peak_learning_rate}], "
                f"got {end_learning_rate!r}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if warmup_steps > total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power!r}")
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.end_learning_rate = float(end_learning_rate)
        self.power = float(power)
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name or "WarmupPolynomialDecay"):
            t = tf.cast(step // self.backward_passes_per_step, tf.float32)
            peak = tf.constant(self.peak_learning_rate, tf.float32)
            end = tf.constant(self.end_learning_rate, tf.float32)
            warm = float(max(self.warmup_steps, 1))
            warmup_lr = peak * t / warm
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
            "backward_passes_per_step": self.backward_passes_per_step,
            "name": self.name,
        }


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
    if reference_batch_size < 1 or global_batch_size < 1:
        raise ValueError("batch sizes must be >= 1, got "
                         f"reference={reference_batch_size}, global={global_batch_size}")
    ratio = global_batch_size / reference_batch_size
    return reference_learning_rate * (ratio if rule == "linear" else math.sqrt(ratio))
