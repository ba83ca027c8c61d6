"""A rank of a short run into which a fault is injected on rank 1 at its third step.

    horovodrun -np 2 python tests/workers/faults.py FAULT OUT_DIR [FIELD=VALUE ...]

FAULT: ``stall`` (rank 1 stops submitting tensors: it sleeps), ``diverge`` (rank 1 nudges
its copy of fc1's bias, so the replicas no longer agree) or ``none``.
"""

import sys
import time

import tensorflow as tf

import lars_tf
from lars_tf import TrainConfig, cli

fault, out_dir = sys.argv[1], sys.argv[2]
overrides = dict(arg.split("=", 1) for arg in sys.argv[3:])
config = TrainConfig(model="mlp", epochs=2, warmup_epochs=0, global_batch_size=1024,
                     model_dir=out_dir, progress_bar=False,
                     check_replicas_every=int(overrides.get("check_replicas_every", 0)))
world = lars_tf.init()


class Fault(tf.keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if world.rank != 1 or batch != 2:
            return
        if fault == "stall":
            print("rank 1: stalling", flush=True)
            time.sleep(600)
        elif fault == "diverge":
            v = self.model.get_layer("fc1").bias
            v.assign_add(tf.fill(v.shape, 1e-3))


# lars-train's error handling and exit codes, around the Python API
cli.run_with_exit_codes(config, lambda: lars_tf.Trainer(config).fit(callbacks=[Fault()]))
