"""Learning-rate schedules, batch-size scaling rules, and the published presets."""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping

import tensorflow as tf

SCALING_RULES = ("linear", "sqrt")


@tf.keras.utils.register_keras_serializable(package="lars_tf")
class WarmupPolynomialDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    r"""Linear warmup to ``peak_learning_rate``, then polynomial decay to ``end_learning_rate``.

    With ``t`` the optimizer step, ``W = warmup_steps``, ``T = total_steps`` and
    ``start = warmup_start_learning_rate`` (0 by default):

    .. math::

        lr(t) = start + (peak - start) \frac{t}{W}             \quad t < W \\
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
        warmup_start_learning_rate: float = 0.0,
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
        if not 0 <= warmup_start_learning_rate <= peak_learning_rate:
            raise ValueError(
                "warmup_start_learning_rate must be in [0, peak_learning_rate="
                f"{peak_learning_rate}], got {warmup_start_learning_rate!r}")
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
        self.warmup_start_learning_rate = float(warmup_start_learning_rate)
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name or "WarmupPolynomialDecay"):
            t = tf.cast(step // self.backward_passes_per_step, tf.float32)
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
            "backward_passes_per_step": self.backward_passes_per_step,
            "warmup_start_learning_rate": self.warmup_start_learning_rate,
            "name": self.name,
        }


# .h5 files name it plainly (see lars_tf.optimizers): loadable after `import lars_tf`.
tf.keras.utils.get_custom_objects().setdefault("WarmupPolynomialDecay", WarmupPolynomialDecay)


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


IMAGENET_TRAIN_EXAMPLES = 1281167


@dataclasses.dataclass(frozen=True)
class Preset:
    """Published hyperparameters of one model at one global batch.

    ``values`` are :class:`lars_tf.TrainConfig` fields (``lars-train --preset=NAME`` sets them
    unless a flag is given). ``source`` says where the numbers were published;
    ``differences`` how that run's recipe differs from what lars_tf does with them.
    """

    name: str
    values: Mapping[str, object]
    source: str
    differences: str


def _warmup_epochs(iterations: int, global_batch_size: int) -> float:
    """The source gives warmup in iterations; lars_tf in epochs of ImageNet-1k."""
    return round(iterations * global_batch_size / IMAGENET_TRAIN_EXAMPLES, 3)


_IMAGENET = dict(dataset="imagenet", train_examples=IMAGENET_TRAIN_EXAMPLES, image_size=224,
                 num_classes=1000, optimizer="lars", momentum=0.9, trust_coefficient=0.001,
                 poly_power=2.0, label_smoothing=0.0)

_RESNET50_SOURCE = (
    "Yang You's ResNet-50 LARS settings per global batch (You is the first author of "
    "'ImageNet Training in Minutes'): github.com/fastalgo/tpu-1, "
    "models/official/resnet/lars_util.py at commit 18e82cb (2019-05-16), which cites "
    "Table 3 of arXiv:1901.08256 (You, Hseu, Ying, Demmel, Keutzer, Hsieh); 90 epochs "
    "(run.sh), momentum 0.9 and weight decay 1e-4 (configs/default.yaml), LARS eta 0.001, "
    "warmup from 0, poly power 2 to 1e-4; its network (tensorflow/tpu's resnet_model.py) "
    "starts each residual block's last BatchNorm gamma at 0. The 16K and 32K values are "
    "also those of tensorflow/tpu's lars_util.py.")
_RESNET50_DIFFERENCES = (
    "The source adds 1e-4 L2 to the loss (all but BatchNorm) and again as LARS weight decay "
    "on the LARS-scaled kernels; lars_tf applies --weight_decay once, inside LARS, not to "
    "biases and BatchNorm. It trains in bfloat16 on TPUs with Inception-style crops.")

_ALEXNET_SOURCE = (
    "The LARS authors' Caffe solvers for AlexNet-BN: github.com/borisgin/nvcaffe (B. "
    "Ginsburg's NVCaffe development fork; LARS co-author) "
    "models/alexnet_bn/solver_{8K,16k,32k}.prototxt (8K at commit 448ad5b8, 16K baac945f, "
    "32K 26d5fa3c), and for 32K also Intel Caffe's "
    "models/intel_optimized_models/multinode/alexnet_bn_64nodes/solver.prototxt (the Intel "
    "Caffe 'ImageNet Training in Minutes' names): 100 epochs, momentum 0.9, weight decay "
    "5e-4, LARS eta 0.001, warmup from 1 over the given iterations, poly power 2.")
_ALEXNET_DIFFERENCES = (
    "Caffe's poly decay counts from iteration 0 over the whole run, so right after warmup "
    "its rate is peak x (1 - W/T)^2 (8% lower at 8K, 19% at 32K) where lars_tf's is the "
    "peak; its LARS also scales and decays the biases (lars_tf excludes them); Intel Caffe "
    "also scales momentum during warmup. The network is the same (models/alexnet.py).")


def _resnet50(batch: int, peak: float, warmup_epochs: float) -> Preset:
    return Preset(
        name=f"resnet50-{batch // 1024}k",
        values=types.MappingProxyType(dict(
            _IMAGENET, model="resnet50", zero_init_residual=True, global_batch_size=batch,
            epochs=90, learning_rate=peak, warmup_epochs=warmup_epochs,
            warmup_start_learning_rate=0.0, end_learning_rate=1e-4, weight_decay=1e-4)),
        source=_RESNET50_SOURCE, differences=_RESNET50_DIFFERENCES)


def _alexnet_bn(batch: int, peak: float, warmup_iterations: int) -> Preset:
    return Preset(
        name=f"alexnet_bn-{batch // 1024}k",
        values=types.MappingProxyType(dict(
            _IMAGENET, model="alexnet_bn", global_batch_size=batch, epochs=100,
            learning_rate=peak, warmup_epochs=_warmup_epochs(warmup_iterations, batch),
            warmup_start_learning_rate=1.0, end_learning_rate=0.0, weight_decay=5e-4)),
        source=_ALEXNET_SOURCE, differences=_ALEXNET_DIFFERENCES)


PRESETS: Mapping[str, Preset] = types.MappingProxyType({p.name: p for p in (
    _resnet50(8192, 16.0, 3),
    _resnet50(16384, 25.0, 5),
    _resnet50(32768, 34.0, 12),
    _resnet50(65536, 35.0, 34),
    _alexnet_bn(8192, 10.0, 600),
    _alexnet_bn(16384, 24.0, 400),
    _alexnet_bn(32768, 32.0, 400),
)})


def preset(name: str) -> Preset:
    """The published preset ``name`` (one of :data:`PRESETS`); raises naming ``--preset``."""
    if name not in PRESETS:
        raise ValueError(f"--preset={name!r}: unknown preset; published: "
                         f"{', '.join(PRESETS)}")
    return PRESETS[name]
