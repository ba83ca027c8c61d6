"""Layers: Keras' BatchNormalization computed by TensorFlow's fused kernel (TF/Keras only).

Keras 3's ``BatchNormalization`` computes the batch moments and the normalisation as
separate ops (``Mean``, ``SquaredDifference``, ``Mul``, ``Sub``, ... forward and backward),
where Keras 2 ran one ``FusedBatchNormV3`` kernel each way: on a 2-core CPU those ops took
about a third of a ``small_cnn`` training step's op time on Keras 3 (``benchmarks/RESULTS.md``,
"Where a training step's time goes"). ``lars_tf.layers.BatchNormalization`` is the same
layer, with the same variables, arguments and results, whose ``call`` runs the fused kernel
wherever it applies. On Keras 2 it is Keras' own layer, which is fused already.
"""

from __future__ import annotations

import tensorflow as tf

from lars_tf import keras_compat

if keras_compat.KERAS3:
    import keras

    # cuDNN's fused kernel takes no smaller epsilon (Keras 2 raised smaller ones to it);
    # the CPU kernel takes any
    _GPU_MIN_EPSILON = 1.001e-5
    _FUSED_DTYPES = ("float16", "bfloat16", "float32")

    @keras.saving.register_keras_serializable(package="lars_tf")
    class BatchNormalization(keras.layers.BatchNormalization):
        """``keras.layers.BatchNormalization``, computed by TensorFlow's fused batch-norm
        kernel (``FusedBatchNormV3``, forward and backward) for inputs of rank 2 or 4 with
        the channels last (``axis=-1``), without mask or renorm (on a GPU, also an
        ``epsilon`` of at least 1.001e-5, cuDNN's limit); other calls go to Keras' own
        computation. The results are Keras':
        the moving variance is updated with the batch's biased variance (the kernel's
        Bessel-corrected one, rescaled), and float16/bfloat16 inputs are normalised in
        float32 and returned in the layer's compute dtype.

        A drop-in replacement: the same variables (``gamma``, ``beta``, ``moving_mean``,
        ``moving_variance``), so weights and checkpoints move between the two.

        >>> bn = BatchNormalization(momentum=0.9)
        >>> y = bn(tf.random.normal((8, 4, 4, 3)), training=True)
        >>> tuple(y.shape)
        (8, 4, 4, 3)
        """

        def _fused(self, inputs, mask) -> bool:
            rank = len(inputs.shape)
            return (mask is None and not self.renorm and not self.synchronized
                    and rank in (2, 4) and self.axis in (-1, rank - 1)
                    and (self.epsilon >= _GPU_MIN_EPSILON
                         or not tf.config.list_physical_devices("GPU"))
                    and keras.backend.standardize_dtype(inputs.dtype) in _FUSED_DTYPES)

        def call(self, inputs, training=None, mask=None):
            if not self._fused(inputs, mask):
                return super().call(inputs, training=training, mask=mask)
            x = tf.convert_to_tensor(inputs)
            flat = len(x.shape) == 2
            if flat:  # [N, C] as a 1x1 image
                x = x[:, tf.newaxis, tf.newaxis, :]
            channels = x.shape[-1]
            gamma = tf.cast(self.gamma, tf.float32) if self.scale \
                else tf.ones([channels], tf.float32)
            beta = tf.cast(self.beta, tf.float32) if self.center \
                else tf.zeros([channels], tf.float32)
            if training and self.trainable:
                y, mean, corrected, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                    x=x, scale=gamma, offset=beta, mean=tf.zeros([0], tf.float32),
                    variance=tf.zeros([0], tf.float32), epsilon=self.epsilon,
                    exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
                # the kernel's batch variance is Bessel-corrected; Keras' moving
                # variance follows the biased one
                n = tf.cast(tf.size(x) // channels, tf.float32)
                variance = corrected * tf.maximum(n - 1.0, 0.0) / n
                m = self.momentum
                self.moving_mean.assign(tf.cast(self.moving_mean, tf.float32) * m
                                        + mean * (1.0 - m))
                self.moving_variance.assign(tf.cast(self.moving_variance, tf.float32) * m
                                            + variance * (1.0 - m))
            else:
                y = tf.raw_ops.FusedBatchNormV3(
                    x=x, scale=gamma, offset=beta,
                    mean=tf.cast(self.moving_mean, tf.float32),
                    variance=tf.cast(self.moving_variance, tf.float32),
                    epsilon=self.epsilon, data_format="NHWC", is_training=False)[0]
            if flat:
                y = y[:, 0, 0, :]
            return tf.cast(y, self.compute_dtype)
else:
    BatchNormalization = tf.keras.layers.BatchNormalization
