"""The published LARS presets: values, where they come from, how lars_tf differs from them.

Plain data (no TensorFlow): ``lars-train --preset=NAME`` and ``TrainConfig.from_preset``
read them.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

from absl import logging

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


def log_preset(config) -> None:
    """Say which published preset the run started from and where it departs from it."""
    chosen = preset(config.preset)
    changed = {k: (getattr(config, k), v) for k, v in chosen.values.items()
               if getattr(config, k) != v}
    logging.info("preset %s (its source: lars_tf.presets.PRESETS[%r].source); changed "
                 "from it: %s", chosen.name, chosen.name,
                 ", ".join(f"{k}={now!r} (preset {was!r})" for k, (now, was)
                           in changed.items()) or "nothing")
    tuned_for = {"dataset", "global_batch_size", "epochs", "train_examples"} & changed.keys()
    if tuned_for:
        logging.warning(
            "preset %s was tuned for %s: with %s changed, its learning rate and warmup are "
            "only a starting point", chosen.name,
            ", ".join(f"{k}={chosen.values[k]}" for k in sorted(tuned_for)),
            ", ".join(sorted(tuned_for)))
