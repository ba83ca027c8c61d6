"""One run of 5 weight updates at a fixed global batch, split over ranks and passes.

    [horovodrun -np N] python tests/workers/equivalence.py OUT_DIR GLOBAL_BATCH PASSES [OPT=V]

OPT=V: ``predivide=F`` (gradient_predivide_factor), ``precision=mixed_float16`` (the whole
stack with dynamic loss scaling), ``fp16_allreduce=1`` (float16 on the wire),
``optimizer=sgd|adam`` (Keras' own optimizer instead of LARS; Keras 3 only, through
lars_tf.DistributedOptimizer), ``bucket_mb=M`` (the all-reduce's buckets; 0: one op per
gradient).

Update s uses the same global batch of Fashion-MNIST test images whatever the split: rank r's
pass j takes rows [(r * PASSES + j) * b, ... + b) of it, b = GLOBAL_BATCH / (N * PASSES).
The model (mlp: no BatchNorm) starts from the same seed everywhere. Writes rank{r}.npz.
"""

import sys

import numpy as np
import tensorflow as tf

import lars_tf
from lars_tf import LARS, WarmupPolynomialDecay, build, config, distributed, keras_compat, models
from lars_tf import precision as precision_lib
from lars_tf.config import TrainConfig
from lars_tf.data import fashion_mnist

UPDATES = 5
out_dir, global_batch, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
options = dict(arg.split("=", 1) for arg in sys.argv[4:])
precision = options.get("precision", "fp32")
world = lars_tf.init()
precision_lib.set_policy(precision)
b = global_batch // (world.size * passes)

images, labels = fashion_mnist.load(TrainConfig().resolved_data_dir(), "test")
images = ((images[: UPDATES * global_batch] / 255.0 - fashion_mnist.MEAN)
          / fashion_mnist.STD).astype(np.float32)
labels = labels[: UPDATES * global_batch]
rows = np.concatenate([
    np.arange(s * global_batch + (world.rank * passes + j) * b,
              s * global_batch + (world.rank * passes + j + 1) * b)
    for s in range(UPDATES) for j in range(passes)
])

tf.keras.utils.set_random_seed(7)
model = models.get("mlp", (28, 28, 1), 10)
schedule = WarmupPolynomialDecay(peak_learning_rate=2.0, warmup_steps=2, total_steps=UPDATES)
local = {
    "lars": lambda: LARS(learning_rate=schedule, momentum=0.9, weight_decay=1e-3,
                         trust_coefficient=0.01),
    "sgd": lambda: tf.keras.optimizers.SGD(learning_rate=schedule, momentum=0.9),
    "adam": lambda: tf.keras.optimizers.Adam(learning_rate=1e-2),
}[options.get("optimizer", "lars")]()
optimizer = build.wrap_optimizer(
    local, backward_passes_per_step=passes, precision=precision,
    gradient_predivide_factor=float(options.get("predivide", 1.0)),
    fp16_allreduce=options.get("fp16_allreduce") == "1",
    bucket_mb=float(options.get("bucket_mb", config.BUCKET_MB)))
model.compile(optimizer=optimizer,
              loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              **keras_compat.compile_options())
distributed.broadcast_state(model, optimizer)
initial = model.get_weights()
model.fit(images[rows], labels[rows], batch_size=b, epochs=1, shuffle=False, verbose=0)
assert int(optimizer.iterations.numpy()) == UPDATES * passes
np.savez(f"{out_dir}/rank{world.rank}.npz",
         **{f"w{i}": w for i, w in enumerate(model.get_weights())},
         **{f"init{i}": w for i, w in enumerate(initial)},
         loss_scale=(precision_lib.loss_scale_state(optimizer)[0]
                     if precision_lib.find_loss_scale_optimizer(optimizer) else 0.0))
