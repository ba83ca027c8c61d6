"""Builders: the schedule, the optimizer stack, the model and the loss of a ``TrainConfig``."""

from __future__ import annotations

import tensorflow as tf

from lars_tf import distributed, models
from lars_tf.config import TrainConfig
from lars_tf.data import preprocessing
from lars_tf.optimizers import DEFAULT_EXCLUDE, LARS
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
    """The single-process optimizer of ``config`` (no Horovod): LARS, or a baseline.

    ``--optimizer=sgd`` is momentum SGD with the same weight-decay rule and exclusions as
    LARS, only without the trust ratio, so that the two differ in exactly one thing;
    ``nesterov`` the same with Nesterov momentum. ``lamb`` is Keras 3's LAMB (Adam's
    moments with a layer-wise trust ratio) with ``--momentum`` as its ``beta_1``, and
    ``--weight_decay`` decoupled (Keras' rule), on the same variables as LARS' (biases and
    normalisation parameters excluded). All take the same schedule.
    """
    schedule = build_schedule(config, steps_per_epoch)
    if config.optimizer == "lamb":
        import keras

        lamb = keras.optimizers.Lamb(learning_rate=schedule, beta_1=config.momentum,
                                     epsilon=1e-6, weight_decay=config.weight_decay or None)
        lamb.exclude_from_weight_decay(var_names=list(DEFAULT_EXCLUDE))
        return lamb
    kwargs = dict(
        learning_rate=schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        trust_coefficient=config.trust_coefficient,
    )
    if config.optimizer in ("sgd", "nesterov"):
        return LARS(exclude_from_layer_adaptation=(".*",), nesterov=config.optimizer == "nesterov",
                    name="NesterovSGD" if config.optimizer == "nesterov" else "SGD", **kwargs)
    return LARS(**kwargs)


def build_optimizer(config: TrainConfig, steps_per_epoch: int) -> tf.keras.optimizers.Optimizer:
    """The full stack for a Horovod run: LARS (or the SGD baseline) with the all-reduce
    and, for ``mixed_float16``, dynamic loss scaling around it (see
    ``lars_tf.distributed.wrap_optimizer``). Call after ``lars_tf.init()``.

    ``steps_per_epoch`` counts backward passes per epoch on one rank."""
    return distributed.wrap_optimizer(
        build_local_optimizer(config, steps_per_epoch),
        precision=config.precision,
        fp16_allreduce=config.fp16_allreduce,
        backward_passes_per_step=config.backward_passes_per_step,
        gradient_predivide_factor=config.gradient_predivide_factor,
        sparse_as_dense=True if config.sparse_as_dense else None,
        noise_scale_every=config.noise_scale_every,
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
