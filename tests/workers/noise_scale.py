"""Gradient noise scale on a problem whose answer is known: per-example gradients
``x ~ N(mu, sigma^2 I_d)`` (the loss ``w . x`` has gradient ``x`` whatever ``w``), so
``|G|^2 = |mu|^2``, ``tr(S) = d sigma^2``. Each rank feeds its own draws through
``lars_tf.DistributedOptimizer(noise_scale_every=1)`` and records the sums of every chunk
of updates.

    [horovodrun -np 2] python tests/workers/noise_scale.py OUT_DIR PASSES LOSS_SCALE
"""

import sys

import numpy as np
import tensorflow as tf

import lars_tf
from lars_tf import distributed

D, B_PASS, MU, SIGMA = 64, 8, 0.25, 1.0  # |G|^2 = 4, tr(S) = 64, B_simple = 16
CHUNKS, UPDATES = 20, 40

out_dir, passes, loss_scale = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
world = lars_tf.init()
opt = lars_tf.DistributedOptimizer(tf.keras.optimizers.SGD(0.0), backward_passes_per_step=passes,
                                   loss_scale="dynamic" if loss_scale != 1 else "none",
                                   initial_scale=loss_scale, noise_scale_every=1)
w = tf.Variable(tf.zeros(D))
rng = np.random.default_rng(1000 + world.rank)


@tf.function
def apply(g):
    opt.apply_gradients([(g, w)])


opt.build([w])
rows = []
for _ in range(CHUNKS):
    opt.reset_noise_scale_stats()
    for _ in range(UPDATES * passes):
        x = rng.normal(MU, SIGMA, size=(B_PASS, D)).astype(np.float32)
        apply(tf.constant(x.mean(axis=0) * loss_scale))  # the gradient of the scaled loss
    stats = opt.noise_scale_stats()
    rows.append([stats["g2_sum"], stats["trace_per_pass_sum"], stats["count"]])
np.save(f"{out_dir}/rank{world.rank}.npy", np.array(rows))
if distributed.is_initialized():
    print("ranks", distributed.size())
