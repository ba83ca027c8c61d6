"""mixed_float16 training of a model whose output is always NaN, through the Python API
with lars-train's exit codes (one process).

    python tests/workers/nan_model.py MAX_SKIPPED_UPDATES
"""

import sys

import tensorflow as tf

import lars_tf
from lars_tf.cli import run_with_exit_codes
from lars_tf.data import fashion_mnist

config = lars_tf.TrainConfig(model="mlp", precision="mixed_float16", epochs=2,
                             global_batch_size=256, warmup_epochs=0.5, progress_bar=False,
                             max_skipped_updates=int(sys.argv[1]))
trainer = lars_tf.Trainer(config)  # sets the mixed_float16 policy before the model is built
model = tf.keras.Sequential([
    tf.keras.Input((28, 28, 1)), tf.keras.layers.Flatten(), tf.keras.layers.Dense(10),
    tf.keras.layers.Lambda(lambda x: x * float("nan"))])
trainer.model = model
# 16 updates per epoch on 4096 images
x, y = fashion_mnist.load(config.resolved_data_dir(), "train")
train = tf.data.Dataset.from_tensor_slices((x[:4096], y[:4096])).batch(256).map(
    lambda a, b: (tf.cast(a, tf.float32), b))
run_with_exit_codes(config, lambda: trainer.fit(train, None, steps_per_epoch=16))
print("training ended without stopping")
