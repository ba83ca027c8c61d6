"""AlexNet-BN: AlexNet (Krizhevsky et al. 2012, one tower) with BatchNorm instead of LRN,
as trained at 8K-32K batch with LARS by You et al.

BatchNorm follows conv1-conv5, fc6 and fc7 (which therefore have no bias); fc6 and fc7 keep
dropout 0.5. At 224x224x3 (conv1 'same' padding gives the classic 6x6x256 before fc6) and
1000 classes: 62,387,912 trainable parameters.
"""

from __future__ import annotations

import tensorflow as tf

from lars_tf.models import register

layers = tf.keras.layers


def _bn_relu(x, name):
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


@register("alexnet_bn")
def alexnet_bn(input_shape=(224, 224, 3), num_classes: int = 1000,
               dropout: float = 0.5) -> tf.keras.Model:
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = inputs
    convs = ((96, 11, 4, True), (256, 5, 1, True), (384, 3, 1, False), (384, 3, 1, False),
             (256, 3, 1, True))
    for i, (filters, kernel, stride, pool) in enumerate(convs, start=1):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                          name=f"conv{i}")(x)
        x = _bn_relu(x, f"conv{i}")
        if pool:
            x = layers.MaxPooling2D(3, strides=2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    for i in (6, 7):
        x = layers.Dense(4096, use_bias=False, name=f"fc{i}")(x)
        x = _bn_relu(x, f"fc{i}")
        x = layers.Dropout(dropout, name=f"drop{i}")(x)
    outputs = layers.Dense(num_classes, dtype="float32", name="fc8")(x)
    return tf.keras.Model(inputs, outputs, name="alexnet_bn")
