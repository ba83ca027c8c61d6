"""A training step of the same model on the default stack (TensorFlow 2.20, Keras 3) and the
legacy stack (TensorFlow 2.15, Keras 2), side by side in one run.

    python -m benchmarks.stacks [--rounds 3] [--nowrite]     (in the default stack's venv)

The legacy stack's venv comes from `LARS_TF_STACK=keras2 make setup` (.venv-keras2, or
--legacy_python). Every measurement is a fresh process of one stack's Python: the forward
pass, backward pass and lars_tf.LARS update of one model on random images, all cores, oneDNN
on (lars_tf's default), compiled without XLA as the trainer does. Within a round the stacks
run back to back, in alternating order; the ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from benchmarks import common
from lars_tf import testing

flags.DEFINE_integer("rounds", 3, "Rounds; each runs every model on both stacks.")
flags.DEFINE_string("legacy_python", str(testing.REPO / ".venv-keras2" / "bin" / "python"),
                    "The legacy (Keras 2) stack's Python.")
flags.DEFINE_bool("write", True, "Write the table to benchmarks/RESULTS.md.")
flags.DEFINE_integer("profile_steps", 3, "Steps of each model and stack traced by "
                     "TensorFlow's profiler for the op-by-op breakdown (0: none).")
flags.DEFINE_string("child", None, "Internal: measure this model in this process.")
flags.DEFINE_string("child_profile", None, "Internal: profile this model in this process.")
FLAGS = flags.FLAGS


def run_child(python: str, name: str, profile: bool = False) -> dict:
    flag = f"--child_profile={name}" if profile else f"--child={name}"
    out = testing.run_job([python, "-m", "benchmarks.stacks", flag,
                           f"--profile_steps={FLAGS.profile_steps}"],
                          timeout=3600, TF_ENABLE_ONEDNN_OPTS="1").stdout
    return json.loads(out.strip().splitlines()[-1])


def profile_conclusion(profiles: dict) -> str:
    """The profile in a sentence: kernel time per step, stack against stack."""
    if not profiles:
        return ""
    parts = []
    for name, by_stack in profiles.items():
        old, new = (sum(by_stack[s]["ops"].values()) for s in ("keras2", "keras3"))
        parts.append(f"{name} {new:.0f} vs {old:.0f} ms ({new / old - 1:+.0%})")
    return (" Op by op, both run TensorFlow's fused oneDNN kernels; their kernel time per "
            "step on Keras 3 against Keras 2: " + ", ".join(parts) + ". Keras 3's lead is "
            "not in faster kernels but in the time between and around them.")


def profile_table(profiles: dict, top: int = 12) -> list[str]:
    """Per model, the op types that take the most kernel time on either stack."""
    rows = ["| model | op type | Keras 2, TF 2.15: ms/step | Keras 3, TF 2.20: ms/step | "
            "Keras 3 - Keras 2 (ms) |", "|---|---|---|---|---|"]
    for name, by_stack in profiles.items():
        old, new = by_stack["keras2"]["ops"], by_stack["keras3"]["ops"]
        kinds = sorted(set(old) | set(new), key=lambda k: -max(old.get(k, 0), new.get(k, 0)))
        for kind in kinds[:top]:
            a, b = old.get(kind, 0.0), new.get(kind, 0.0)
            rows.append(f"| {name} | {kind} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
        rest = kinds[top:]
        a, b = (sum(d.get(k, 0.0) for k in rest) for d in (old, new))
        rows.append(f"| {name} | {len(rest)} other types | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
        a, b = sum(old.values()), sum(new.values())
        rows.append(f"| {name} | **all ops** (step wall time: {by_stack['keras2']['wall_ms']:.0f}"
                    f" / {by_stack['keras3']['wall_ms']:.0f} ms) | {a:.1f} | {b:.1f} | "
                    f"{b - a:+.1f} |")
    return rows


def main(argv):
    del argv
    if FLAGS.child:
        print(json.dumps(common.train_step_rate(FLAGS.child)))
        return
    if FLAGS.child_profile:
        print(json.dumps(common.op_profile(FLAGS.child_profile, FLAGS.profile_steps)))
        return
    if not os.access(FLAGS.legacy_python, os.X_OK):
        raise SystemExit(f"--legacy_python={FLAGS.legacy_python}: not found; make the legacy "
                         "stack with `LARS_TF_STACK=keras2 make setup`")
    pythons = {"keras3": sys.executable, "keras2": FLAGS.legacy_python}
    t_start = time.time()
    results = {name: {s: [] for s in pythons} for name, *_ in common.TRAIN_STEP_MODELS}
    for r in range(FLAGS.rounds):
        for name, *_ in common.TRAIN_STEP_MODELS:
            for stack in (("keras3", "keras2") if r % 2 == 0 else ("keras2", "keras3")):
                results[name][stack].append(run_child(pythons[stack], name))
                got = results[name][stack][-1]
                print(f"round {r + 1} {name} {stack} (TF {got['tensorflow']}): "
                      f"{got['images_per_sec']:.1f} images/sec", flush=True)

    rows = ["| model (batch) | Keras 2, TF 2.15: images/sec | Keras 3, TF 2.20: images/sec | "
            "Keras 3 vs Keras 2 (median of per-round ratios) | peak RSS Keras 2 / 3 (MB) |",
            "|---|---|---|---|---|"]
    ratios = {}
    for name, _, batch, _ in common.TRAIN_STEP_MODELS:
        old, new = results[name]["keras2"], results[name]["keras3"]
        ratios[name], cells = common.paired_cells(name, batch, old, new)
        rows.append(cells + f"{max(x['peak_rss_mb'] for x in old):.0f} / "
                    f"{max(x['peak_rss_mb'] for x in new):.0f} |")
    profiles = {}
    if FLAGS.profile_steps:
        for name, *_ in common.TRAIN_STEP_MODELS:
            profiles[name] = {s: run_child(p, name, profile=True) for s, p in pythons.items()}
        rows += ["", f"Op by op (TensorFlow's profiler, {FLAGS.profile_steps} steps of each model "
                 "on each stack after the timed rounds; kernel time summed over threads and "
                 "by op type, per step):", "", *profile_table(profiles)]
    versions = {s: results[common.TRAIN_STEP_MODELS[0][0]][s][0] for s in pythons}
    common.report(
        "stacks", "Keras 3 and Keras 2 stacks (`benchmarks/stacks.py`)",
        "A training step (forward, backward, lars_tf.LARS update) of the same model on random "
        "images, one process using all cores, oneDNN on, each measurement a fresh process of "
        f"one stack (Keras 3: TensorFlow {versions['keras3']['tensorflow']}, Python "
        f"{versions['keras3']['python']}; Keras 2: TensorFlow "
        f"{versions['keras2']['tensorflow']}, Python {versions['keras2']['python']}); the "
        f"stacks alternate within each of {FLAGS.rounds} rounds. The whole run took "
        f"{(time.time() - t_start) / 60:.1f} min.",
        rows,
        "On the Keras 3 stack: " + ", ".join(f"{name} {ratios[name]:.2f}x" for name in ratios)
        + " the images/sec of the Keras 2 stack." + profile_conclusion(profiles),
        FLAGS.write)


if __name__ == "__main__":
    app.run(main)
