"""A user's model with an Embedding (sparse gradients) on 2 ranks, with accumulation and a
gradient predivide factor, through the Python API.

    horovodrun -np 2 python tests/workers/embedding.py OUT_DIR
"""

import sys

import numpy as np
import tensorflow as tf

import lars_tf
from lars_tf.data import fashion_mnist

out_dir = sys.argv[1]
world = lars_tf.init()
config = lars_tf.TrainConfig(epochs=2, global_batch_size=512, learning_rate=1.0,
                             warmup_epochs=0.5, backward_passes_per_step=2,
                             gradient_predivide_factor=2.0, deterministic=True,
                             progress_bar=False)
x, y = fashion_mnist.load(config.resolved_data_dir(), "train")
tx, ty = fashion_mnist.load(config.resolved_data_dir(), "test")
per_pass = config.per_rank_batch_size(world.size)


def tokens(images, labels):  # each pixel's grey level, in 16 steps, is a token
    return tf.reshape(tf.cast(images, tf.int32) // 16, [-1, 28 * 28]), labels


train = (tf.data.Dataset.from_tensor_slices((x[:8192], y[:8192])).shard(world.size, world.rank)
         .batch(per_pass, drop_remainder=True).map(tokens))
test = tf.data.Dataset.from_tensor_slices((tx[:2000], ty[:2000])).shard(
    world.size, world.rank).batch(1000).map(tokens)
tf.keras.utils.set_random_seed(world.rank)  # different starts: the broadcast must fix them
model = tf.keras.Sequential([
    tf.keras.Input((28 * 28,), dtype=tf.int32), tf.keras.layers.Embedding(16, 4),
    tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)])
steps = (8192 // world.size // per_pass) // 2 * 2
summary = lars_tf.Trainer(config, model=model).fit(train, test, steps_per_epoch=steps)
np.savez(f"{out_dir}/rank{world.rank}.npz", *model.get_weights())
print(f"rank {world.rank}: test accuracy {summary['final_test_accuracy']:.4f}")
