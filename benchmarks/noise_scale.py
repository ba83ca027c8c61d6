"""What measuring the gradient noise scale costs: a training step through
``lars_tf.DistributedOptimizer(noise_scale_every=1)`` against the same step without it,
side by side on 2 Horovod ranks (Gloo) of this machine.

    python -m benchmarks.noise_scale [--rounds 15] [--steps 20] [--nowrite]

In one 2-rank job, per model, two copies of the model with the same weights are compiled
with LARS inside the distributed optimizer, one measuring the noise scale on every update
(the local squared norm of every backward pass's gradients, one more scalar in the
all-reduce, the two estimates), the other not; they take turns in blocks of --steps
``fit`` steps on random data, --rounds blocks each (ResNet-50: a fifth of the steps). The
table gives each one's median step and the cost of measuring: the median over rounds of
the ratio of the two blocks of a round (adjacent in time, so the machine's drift cancels),
with the quartiles of those ratios. Writes its RESULTS.md section and
benchmarks/results/noise_scale.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

from benchmarks import common
from lars_tf import testing

flags.DEFINE_integer("rounds", 15, "Blocks per variant and model.")
flags.DEFINE_integer("steps", 20, "Steps per block (ResNet-50: a fifth).")
flags.DEFINE_bool("worker", False, "(internal) run as a rank of the job.")
common.define_output_flags("noise_scale")
FLAGS = flags.FLAGS

# (model, input shape, examples per rank and step): the study's model at its smallest
# per-rank batch, and ResNet-50 at ImageNet size
MODELS = (("small_cnn", (28, 28, 1), 64), ("resnet50", (224, 224, 3), 8))


def worker() -> None:
    import numpy as np
    import tensorflow as tf

    import lars_tf
    from lars_tf import keras_compat, models

    world = lars_tf.init()
    found = {}
    for name, shape, batch in MODELS:
        steps = FLAGS.steps if name == "small_cnn" else max(2, FLAGS.steps // 5)
        rng = np.random.default_rng(world.rank)
        x = rng.normal(size=(batch * steps, *shape)).astype(np.float32)
        y = rng.integers(0, 10, size=(batch * steps,))
        variants = {}
        for every in (0, 1):
            tf.keras.utils.set_random_seed(0)
            model = models.get(name, shape, 10)
            model.compile(optimizer=lars_tf.DistributedOptimizer(
                lars_tf.LARS(0.1, weight_decay=5e-5), noise_scale_every=every),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                **keras_compat.compile_options())
            model.fit(x[:2 * batch], y[:2 * batch], batch_size=batch, verbose=0)  # trace
            variants["with" if every else "without"] = model
        times = {k: [] for k in variants}
        for r in range(FLAGS.rounds):
            for key in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                t0 = time.perf_counter()
                variants[key].fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
                times[key].append((time.perf_counter() - t0) / steps)
        stats = variants["with"].optimizer.noise_scale_stats()
        found[name] = {"batch_per_rank": batch, "steps": steps,
                       "step_sec": {k: statistics.median(v) for k, v in times.items()},
                       "blocks": times, "measured_updates": stats["count"],
                       "norm_sec": _norm_seconds(variants["with"].trainable_variables)}
        tf.keras.backend.clear_session()
    found["peak_rss_mb_per_rank"] = lars_tf.distributed.gather_object(
        testing.peak_rss_mb(), name="rss")
    if world.rank == 0:
        Path(FLAGS.out).write_text(json.dumps(found))


def _norm_seconds(variables) -> float:
    """The median time of what measuring adds to an update's arithmetic, the two squared
    norms (each pass's local gradients, the all-reduced ones) over gradients of
    ``variables``' shapes, on this rank's threads: a direct figure, free of the step's
    noise."""
    import tensorflow as tf

    from lars_tf.distributed_optimizer import _squared_norm

    grads = [tf.random.normal(v.shape) for v in variables]
    norms = tf.function(lambda: _squared_norm(grads) + _squared_norm(grads))
    norms()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        norms().numpy()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv):
    del argv
    if FLAGS.worker:
        worker()
        return
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not FLAGS.report_only:
        t0 = time.time()
        tmp = out.with_suffix(".job.json")
        testing.run_job(testing.launcher("gloo", 2) + [
            sys.executable, "-m", "benchmarks.noise_scale", "--worker", f"--out={tmp}",
            f"--rounds={FLAGS.rounds}", f"--steps={FLAGS.steps}"], timeout=3600)
        runs = json.loads(tmp.read_text())
        tmp.unlink()
        raw = {"command": common.command_line(), "machine": common.machine_line(),
               "rounds": FLAGS.rounds, "total_sec": time.time() - t0, "runs": runs}
        out.write_text(json.dumps(raw, indent=1))
    report(json.loads(out.read_text()), out)


def report(raw: dict, out: Path) -> None:
    runs = raw["runs"]
    import numpy as np

    table = ["| model | examples per rank and step | step without (s) | step with (s) | "
             "cost of measuring (median of paired blocks) | quartiles | the two norms alone "
             "(ms, share of the step) | peak RSS/rank (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    costs, spread, direct = {}, {}, {}
    for name, _, _ in MODELS:
        r = runs[name]
        without, with_ = r["step_sec"]["without"], r["step_sec"]["with"]
        ratios = np.array(r["blocks"]["with"]) / np.array(r["blocks"]["without"]) - 1
        costs[name] = float(np.median(ratios))
        q1, q3 = np.percentile(ratios, [25, 75])
        spread[name] = (float(q1), float(q3))
        table.append(f"| {name} | {r['batch_per_rank']} | {without:.4f} | {with_:.4f} | "
                     f"{costs[name]:+.1%} | {q1:+.1%} to {q3:+.1%} | "
                     f"{1e3 * r['norm_sec']:.1f} ({r['norm_sec'] / without:.1%}) | "
                     f"{max(runs['peak_rss_mb_per_rank']):.0f} |")
        direct[name] = r["norm_sec"] / without
    worst = max(costs, key=costs.get)
    common.report(
        "noise_scale", "Cost of measuring the gradient noise scale (`benchmarks/noise_scale.py`)",
        "A training step (forward, backward, all-reduce, LARS update) on 2 Horovod ranks "
        "(Gloo) through `lars_tf.DistributedOptimizer` with `noise_scale_every=1` (every "
        "update measured) against the same without it, alternating blocks of `fit` steps "
        f"on random data in one job, median over {raw['rounds']} blocks. The whole run took "
        f"{raw['total_sec'] / 60:.1f} min. Raw results: "
        f"`{os.path.relpath(out, common.RESULTS.parent)}`.",
        table,
        f"End to end, measuring on every update costs at most {costs[worst]:+.1%} of a step "
        f"here ({worst}), with the paired blocks' quartiles at {spread[worst][0]:+.1%} to "
        f"{spread[worst][1]:+.1%}: the step's own noise on this 2-core machine is larger "
        "than the cost. What measuring adds is one scalar in the all-reduce (fused with "
        "the gradients) and two squared norms of the gradients, timed alone at "
        f"{max(direct.values()):.1%} of a step at most ({max(direct, key=direct.get)}; the "
        "goal: under 2%). `--noise_scale_every N` computes them on every N-th update only.",
        FLAGS.write, raw=raw)


if __name__ == "__main__":
    app.run(main)
