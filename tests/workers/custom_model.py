"""The Python API with a user's own model and tf.data pipelines, on each of 2 ranks.

    horovodrun -np 2 python tests/workers/custom_model.py OUT_DIR
"""

import sys

import keras
import numpy as np
import tensorflow as tf

import lars_tf
from lars_tf.data import fashion_mnist

# A user's layer written in Keras 3's backend-neutral keras.ops (tf.math on Keras 2).
ops = getattr(keras, "ops", tf.math)


class LearnedSwish(tf.keras.layers.Layer):
    """x * sigmoid(beta * x) with a trainable beta: a layer of the user's own."""

    def build(self, input_shape):
        self.beta = self.add_weight(name="beta", shape=(), initializer="ones")

    def call(self, x):
        return ops.multiply(x, ops.sigmoid(ops.multiply(self.beta, x)))


class TinyNet(tf.keras.Model):
    """A subclassed model that no registry knows."""

    def __init__(self):
        super().__init__(name="tiny_net")
        self.conv = tf.keras.layers.Conv2D(16, 3, strides=2)
        self.act = LearnedSwish()
        self.norm = tf.keras.layers.BatchNormalization(momentum=0.9)
        self.flat = tf.keras.layers.Flatten()
        self.out = tf.keras.layers.Dense(10)

    def call(self, x, training=False):
        return self.out(self.flat(self.norm(self.act(self.conv(x)), training=training)))


out_dir = sys.argv[1]
world = lars_tf.init()
config = lars_tf.TrainConfig(epochs=2, global_batch_size=512, learning_rate=2.0,
                             warmup_epochs=0.5, model_dir=out_dir)
x, y = fashion_mnist.load(config.resolved_data_dir(), "train")
tx, ty = fashion_mnist.load(config.resolved_data_dir(), "test")
per_rank = config.global_batch_size // world.size


def prep(images, labels):
    return tf.cast(images, tf.float32) / 255.0, labels


train = (tf.data.Dataset.from_tensor_slices((x, y)).shard(world.size, world.rank)
         .shuffle(10000, seed=world.rank).batch(per_rank, drop_remainder=True).map(prep))
test = (tf.data.Dataset.from_tensor_slices((tx, ty)).shard(world.size, world.rank)
        .batch(1000).map(prep))
tf.keras.utils.set_random_seed(world.rank)  # different starts: the broadcast must fix them
model = TinyNet()
model.build((None, 28, 28, 1))


class LocalBatchNormStats(tf.keras.callbacks.Callback):
    """This rank's own BatchNorm moving statistics after each step; the last one is what the
    epoch end averages over ranks."""

    def on_train_batch_end(self, batch, logs=None):
        self.stats = [v.numpy() for v in model.norm.non_trainable_variables]


local = LocalBatchNormStats()
summary = lars_tf.Trainer(config, model=model).fit(train, test,
                                                   steps_per_epoch=30000 // per_rank,
                                                   callbacks=[local])
np.savez(f"{out_dir}/rank{world.rank}.npz", *model.get_weights(), beta=model.act.beta.numpy())
np.savez(f"{out_dir}/bn_rank{world.rank}.npz", local=np.stack(local.stats),
         final=np.stack([v.numpy() for v in model.norm.non_trainable_variables]))
