"""ResNet-50 v1.5 (He et al. 2016, with the stride on the 3x3 conv of each bottleneck).

25,557,032 trainable parameters in 161 tensors at 224x224x3 and 1000 classes (53
convolutions without bias, 53 BatchNorms, one dense layer), plus 53,120 BatchNorm moving
statistics.
"""

from __future__ import annotations

import tensorflow as tf

from lars_tf.layers import BatchNormalization
from lars_tf.models import register

layers = tf.keras.layers
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (filters, blocks, stride)


def _conv_bn(x, filters, kernel, stride, name, relu=True, zero_gamma=False):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn",
                                  gamma_initializer="zeros" if zero_gamma else "ones")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _bottleneck(x, filters, stride, name, zero_init_residual):
    shortcut = x
    if stride != 1 or x.shape[-1] != 4 * filters:
        shortcut = _conv_bn(x, 4 * filters, 1, stride, f"{name}_proj", relu=False)
    y = _conv_bn(x, filters, 1, 1, f"{name}_1")
    y = _conv_bn(y, filters, 3, stride, f"{name}_2")  # v1.5: the stride sits here
    y = _conv_bn(y, 4 * filters, 1, 1, f"{name}_3", relu=False, zero_gamma=zero_init_residual)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


@register("resnet50")
def resnet50(input_shape=(224, 224, 3), num_classes: int = 1000,
             zero_init_residual: bool = False) -> tf.keras.Model:
    """ResNet-50 v1.5; ``zero_init_residual`` starts each block's last BatchNorm gamma at 0
    (each residual block begins as the identity, which helps the first large-batch steps)."""
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, 64, 7, 2, "stem")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for s, (filters, blocks, stride) in enumerate(STAGES):
        for b in range(blocks):
            x = _bottleneck(x, filters, stride if b == 0 else 1, f"stage{s + 1}_block{b + 1}",
                            zero_init_residual)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, dtype="float32", name="logits",
                           kernel_initializer=tf.keras.initializers.RandomNormal(stddev=0.01))(x)
    return tf.keras.Model(inputs, outputs, name="resnet50")


def _basic_block(x, filters, stride, name):
    y = _conv_bn(x, filters, 3, stride, f"{name}_1")
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", relu=False)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        # He et al.'s option A: subsample and zero-pad the channels, no parameters
        pad = filters - x.shape[-1]
        shortcut = layers.Lambda(
            lambda t: tf.pad(t[:, ::stride, ::stride, :], [[0, 0], [0, 0], [0, 0], [0, pad]]),
            name=f"{name}_shortcut")(x)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


@register("resnet20")
def resnet20(input_shape=(32, 32, 3), num_classes: int = 10) -> tf.keras.Model:
    """ResNet-20 for 28-32 px images (He et al. 2016, section 4.2): three stages of three
    basic blocks (16, 32, 64 filters), parameter-free shortcuts. 269,722 trainable parameters
    at 32x32x3 and 10 classes."""
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, 16, 3, 1, "stem")
    for s, filters in enumerate((16, 32, 64)):
        for b in range(3):
            x = _basic_block(x, filters, 2 if (b == 0 and s > 0) else 1,
                             f"stage{s + 1}_block{b + 1}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="resnet20")
