"""The forward and backward pass compiled with XLA, the update outside it (where Horovod's
all-reduce would sit: its ops have no XLA kernel), against the same step without XLA, side by
side in one run on this machine's CPU.

    python -m benchmarks.xla [--rounds 3] [--nowrite]

Both settings run the same custom step on random images, one process using all cores: a
``tf.function`` that calls the gradient function (``jit_compile=True`` or ``False``) and then
applies lars_tf.LARS. Within a round the two settings run back to back, in alternating order,
each on a freshly built model; the ratio is the median of the per-round ratios. The first
call's time (tracing, and XLA's compilation) is reported apart.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

from benchmarks import common
from lars_tf import testing

flags.DEFINE_integer("rounds", 3, "Rounds; each runs every model with and without XLA.")
flags.DEFINE_bool("write", True, "Write the table to benchmarks/RESULTS.md.")
FLAGS = flags.FLAGS

SETTINGS = ("off", "xla")


def measure(name: str, xla: bool) -> dict:
    """Images/sec of ``name``'s training step with its forward and backward pass compiled by
    XLA (``xla``) or not, and the first step's seconds."""
    import keras
    import tensorflow as tf

    import lars_tf
    from lars_tf import models

    _, shape, batch, steps = next(m for m in common.TRAIN_STEP_MODELS if m[0] == name)
    keras.utils.set_random_seed(0)
    model = models.get(name, shape, 10)
    optimizer = lars_tf.LARS(learning_rate=0.1, weight_decay=5e-5)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x = tf.random.normal((batch, *shape))
    y = tf.random.uniform((batch,), 0, 10, tf.int32)

    @tf.function(jit_compile=xla)
    def gradients():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return loss, tape.gradient(loss, model.trainable_variables)

    @tf.function(jit_compile=False)
    def step():
        loss, grads = gradients()
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    t0 = time.perf_counter()
    step().numpy()  # trace (and compile)
    first = time.perf_counter() - t0
    step().numpy()
    t0 = time.perf_counter()
    for _ in range(steps):
        step().numpy()
    return {"images_per_sec": steps * batch / (time.perf_counter() - t0), "first_sec": first}


def main(argv):
    del argv
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    t_start = time.time()
    results = {name: {s: [] for s in SETTINGS} for name, *_ in common.TRAIN_STEP_MODELS}
    for r in range(FLAGS.rounds):
        for name, *_ in common.TRAIN_STEP_MODELS:
            for setting in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
                found = measure(name, setting == "xla")
                results[name][setting].append(found)
                print(f"round {r + 1} {name} {setting}: {found['images_per_sec']:.1f} "
                      f"images/sec (first step {found['first_sec']:.1f} s)", flush=True)

    rows = ["| model (batch) | without XLA: images/sec | forward+backward under XLA: "
            "images/sec | XLA vs without (median of per-round ratios) | first step without "
            "/ with XLA (s) |", "|---|---|---|---|---|"]
    ratios = {}
    for name, _, batch, _ in common.TRAIN_STEP_MODELS:
        off, on = results[name]["off"], results[name]["xla"]
        ratios[name], cells = common.paired_cells(name, batch, off, on)
        rows.append(cells + f"{statistics.median(x['first_sec'] for x in off):.1f} / "
                    f"{statistics.median(x['first_sec'] for x in on):.1f} |")
    verdict = ("XLA wins on this CPU for " + ", ".join(n for n in ratios if ratios[n] > 1.0)
               if any(v > 1.0 for v in ratios.values()) else
               "XLA loses on this CPU for every model")
    common.report(
        "xla", "XLA for the forward and backward pass on CPU (`benchmarks/xla.py`)",
        "One training step: the forward and backward pass in a `tf.function` with "
        "`jit_compile=True` (or not), the lars_tf.LARS update outside it, as a distributed "
        "step would leave Horovod's all-reduce outside XLA. Random images, one process using "
        f"all cores (oneDNN on: {bool(_pywrap_util_port.IsMklEnabled())}, TensorFlow "
        f"{tf.__version__}), the two settings alternating within each of {FLAGS.rounds} "
        f"rounds. The whole run took {(time.time() - t_start) / 60:.1f} min.",
        rows,
        f"{verdict}: " + ", ".join(f"{name} {ratios[name]:.2f}x" for name in ratios)
        + " the images/sec without it (XLA's CPU code against TensorFlow's oneDNN kernels; "
        "why XLA is slower was not looked into). lars_tf leaves XLA off "
        "(`lars_tf.DistributedOptimizer` refuses `jit_compile=True`). Not measured on a "
        "GPU, where XLA may win.",
        FLAGS.write)
    print(f"peak RSS: {testing.peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    app.run(main)
