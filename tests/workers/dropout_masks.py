"""Each rank's dropout mask on its last training step of 2 epochs, and its final weights,
through the Python API.

    horovodrun -np 2 python tests/workers/dropout_masks.py OUT_DIR [stop|resume]

stop: train epoch 1 only (checkpoint in OUT_DIR/model); resume: go on from it to epoch 2.
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
part = sys.argv[2] if len(sys.argv) > 2 else ""
config = lars_tf.TrainConfig(model="mlp", epochs=2, global_batch_size=1024, learning_rate=1.0,
                             warmup_epochs=0.5, deterministic=True, progress_bar=False,
                             model_dir=f"{out_dir}/model", stop_after_epoch=int(part == "stop"),
                             resume=part == "resume")
world = lars_tf.init(deterministic=True)  # one op at a time: two runs repeat each other
tf.keras.utils.set_random_seed(config.seed)  # the same initial weights in every run
model = tf.keras.Sequential([
    tf.keras.Input((28, 28, 1)), tf.keras.layers.Flatten(), tf.keras.layers.Dense(256),
    tf.keras.layers.Dropout(0.5), Probe(), tf.keras.layers.Dense(10)])
x, y = fashion_mnist.load(config.resolved_data_dir(), "train")
per_rank = config.per_rank_batch_size(world.size)
train = (tf.data.Dataset.from_tensor_slices((x[:4096], y[:4096])).shard(world.size, world.rank)
         .batch(per_rank, drop_remainder=True)
         .map(lambda a, b: (tf.cast(a, tf.float32) / 255.0, b)))
lars_tf.Trainer(config, model=model).fit(train, None,
                                         steps_per_epoch=4096 // world.size // per_rank)
np.save(f"{out_dir}/kept_rank{world.rank}.npy", model.layers[-2].kept.numpy())
np.savez(f"{out_dir}/weights_rank{world.rank}.npz", *model.get_weights())
