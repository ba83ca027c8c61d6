"""The model zoo: parameter counts, LARS' exclusions, one real training step each."""

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import LARS, TrainConfig, keras_compat, models


def _trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


@pytest.mark.parametrize("name, shape, classes, params, tensors", [
    # ResNet-50 v1.5: the published 25,557,032 (torchvision's count of trainable parameters)
    ("resnet50", (224, 224, 3), 1000, 25_557_032, 161),
    # AlexNet's published 60,965,224 (two towers as groups); its BatchNorm has no
    # scale/shift: 8 weight + 8 bias tensors
    ("alexnet_bn", (224, 224, 3), 1000, 60_965_224, 16),
    # He et al.'s CIFAR ResNet-20: 0.27M
    ("resnet20", (32, 32, 3), 10, 269_722, 59),
])
def test_parameter_counts(name, shape, classes, params, tensors):
    model = models.get(name, shape, classes)
    assert _trainable(model) == params
    assert len(model.trainable_variables) == tensors


@pytest.mark.parametrize("name", ["resnet50", "alexnet_bn", "resnet20", "small_cnn", "mlp"])
def test_lars_exclusions_catch_exactly_bias_and_batchnorm(name):
    shape = (224, 224, 3) if name in ("resnet50", "alexnet_bn") else (28, 28, 1)
    model = models.get(name, shape, 10)
    norm_or_bias = {id(w) for layer in model.layers for w in layer.trainable_weights
                    if isinstance(layer, tf.keras.layers.BatchNormalization)
                    or (getattr(layer, "bias", None) is not None and w is layer.bias)}
    opt = LARS(weight_decay=1e-4)
    for v in model.trainable_variables:
        excluded = id(v) in norm_or_bias
        assert opt.uses_weight_decay(v) is not excluded, v.name
        assert opt.uses_layer_adaptation(v) is not excluded, v.name


@pytest.mark.parametrize("name", ["resnet50", "alexnet_bn"])
def test_one_training_step_on_synthetic_data(name):
    tf.keras.utils.set_random_seed(0)
    model = models.get(name, (224, 224, 3), 1000)
    x = tf.random.normal((2, 224, 224, 3))
    y = tf.constant([3, 999])
    model.compile(optimizer=LARS(learning_rate=1.0, weight_decay=5e-5),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy() for v in model.trainable_variables]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    frozen = [v.name for a, v in zip(before, model.trainable_variables)
              if np.array_equal(a, v.numpy())]
    assert not frozen, f"{len(frozen)} tensors did not move: {frozen}"


def _last_gammas(model):
    return [v.numpy() for v in model.trainable_variables
            if "_3_bn/gamma" in keras_compat.variable_path(v)]


def test_zero_init_residual_and_unknown_model():
    model = models.get("resnet50", (64, 64, 3), 10, zero_init_residual=True)
    assert len(_last_gammas(model)) == 16 and not any(g.any() for g in _last_gammas(model))
    with pytest.raises(ValueError, match="--model='resnet51'"):
        models.get("resnet51", (32, 32, 3), 10)
    for asked in (True, False):  # an unknown model is named whatever the options
        with pytest.raises(ValueError, match="--model='resnet51'"):
            models.check_options("resnet51", zero_init_residual=asked)


def test_zero_init_residual_from_the_config():
    from lars_tf.build import build_model

    # the resnet50 presets ask for it, as their source network does; the default does not
    preset = build_model(TrainConfig.from_preset("resnet50-8k"), (64, 64, 3), 10)
    assert len(_last_gammas(preset)) == 16 and not any(g.any() for g in _last_gammas(preset))
    plain = build_model(TrainConfig(model="resnet50"), (64, 64, 3), 10)
    assert all((g == 1).all() for g in _last_gammas(plain))
    # a model without residual blocks refuses it, naming the flag and the models that take it
    models.check_options("small_cnn", zero_init_residual=False)
    with pytest.raises(ValueError, match=r"--zero_init_residual: --model=small_cnn does not "
                                         r"take it \(models that do: resnet50\)"):
        build_model(TrainConfig(zero_init_residual=True), (28, 28, 1), 10)
    # nor can it be asked of a model the user built (refused before Horovod starts)
    from lars_tf.train import Trainer

    with pytest.raises(ValueError, match="--zero_init_residual applies to registered models"):
        Trainer(TrainConfig(zero_init_residual=True), model=plain)
