"""One optimizer step over ResNet-50's trainable variables: lars_tf.LARS against Keras
SGD(momentum=0.9) and TF Model Garden's LARS, side by side in one process.

    python -m benchmarks.lars_overhead [--rounds 7] [--steps 10] [--nowrite]

Model Garden's LARS comes from tf-models-official of the release matching the stack's
TensorFlow (constraints.txt: 2.20.0; the legacy stack: 2.15.0), installed for benchmarks
only (`make bench` does, --no-deps); only its lars.py, which needs nothing but TensorFlow
(and, from 2.16 on, tf_keras), is loaded. The optimizers take turns within each round,
so that drift on the machine hits all of them alike; a step is timed as the mean of
--steps back-to-back steps, and the table gives the median over rounds.
"""

from __future__ import annotations

import importlib.metadata
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from lars_tf import LARS, keras_compat, models, testing  # noqa: E402
from lars_tf.optimizers import DEFAULT_EXCLUDE  # noqa: E402

flags.DEFINE_integer("rounds", 15, "Timed rounds per optimizer.")
flags.DEFINE_integer("steps", 10, "Steps per round.")
flags.DEFINE_float("weight_decay", 5e-5, "Weight decay of both LARS implementations.")
flags.DEFINE_bool("write", True, "Write the table to benchmarks/RESULTS.md.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    variables = models.get("resnet50", (224, 224, 3), 1000).trainable_variables
    n_params = sum(v.shape.num_elements() for v in variables)
    grads = [tf.random.normal(v.shape, stddev=1e-3, seed=i) for i, v in enumerate(variables)]
    MGLARS = testing.load_model_garden("modeling", "optimization", "lars.py").LARS
    mg = f"Model Garden LARS ({importlib.metadata.version('tf-models-official')})"
    optimizers = {
        "Keras SGD(momentum=0.9)": tf.keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
        "lars_tf.LARS": LARS(learning_rate=0.1, momentum=0.9,
                             weight_decay=FLAGS.weight_decay),
        mg: MGLARS(
            learning_rate=0.1, momentum=0.9, weight_decay_rate=FLAGS.weight_decay,
            exclude_from_weight_decay=list(DEFAULT_EXCLUDE),
            exclude_from_layer_adaptation=list(DEFAULT_EXCLUDE)),
    }
    # Model Garden's LARS is a tf_keras (Keras 2) optimizer from TF 2.16 on: it updates the
    # tf.Variables behind the Keras 3 variables (the same storage)
    plain = keras_compat.plain_variables(variables)
    def make_step(opt, targets):
        # built eagerly (Keras 3; Model Garden's legacy optimizer makes its slots on the
        # first call), and the variables closed over: a tf.function's arguments would be
        # traced as tensors, which Keras 3 cannot build slots for
        if hasattr(opt, "build"):
            opt.build(targets)

        @tf.function
        def step():
            opt.apply_gradients(zip(grads, targets))
        return step

    steps = {}
    for name, opt in optimizers.items():
        steps[name] = make_step(opt, plain if name == mg else variables)
        for _ in range(3):  # trace and warm up
            steps[name]()
    times = {name: [] for name in optimizers}
    names = list(optimizers)
    for r in range(FLAGS.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(FLAGS.steps):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / FLAGS.steps)

    # Ratios are paired: each round times every optimizer back to back, so the median of the
    # per-round ratios cancels the machine's drift between rounds.
    def ratio(name, base):
        return statistics.median(a / b for a, b in zip(times[name], times[base]))

    rows = ["| optimizer | ms/step (median) | ms/step (best round) | ratio to SGD (median "
            "of per-round ratios) |", "|---|---|---|---|"]
    for name in names:
        rows.append(f"| {name} | {1e3 * statistics.median(times[name]):.1f} | "
                    f"{1e3 * min(times[name]):.1f} | {ratio(name, names[0]):.2f}x |")
    lars_vs_sgd = ratio("lars_tf.LARS", names[0])
    mg_vs_lars = ratio(mg, "lars_tf.LARS")
    common.report(
        "lars_overhead", "LARS step overhead (`benchmarks/lars_overhead.py`)",
        f"One `apply_gradients` over ResNet-50 v1.5's {len(variables)} trainable tensors "
        f"({n_params / 1e6:.1f}M parameters), fixed random gradients, inside `tf.function`; "
        f"{FLAGS.rounds} rounds x {FLAGS.steps} steps, the optimizers taking turns; "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}.",
        rows,
        f"lars_tf.LARS is {lars_vs_sgd:.2f}x the SGD-momentum step and "
        f"{mg_vs_lars:.2f}x faster than Model Garden's LARS.",
        FLAGS.write)

if __name__ == "__main__":
    app.run(main)
