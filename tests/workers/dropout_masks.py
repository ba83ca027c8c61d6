"""Each rank's dropout mask on its last training step, through the Python API.

    horovodrun -np 2 python tests/workers/dropout_masks.py OUT_DIR
"""

import sys

import numpy as np
import tensorflow as tf

import lars_tf
from lars_tf.data import fashion_mnist


class Probe(tf.keras.layers.Layer):
    """Keeps which units of the first example survived dropout in its last training call."""

    def build(self, input_shape):
        self.kept = self.add_weight(name="kept", shape=input_shape[1:], dtype=tf.int32,
                                    initializer="zeros", trainable=False)

    def call(self, x, training=None):
        if training:
            self.kept.assign(tf.cast(tf.not_equal(x[0], 0), tf.int32))
        return x


out_dir = sys.argv[1]
config = lars_tf.TrainConfig(model="mlp", epochs=1, global_batch_size=1024, learning_rate=1.0,
                             warmup_epochs=0.5, deterministic=True, progress_bar=False)
world = lars_tf.init()
model = tf.keras.Sequential([
    tf.keras.Input((28, 28, 1)), tf.keras.layers.Flatten(), tf.keras.layers.Dense(256),
    tf.keras.layers.Dropout(0.5), Probe(), tf.keras.layers.Dense(10)])
x, y = fashion_mnist.load(config.resolved_data_dir(), "train")
per_rank = config.per_rank_batch_size(world.size)
train = (tf.data.Dataset.from_tensor_slices((x[:4096], y[:4096])).shard(world.size, world.rank)
         .batch(per_rank, drop_remainder=True).map(lambda a, b: (tf.cast(a, tf.float32), b)))
lars_tf.Trainer(config, model=model).fit(train, None,
                                         steps_per_epoch=4096 // world.size // per_rank)
np.save(f"{out_dir}/kept_rank{world.rank}.npy", model.layers[-2].kept.numpy())
