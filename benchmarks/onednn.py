"""Training steps with TensorFlow's oneDNN CPU kernels off (TensorFlow's default on CPUs
without AVX-512 VNNI) and on (lars_tf's default), side by side in one run.

    python -m benchmarks.onednn [--rounds 3] [--nowrite]

TensorFlow reads TF_ENABLE_ONEDNN_OPTS when it loads, so every measurement is a fresh
process; within a round the two settings run back to back, in alternating order, and the
ratio is the median of the per-round ratios. Each process trains the model with lars_tf.LARS
on random images (one process using all cores: the kernels, not Horovod, are measured).
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from benchmarks import common
from lars_tf import testing

flags.DEFINE_integer("rounds", 3, "Rounds; each runs every model with oneDNN off and on.")
flags.DEFINE_bool("write", True, "Write the table to benchmarks/RESULTS.md.")
flags.DEFINE_string("child", None, "Internal: measure this model in this process.")
FLAGS = flags.FLAGS


def run_child(name: str, onednn: str) -> dict:
    out = testing.run_job([sys.executable, "-m", "benchmarks.onednn", f"--child={name}"],
                          timeout=3600, TF_ENABLE_ONEDNN_OPTS=onednn).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result["onednn"] != (onednn == "1"):
        raise SystemExit(f"TF_ENABLE_ONEDNN_OPTS={onednn} but oneDNN on = {result['onednn']}")
    return result


def main(argv):
    del argv
    if FLAGS.child:
        print(json.dumps(common.train_step_rate(FLAGS.child)))
        return
    t_start = time.time()
    results = {name: {"0": [], "1": []} for name, *_ in common.TRAIN_STEP_MODELS}
    for r in range(FLAGS.rounds):
        for name, *_ in common.TRAIN_STEP_MODELS:
            for setting in (("0", "1") if r % 2 == 0 else ("1", "0")):
                results[name][setting].append(run_child(name, setting))
                print(f"round {r + 1} {name} oneDNN={setting}: "
                      f"{results[name][setting][-1]['images_per_sec']:.1f} images/sec",
                      flush=True)

    rows = ["| model (batch) | oneDNN off: images/sec | oneDNN on: images/sec | on vs off "
            "(median of per-round ratios) | peak RSS off / on (MB) |", "|---|---|---|---|---|"]
    ratios = {}
    for name, _, batch, _ in common.TRAIN_STEP_MODELS:
        off, on = results[name]["0"], results[name]["1"]
        ratios[name], cells = common.paired_cells(name, batch, off, on)
        rows.append(cells + f"{max(x['peak_rss_mb'] for x in off):.0f} / "
                    f"{max(x['peak_rss_mb'] for x in on):.0f} |")
    common.report(
        "onednn", "oneDNN CPU kernels (`benchmarks/onednn.py`)",
        "Training steps (forward, backward, lars_tf.LARS update) on random images, one "
        "process using all cores, each measurement a fresh process with TF_ENABLE_ONEDNN_OPTS "
        f"set (the settings alternate within each of {FLAGS.rounds} rounds). The whole run "
        f"took {(time.time() - t_start) / 60:.1f} min.",
        rows,
        "With oneDNN on: " + ", ".join(f"{name} {ratios[name]:.2f}x" for name in ratios)
        + " the images/sec of oneDNN off. TensorFlow 2.15 turns oneDNN on by itself only on "
        "CPUs with AVX-512 VNNI or newer; lars_tf turns it on when imported before "
        "TensorFlow.",
        FLAGS.write)


if __name__ == "__main__":
    app.run(main)
