"""AlexNet-BN as the LARS authors trained it at 8K-32K batch (You, Gitman, Ginsburg 2017;
You et al., "ImageNet Training in Minutes").

The layers of their Caffe net (``models/alexnet_bn/train_val2.prototxt`` in B. Ginsburg's
NVCaffe fork, github.com/borisgin/nvcaffe; the same in Intel Caffe's
``alexnet_bn_*nodes/train_val2.prototxt``): AlexNet's two towers as
grouped convolutions (conv2, conv4 and conv5 in 2 groups), LRN replaced by BatchNorm without
scale or shift in front of conv2-conv5, a bias on every conv and dense layer, dropout 0.5
after fc6 and fc7. One change: conv1 pads 'same' on 224x224 inputs where Caffe crops 227
and does not pad; both reach 6x6x256 before fc6. Weights start from Keras' defaults (Glorot
uniform, zero biases), not Caffe's gaussian(0.01). At 224x224x3 and 1000 classes: 60,965,224
trainable parameters.
"""

from __future__ import annotations

import tensorflow as tf

from lars_tf.layers import BatchNormalization
from lars_tf.models import register

layers = tf.keras.layers


@register("alexnet_bn")
def alexnet_bn(input_shape=(224, 224, 3), num_classes: int = 1000,
               dropout: float = 0.5) -> tf.keras.Model:
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = inputs
    # (filters, kernel, stride, groups, max-pool after it)
    convs = ((96, 11, 4, 1, True), (256, 5, 1, 2, True), (384, 3, 1, 1, False),
             (384, 3, 1, 2, False), (256, 3, 1, 2, True))
    for i, (filters, kernel, stride, groups, pool) in enumerate(convs, start=1):
        if i > 1:  # Caffe: moving_average_fraction 0.9, eps 1e-4, no scale/bias
            x = BatchNormalization(momentum=0.9, epsilon=1e-4, center=False,
                                          scale=False, name=f"bn{i}")(x)
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", groups=groups,
                          name=f"conv{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        if pool:
            x = layers.MaxPooling2D(3, strides=2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    for i in (6, 7):
        x = layers.Dense(4096, name=f"fc{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.Dropout(dropout, name=f"drop{i}")(x)
    outputs = layers.Dense(num_classes, dtype="float32", name="fc8")(x)
    return tf.keras.Model(inputs, outputs, name="alexnet_bn")
