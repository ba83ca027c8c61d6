"""Builders: the schedule, the optimizer stack, the model and the loss of a ``TrainConfig``."""

from __future__ import annotations

import tensorflow as tf

from lars_tf import models, optimizer_builders
from lars_tf import precision as precision_lib
from lars_tf.config import BUCKET_MB, TrainConfig
from lars_tf.data import preprocessing
from lars_tf.distributed_optimizer import DistributedOptimizer
from lars_tf.schedules import WarmupPolynomialDecay


def build_schedule(config: TrainConfig, steps_per_epoch: int) -> WarmupPolynomialDecay:
    """Warmup + polynomial decay over the run, in weight updates.

    ``steps_per_epoch`` counts backward passes (what ``model.fit`` runs); with gradient
    accumulation an epoch has ``steps_per_epoch / backward_passes_per_step`` updates.
    """
    k = config.backward_passes_per_step
    updates_per_epoch = max(1, steps_per_epoch // k)
    total = config.epochs * updates_per_epoch
    return WarmupPolynomialDecay(
        peak_learning_rate=config.learning_rate,
        warmup_steps=min(total, int(round(config.warmup_epochs * updates_per_epoch))),
        total_steps=total,
        end_learning_rate=config.end_learning_rate,
        power=config.poly_power,
        warmup_start_learning_rate=config.warmup_start_learning_rate,
    )


def build_local_optimizer(config: TrainConfig,
                          steps_per_epoch: int) -> tf.keras.optimizers.Optimizer:
    """The single-process optimizer of ``config`` (no Horovod): ``--optimizer``'s builder
    (``lars_tf.optimizer_builders``: LARS, or a baseline) on the run's schedule."""
    return optimizer_builders.build(config, build_schedule(config, steps_per_epoch))


def wrap_optimizer(
    optimizer: tf.keras.optimizers.Optimizer,
    *,
    precision: str = "fp32",
    fp16_allreduce: bool = False,
    backward_passes_per_step: int = 1,
    gradient_predivide_factor: float = 1.0,
    sparse_as_dense: bool | None = None,
    noise_scale_every: int = 0,
    bucket_mb: float = BUCKET_MB,
) -> tf.keras.optimizers.Optimizer:
    """The distributed optimizer stack around a local optimizer (LARS), the same on both
    stacks: one optimizer that all-reduces and, for mixed_float16, scales the loss around
    the all-reduce (see ``lars_tf.distributed_optimizer``)::

        lars_tf.DistributedOptimizer(       # all-reduce (mean) of the scaled gradients,
            optimizer,                      # then unscale, skip on Inf/NaN
            loss_scale="dynamic")           # only for mixed_float16

    Gradients cross the wire scaled, which is what keeps small ones alive under
    ``fp16_allreduce``, and the overflow check runs on the all-reduced gradients, so every
    rank skips the same steps (see ``lars_tf.precision``). It is a loss-scale optimizer at
    the top, so Keras' ``compile`` adds none of its own.

    With ``backward_passes_per_step = k`` each rank accumulates ``k`` local gradients and
    all-reduces their mean once; the loss scale then decides once per update, and
    ``optimizer`` (its schedule) counts updates. ``gradient_predivide_factor`` divides
    gradients by that factor before the sum and by ``size / factor`` after it (the same
    mean, another rounding).

    ``sparse_as_dense`` all-reduces sparse gradients (``tf.IndexedSlices``, from an
    ``Embedding``) as dense tensors, as Horovod's option of that name. ``None`` (the
    default) turns it on exactly when accumulation or a predivide factor is used, which
    need dense tensors; otherwise sparse gradients are all-gathered, as Horovod does.
    ``noise_scale_every``: measure the gradient noise scale on every N-th update (0: off).
    ``bucket_mb``: the size of the all-reduce's buckets (0: one op per gradient).
    """
    return DistributedOptimizer(
        optimizer,
        compression="fp16" if fp16_allreduce else "none",
        backward_passes_per_step=backward_passes_per_step,
        gradient_predivide_factor=gradient_predivide_factor,
        sparse_as_dense=sparse_as_dense,
        loss_scale="dynamic" if precision_lib.needs_loss_scaling(precision) else "none",
        noise_scale_every=noise_scale_every, bucket_mb=bucket_mb)


def build_optimizer(config: TrainConfig, steps_per_epoch: int) -> tf.keras.optimizers.Optimizer:
    """The full stack for a Horovod run: LARS (or the SGD baseline) with the all-reduce
    and, for ``mixed_float16``, dynamic loss scaling around it (see
    ``wrap_optimizer``). Call after ``lars_tf.init()``.

    ``steps_per_epoch`` counts backward passes per epoch on one rank."""
    return wrap_optimizer(
        build_local_optimizer(config, steps_per_epoch),
        precision=config.precision,
        fp16_allreduce=config.fp16_allreduce,
        backward_passes_per_step=config.backward_passes_per_step,
        gradient_predivide_factor=config.gradient_predivide_factor,
        sparse_as_dense=True if config.sparse_as_dense else None,
        noise_scale_every=config.noise_scale_every,
        bucket_mb=config.bucket_mb,
    )


def build_model(config: TrainConfig, input_shape, num_classes: int) -> tf.keras.Model:
    """The registered model ``config.model`` with the builder options the config asks for
    (``zero_init_residual``); an option the model does not take is a ``ValueError``."""
    options = {"zero_init_residual": config.zero_init_residual}
    models.check_options(config.model, **options)
    return models.get(config.model, input_shape, num_classes,
                      **{k: v for k, v in options.items() if v})


def build_loss(num_classes: int, label_smoothing: float = 0.0):
    """Cross-entropy on logits and integer labels, with optional label smoothing."""
    if not label_smoothing:
        return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    smoothed = tf.keras.losses.CategoricalCrossentropy(from_logits=True,
                                                       label_smoothing=label_smoothing)

    def loss(labels, logits):
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        return smoothed(tf.one_hot(labels, num_classes), logits)

    return loss


def top_k_accuracy(k: int, name: str) -> tf.keras.metrics.Metric:
    """Top-k accuracy on integer labels, for logits of any float dtype (Keras 3's own metric
    refuses float16 logits, which a model under ``mixed_float16`` may return)."""
    def top_k(labels, logits):
        return tf.keras.metrics.sparse_top_k_categorical_accuracy(
            labels, tf.cast(logits, tf.float32), k=k)

    return tf.keras.metrics.MeanMetricWrapper(top_k, name=name)


def num_classes(model: tf.keras.Model, input_shape) -> int:
    """Width of the model's logits; a subclassed model has no symbolic outputs, so it is
    asked once on a zero image."""
    if getattr(model, "outputs", None):
        return int(model.outputs[0].shape[-1])
    return int(model(tf.zeros((1, *input_shape)), training=False).shape[-1])


class NormalizePixels(tf.keras.layers.Layer):
    """uint8 pixels -> images normalised as ``preprocessing.normalize`` does, in the
    layer's compute dtype (cast after the float32 arithmetic): the first layer of a model
    fed by ``--normalize_on_device``, so the host sends bytes and the accelerator does the
    arithmetic."""

    def call(self, images):
        x = tf.cast(images, tf.float32)
        inv_std = tf.constant([1.0 / s for s in preprocessing.IMAGENET_STD], tf.float32)
        return tf.cast((x - tf.constant(preprocessing.IMAGENET_MEAN, tf.float32)) * inv_std,
                       self.compute_dtype)


def with_pixel_normalization(model: tf.keras.Model, input_shape) -> tf.keras.Model:
    """``model`` behind a ``NormalizePixels`` layer: takes uint8 images of ``input_shape``.
    The wrapper adds no variables (a checkpoint of ``model`` is unchanged)."""
    inputs = tf.keras.Input(tuple(input_shape), dtype="uint8", name="pixels")
    return tf.keras.Model(inputs, model(NormalizePixels(name="normalize_pixels")(inputs)),
                          name=f"{model.name}_on_pixels")
