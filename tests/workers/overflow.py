"""mixed_float16 training where rank 1 alone overflows on one backward pass.

    horovodrun -np 2 python tests/workers/overflow.py OUT_DIR PASSES BAD_PASS [fp16_allreduce]

Runs 4 weight updates (4 * PASSES backward passes); on pass BAD_PASS rank 1 multiplies its
loss by inf. Before the first pass (init_w*) and after every pass (p{pass}_w*) each rank
records its weights, and the loss scale, in OUT_DIR/rank{r}.npz.
"""

import sys

import numpy as np
import tensorflow as tf

import lars_tf
from lars_tf import LARS, build, distributed, models, precision
from lars_tf.config import TrainConfig
from lars_tf.data import fashion_mnist

out_dir, passes, bad_pass = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fp16_allreduce = len(sys.argv) > 4 and sys.argv[4] == "fp16_allreduce"
world = lars_tf.init()
precision.set_policy("mixed_float16")

images, labels = fashion_mnist.load(TrainConfig().resolved_data_dir(), "test")
batch = 64
tf.keras.utils.set_random_seed(11)
model = models.get("mlp", (28, 28, 1), 10)
optimizer = build.wrap_optimizer(
    LARS(learning_rate=1.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01),
    precision="mixed_float16", fp16_allreduce=fp16_allreduce, backward_passes_per_step=passes)
assert precision.find_loss_scale_optimizer(optimizer) is not None
distributed.broadcast_state(model, optimizer)
loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@tf.function
def train_pass(x, y, poison):
    precision.minimize(optimizer, lambda: loss_fn(y, model(x, training=True)) * poison,
                          model.trainable_variables)


record = {f"init_w{i}": w.numpy() for i, w in enumerate(model.trainable_variables)}
for p in range(4 * passes):
    lo = (p * 2 + world.rank) * batch
    x = (images[lo: lo + batch] / 255.0).astype(np.float32)
    poison = float("inf") if (world.rank == 1 and p == bad_pass) else 1.0
    train_pass(x, labels[lo: lo + batch], tf.constant(poison))
    record[f"scale{p}"] = np.float64(precision.loss_scale_state(optimizer)[0])
    for i, w in enumerate(model.trainable_variables):
        record[f"p{p}_w{i}"] = w.numpy()
record["passes"] = 4 * passes
record["iterations"] = int(optimizer.iterations.numpy())
# the optimizer that updates (LARS): its step counter drives the schedule
record["lars_iterations"] = int(precision.innermost_optimizer(optimizer).iterations.numpy())
np.savez(f"{out_dir}/rank{world.rank}.npz", **record)
