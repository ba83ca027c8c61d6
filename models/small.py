"""Small models for 28-32 px images: quick enough for 2 CPU cores."""

from __future__ import annotations

import tensorflow as tf

from lars_tf.layers import BatchNormalization
from lars_tf.models import register

layers = tf.keras.layers


@register("small_cnn")
def small_cnn(input_shape, num_classes: int, width: int = 32) -> tf.keras.Model:
    """Two conv-BN-ReLU-pool stages and a dense head; logits out, in float32.

    About 0.42M parameters at 28x28x1 with width 32.
    """
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = inputs
    for i, filters in enumerate((width, 2 * width)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        # Few steps per epoch at large batch: the moving averages must follow quickly.
        x = BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = layers.ReLU(name=f"relu{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(4 * width, activation="relu", name="fc1")(x)
    outputs = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="small_cnn")


@register("mlp")
def mlp(input_shape, num_classes: int, hidden: int = 128) -> tf.keras.Model:
    """A one-hidden-layer perceptron without BatchNorm: its update on a global batch does not
    depend on how the batch is split over ranks, which makes it the model for equivalence
    tests."""
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = layers.Flatten(name="flatten")(inputs)
    x = layers.Dense(hidden, activation="relu", name="fc1")(x)
    outputs = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="mlp")
