"""A rank of a short real training run; writes its weights before and after to OUT_DIR.

    horovodrun -np 2 python tests/workers/train_dump.py OUT_DIR [FIELD=VALUE ...]

FIELD=VALUE pairs override the TrainConfig below (e.g. precision=mixed_float16). Each rank
initialises its model from a different seed, so that identical weights at the end can only
come from Horovod's broadcast plus all-reduced gradients.
"""

import dataclasses
import sys

import numpy as np
import tensorflow as tf

import lars_tf
from lars_tf import TrainConfig, models, precision

out_dir = sys.argv[1]
types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
overrides = {}
for arg in sys.argv[2:]:
    key, value = arg.split("=", 1)
    kind = types[key]
    overrides[key] = (value == "True" if kind == "bool" else int(value) if kind == "int"
                      else float(value) if kind == "float" else value)
config = TrainConfig(**{**dict(epochs=1, global_batch_size=1024, learning_rate=3.0,
                               warmup_epochs=0.5, model_dir=out_dir), **overrides})

world = lars_tf.init()
precision.set_policy(config.precision)  # before the model is built
tf.keras.utils.set_random_seed(100 + world.rank)
model = models.get(config.model, (28, 28, 1), 10)
np.savez(f"{out_dir}/init_rank{world.rank}.npz", *model.get_weights())
summary = lars_tf.Trainer(config, model=model).fit()
np.savez(f"{out_dir}/final_rank{world.rank}.npz", *model.get_weights())
print(f"rank {world.rank} done: test accuracy {summary['final_test_accuracy']:.4f}")
