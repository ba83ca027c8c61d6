"""A rank of a short real training run; writes its weights before and after to OUT_DIR.

    horovodrun -np 2 python tests/workers/train_dump.py OUT_DIR [optimizer]

Each rank initialises its model from a different seed, so that identical weights at the
end can only come from Horovod's broadcast plus all-reduced gradients.
"""

import sys

import numpy as np
import tensorflow as tf

import lars_tf
from lars_tf import TrainConfig, models

out_dir = sys.argv[1]
optimizer = sys.argv[2] if len(sys.argv) > 2 else "lars"
world = lars_tf.init()
tf.keras.utils.set_random_seed(100 + world.rank)
model = models.get("small_cnn", (28, 28, 1), 10)
np.savez(f"{out_dir}/init_rank{world.rank}.npz", *model.get_weights())
config = TrainConfig(epochs=1, global_batch_size=1024, learning_rate=4.0, warmup_epochs=0.5,
                     optimizer=optimizer, model_dir=out_dir)
summary = lars_tf.Trainer(config, model=model).fit()
np.savez(f"{out_dir}/final_rank{world.rank}.npz", *model.get_weights())
print(f"rank {world.rank} done: test accuracy {summary['final_test_accuracy']:.4f}")
