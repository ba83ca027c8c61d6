"""lars_tf.layers.BatchNormalization: Keras' layer, computed by the fused kernel."""

import numpy as np
import pytest
import tensorflow as tf

pytestmark = pytest.mark.keras3_only  # Keras 2's own BatchNormalization is fused already


def _op_types(fn, *args) -> set[str]:
    return {op.type for op in tf.function(fn).get_concrete_function(*args).graph
            .get_operations()}


@pytest.mark.parametrize("shape", [(16, 6, 6, 5), (32, 7)])
@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_the_fused_layer_equals_keras_own(shape, policy):
    """Outputs, moving statistics and gradients (inputs, gamma, beta) of one training step,
    and inference outputs, equal Keras' BatchNormalization's; the fused kernel runs."""
    import keras

    from lars_tf.layers import BatchNormalization

    keras.mixed_precision.set_global_policy(policy)
    try:
        x = tf.random.normal(shape, seed=1) * 3 + 1
        ours, theirs = BatchNormalization(momentum=0.9), keras.layers.BatchNormalization(
            momentum=0.9)
        for layer in (ours, theirs):
            layer.build(shape)
        rng = np.random.default_rng(0)
        for a, b in zip(theirs.weights, ours.weights):
            assert a.path.split("/")[-1] == b.path.split("/")[-1]  # the same variables
            value = rng.normal(size=a.shape).astype(np.float32)
            if "variance" in a.path:
                value = np.abs(value) + 0.5
            a.assign(value)
            b.assign(value)
        x = tf.cast(x, ours.compute_dtype)
        results = []
        for layer in (theirs, ours):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
            grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
            results.append([y, *grads, layer.moving_mean, layer.moving_variance,
                            layer(x, training=False)])
        assert results[1][0].dtype == results[0][0].dtype
        tol = 1e-5 if policy == "float32" else 1e-2
        for a, b in zip(*results):
            a, b = (np.asarray(tf.cast(v, tf.float32)) for v in (a, b))
            np.testing.assert_allclose(b, a, rtol=tol, atol=tol * max(1.0, np.abs(a).max()))
        assert "FusedBatchNormV3" in _op_types(lambda t: ours(t, training=True), x)
        assert "FusedBatchNormV3" not in _op_types(lambda t: theirs(t, training=True), x)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_what_the_kernel_cannot_do_goes_to_keras_and_the_models_use_the_layer():
    import keras

    from lars_tf import models
    from lars_tf.layers import BatchNormalization

    channels_first = BatchNormalization(axis=1)
    x = tf.random.normal((4, 3, 5, 5))
    assert "FusedBatchNormV3" not in _op_types(lambda t: channels_first(t, training=True), x)
    np.testing.assert_allclose(channels_first(x, training=True),
                               keras.layers.BatchNormalization(axis=1)(x, training=True),
                               atol=1e-5)
    for name, shape in (("small_cnn", (28, 28, 1)), ("resnet50", (32, 32, 3)),
                        ("alexnet_bn", (64, 64, 3))):
        model = models.get(name, shape, 10)
        norms = [la for la in model.layers if "normalization" in type(la).__name__.lower()]
        assert norms and all(isinstance(la, BatchNormalization) for la in norms), name
