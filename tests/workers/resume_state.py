"""Every rank's complete state right after a resume, through the Python API.

    horovodrun -np 2 python tests/workers/resume_state.py MODEL_DIR first|resume PRECISION K

``first`` trains epoch 1 of 2 and, under mixed_float16, sets the loss scale to 1024 with 7
good steps before the checkpoint is written (a state unlike the initial 2^15 and 0).
``resume`` continues with --check_replicas_every=1 and writes, on each rank, every variable
that the checkpoint holds (model, optimizer, loss scale) as it is when training begins.
"""

import sys

import keras
import numpy as np
import tensorflow as tf

import lars_tf
from lars_tf import precision as precision_lib
from lars_tf.data import fashion_mnist

model_dir, phase, precision, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = lars_tf.TrainConfig(
    model="mlp", num_classes=10, epochs=2, global_batch_size=1024, learning_rate=2.0,
    warmup_epochs=0.5, precision=precision, backward_passes_per_step=k, model_dir=model_dir,
    deterministic=True, progress_bar=False, stop_after_epoch=1 if phase == "first" else 0,
    resume=phase == "resume", check_replicas_every=1 if phase == "resume" else 0)


class SetLossScale(tf.keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if precision_lib.find_loss_scale_optimizer(self.model.optimizer):
            # on every rank alike, before rank 0's checkpoint
            precision_lib.set_loss_scale_state(self.model.optimizer, 1024.0, 7)


class DumpState(tf.keras.callbacks.Callback):
    def __init__(self, rank):
        super().__init__()
        self.rank = rank

    def on_train_begin(self, logs=None):
        # what a checkpoint of the two holds, walked here independently of lars_tf
        root = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer)
        variable_types = (tf.Variable, *([keras.Variable] if hasattr(keras, "Variable") else []))
        state = [v for v in tf.train.TrackableView(root).descendants()
                 if isinstance(v, variable_types)]
        np.savez(f"{model_dir}/state_rank{self.rank}.npz",
                 **{f"{i:03d} {getattr(v, 'path', v.name)}": v.numpy()
                    for i, v in enumerate(state)})


world = lars_tf.init()
# 8192 training images (8 updates of 1024 per epoch) keep the four runs of the test short
x, y = fashion_mnist.load(config.resolved_data_dir(), "train")
per_pass = config.per_rank_batch_size(world.size)
train = (tf.data.Dataset.from_tensor_slices((x[:8192], y[:8192])).shard(world.size, world.rank)
         .batch(per_pass, drop_remainder=True)
         .map(lambda images, labels: (tf.cast(images, tf.float32) / 255.0, labels)))
tf.keras.utils.set_random_seed(100 + world.rank)  # different starts: only the broadcast unites
lars_tf.Trainer(config).fit(
    train, None, steps_per_epoch=8192 // world.size // per_pass,
    callbacks=[SetLossScale()] if phase == "first" else [DumpState(world.rank)])
