"""All-reduce of ResNet-50's gradients across 2 Horovod ranks: tensor fusion, cycle time,
Gloo vs MPI, fp32 vs fp16 compression, against the machine's memory-copy bound.

    python -m benchmarks.allreduce [--rounds 3] [--steps 20] [--nowrite]

Each setting is one 2-rank job started with launch/horovodrun_gpu.sh (so the presets and
flags are the launchers' own): the default preset (single_node), and fusion threshold 0
(off), 64 MB and 128 MB at cycle times of 1 and 5 ms, under Gloo and MPI. In every job the
ranks all-reduce the gradients of variables with ResNet-50 v1.5's 161 trainable shapes
(25.6M floats), the gradient being a fixed random tensor per variable, and time
(``benchmarks/allreduce_worker.py``, shared with ``cluster_allreduce`` across hosts):

- the step without Horovod (the gradient computation alone, subtracted below);
- the step with the all-reduce through ``lars_tf.DistributedOptimizer`` (in its default
  buckets), uncompressed (fp32) and with fp16 compression, the same with one all-reduce op
  per gradient (``bucket_mb=0``, fp32), and the step with Horovod's own
  ``hvd.DistributedGradientTape`` (fp32), the baseline, side by side in alternating blocks
  of the same job;
- a local memory copy of the same bytes, on both ranks at once (numpy ``copyto``), whose
  bandwidth bounds what a ring all-reduce on one machine can do: each rank moves
  2 (p - 1) / p of the gradient bytes, so ``bound = 2 (p - 1) / p * bytes / bandwidth``.

The jobs take turns over --rounds rounds; each figure is the median over rounds of the
per-job median step. Writes benchmarks/results/allreduce.{json,png} and its RESULTS.md
section; --baseline names the raw JSON of an earlier run (by default the Keras 2 stack's,
results/allreduce_keras2.json) whose figures each row is also compared with.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from absl import app, flags

from benchmarks import allreduce_worker, common
from lars_tf import testing
from lars_tf.config import BUCKET_MB

flags.DEFINE_integer("rounds", 3, "Rounds over all settings.")
flags.DEFINE_integer("steps", 20, "Timed steps per block.")
flags.DEFINE_integer("blocks", 3, "Alternating fp32/fp16 blocks per job.")
flags.DEFINE_string("baseline", str(common.RESULTS.parent / "results" / "allreduce_keras2.json"),
                    "Raw JSON of an earlier run to compare each row with ('' for none).")
common.define_output_flags("allreduce")
FLAGS = flags.FLAGS

# (label, launcher flags); the first is the default preset as the launchers set it.
SETTINGS = [("default preset (single_node)", [])]
for _mb in (0, 64, 128):
    for _cycle in ((1,) if _mb == 0 else (1, 5)):
        SETTINGS.append((f"fusion {_mb} MB, cycle {_cycle} ms" if _mb else
                         "fusion off (0), cycle 1 ms",
                         ["--fusion-threshold-mb", str(_mb), "--cycle-time-ms", str(_cycle)]))
CONTROLLERS = ("gloo", "mpi")


def run_job(controller: str, flags_: list[str], out: Path) -> dict:
    cmd = [str(testing.LAUNCH / "horovodrun_gpu.sh"), f"--{controller}", "--gpus-per-host",
           "2", *flags_, "--", *allreduce_worker.command(out, ["resnet50"], FLAGS.steps,
                                                          FLAGS.blocks)]
    testing.run_job(cmd, timeout=3600)
    return json.loads(out.read_text())["resnet50"]


def main(argv):
    del argv
    import tensorflow as tf

    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not FLAGS.report_only:
        t0 = time.time()
        jobs = [(c, label, fl) for c in CONTROLLERS for label, fl in SETTINGS]
        results = {f"{c}|{label}": [] for c, label, _ in jobs}
        tmp = out.with_suffix(".job.json")
        for r in range(FLAGS.rounds):
            for c, label, fl in jobs:
                res = run_job(c, fl, tmp)
                results[f"{c}|{label}"].append(res)
                print(f"[allreduce] round {r + 1} {c:4s} {label:32s} fp32 "
                      f"{1e3 * (res['fp32'] - res['local']):7.1f} ms  fp16 "
                      f"{1e3 * (res['fp16'] - res['local']):7.1f} ms  per tensor "
                      f"{1e3 * (res['fp32_per_tensor'] - res['local']):7.1f} ms  Horovod's tape "
                      f"{1e3 * (res['horovod_fp32'] - res['local']):7.1f} ms", flush=True)
        tmp.unlink()
        from lars_tf import keras_compat

        raw = {"command": common.command_line(), "machine": common.machine_line(),
               "versions": {"tensorflow": tf.__version__}, "keras3": keras_compat.KERAS3,
               "bucket_mb": BUCKET_MB,
               "rounds": FLAGS.rounds,
               "steps": FLAGS.steps, "blocks": FLAGS.blocks, "total_sec": time.time() - t0,
               "results": results}
        out.write_text(json.dumps(raw, indent=1))
    baseline = None
    if FLAGS.baseline and Path(FLAGS.baseline).exists() and \
            Path(FLAGS.baseline).resolve() != out.resolve():
        baseline = json.loads(Path(FLAGS.baseline).read_text())
    report(json.loads(out.read_text()), out, baseline)


def _path(raw: dict) -> str:
    """What all-reduced in a run (runs before the Keras 3 stack say nothing: Keras 2; runs
    that timed Horovod's tape beside it used lars_tf.DistributedOptimizer on both)."""
    stack = "Keras 3" if raw.get("keras3") else "Keras 2"
    timed_both = "horovod_fp32" in next(iter(raw["results"].values()))[0]
    return (f"`lars_tf.DistributedOptimizer` ({stack})" if raw.get("keras3") or timed_both
            else f"`hvd.DistributedGradientTape` ({stack})")


def _baseline_field(raw: dict) -> tuple[str, str]:
    """Which figure of a baseline run is Horovod's own path, and what it is: its tape where
    the run timed it beside ours, else the run's only all-reduce (older runs)."""
    stack = "Keras 3" if raw.get("keras3") else "Keras 2"
    if "horovod_fp32" in next(iter(raw["results"].values()))[0]:
        return "horovod_fp32", f"`hvd.DistributedGradientTape` ({stack})"
    return "fp32", _path(raw)


def report(raw: dict, out: Path, baseline: dict | None = None) -> None:

    results = raw["results"]
    first = next(iter(results.values()))[0]
    n_bytes, size = first["bytes"], first["size"]

    def med(key, field):
        return statistics.median(r[field] for r in results[key])

    def allreduce_sec(key, precision):
        """Median over rounds of (step with all-reduce - step without)."""
        return statistics.median(r[precision] - r["local"] for r in results[key])

    copy_bw = statistics.median(r["bytes"] / r["copy_sec"] for rs in results.values()
                                for r in rs)
    bound = 2 * (size - 1) / size * n_bytes / copy_bw
    off = allreduce_sec("gloo|fusion off (0), cycle 1 ms", "fp32")
    side = "horovod_fp32" in first  # Horovod's tape timed in the same jobs
    per_tensor = "fp32_per_tensor" in first  # buckets against one op per gradient
    table = ["| controller | setting | all-reduce fp32 (ms/step) | vs fusion off | fraction "
             "of copy bound | fp16 compression (ms/step) | fp16 vs fp32 | peak RSS/rank "
             "(MB) |"
             + (" one op per gradient fp32 (ms/step) | per gradient / buckets |"
                if per_tensor else "")
             + (" Horovod's tape fp32 (ms/step) | Horovod's / ours |" if side else "")
             + (" baseline fp32 (ms/step) | baseline / this |" if baseline else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if per_tensor else "")
             + ("---|---|" if side else "") + ("---|---|" if baseline else "")]
    ratios, side_ratios, bucket_ratios = [], [], []
    rows = []
    for key in results:
        controller, label = key.split("|")
        fp32, fp16 = allreduce_sec(key, "fp32"), allreduce_sec(key, "fp16")
        off_c = allreduce_sec(f"{controller}|fusion off (0), cycle 1 ms", "fp32")
        peak = max(max(r["peak_rss_mb_per_rank"]) for r in results[key])
        rows.append((controller, label, fp32, fp16))
        row = (f"| {controller} | {label} | {1e3 * fp32:.1f} | {off_c / fp32:.2f}x | "
               f"{bound / fp32:.0%} | {1e3 * fp16:.1f} | {fp32 / fp16:.2f}x | {peak:.0f} |")
        if per_tensor:
            each = allreduce_sec(key, "fp32_per_tensor")
            bucket_ratios.append(each / fp32)
            row += f" {1e3 * each:.1f} | {each / fp32:.2f}x |"
        if side:
            theirs = allreduce_sec(key, "horovod_fp32")
            side_ratios.append(theirs / fp32)
            row += f" {1e3 * theirs:.1f} | {theirs / fp32:.2f}x |"
        if baseline and key in baseline["results"]:
            field = _baseline_field(baseline)[0]
            then = statistics.median(r[field] - r["local"] for r in baseline["results"][key])
            ratios.append(then / fp32)
            row += f" {1e3 * then:.1f} | {then / fp32:.2f}x |"
        table.append(row)
    round_spread = {key: max(r["fp32"] - r["local"] for r in rs)
                    - min(r["fp32"] - r["local"] for r in rs) for key, rs in results.items()}
    default = allreduce_sec("gloo|default preset (single_node)", "fp32")
    default_mpi = allreduce_sec("mpi|default preset (single_node)", "fp32")
    off_mpi = allreduce_sec("mpi|fusion off (0), cycle 1 ms", "fp32")
    local = med("gloo|default preset (single_node)", "local")

    png = out.with_suffix(".png")
    plot(rows, bound, png)
    common.report(
        "allreduce", "All-reduce of ResNet-50's gradients (`benchmarks/allreduce.py`)",
        f"{first['tensors']} tensors, {n_bytes / 2**20:.1f} MiB of float32 gradients, "
        f"all-reduced (average) by {_path(raw)} across {size} ranks on this "
        f"machine, each setting a job of `launch/horovodrun_gpu.sh`; all-reduce time = step "
        f"with Horovod - the same step without it ({1e3 * local:.1f} ms); median over "
        f"{raw['rounds']} rounds of the median of {raw['blocks']} x {raw['steps']} steps. "
        f"Memory-copy bandwidth measured in the same jobs, both ranks copying at once: "
        f"{copy_bw / 2**30:.1f} GiB/s, so a ring all-reduce of these bytes cannot beat "
        f"{1e3 * bound:.1f} ms (2 (p-1)/p x bytes / bandwidth). The whole run took "
        f"{raw['total_sec'] / 60:.1f} min. Raw "
        f"results: `{os.path.relpath(out, common.RESULTS.parent)}`."
        + (f" Baseline: the run in `{os.path.relpath(FLAGS.baseline, common.RESULTS.parent)}`"
           f" ({_baseline_field(baseline)[1]}, TensorFlow "
           f"{baseline['versions']['tensorflow']}; its "
           f"command `{baseline['command']}`, machine: {baseline['machine']})."
           if baseline else ""),
        table + ["", f"![all-reduce time per setting]"
                     f"({os.path.relpath(png, common.RESULTS.parent)})"],
        f"The default preset is {off / default:.2f}x faster than fusion off under Gloo "
        f"({off_mpi / default_mpi:.2f}x under MPI) and reaches {bound / default:.0%} of the "
        f"memory-copy bound (Gloo; {bound / default_mpi:.0%} under MPI)."
        + (f" In buckets (the default, {raw.get('bucket_mb')} MiB) against one all-reduce op per "
           f"gradient in the same jobs: {statistics.median(bucket_ratios):.2f}x as fast "
           f"(median of per gradient / buckets over the rows; {min(bucket_ratios):.2f}x to "
           f"{max(bucket_ratios):.2f}x)." if bucket_ratios else "")
        + (f" Against Horovod's own `DistributedGradientTape` in the same jobs, ours is "
           f"{statistics.median(side_ratios):.2f}x as fast (median of Horovod's / ours over "
           f"the rows; {min(side_ratios):.2f}x to {max(side_ratios):.2f}x)."
           if side_ratios else "")
        + (f" A row's rounds differ by up to {1e3 * max(round_spread.values()):.1f} ms "
           f"(fp32 all-reduce, max - min over rounds; median over the rows "
           f"{1e3 * statistics.median(round_spread.values()):.1f} ms): a difference "
           "smaller than a row's spread is a tie." if raw["rounds"] > 1 else "")
        + (f" Against the baseline, the rows' all-reduce is {statistics.median(ratios):.2f}x "
           f"as fast (median of baseline / this over the rows; {min(ratios):.2f}x to "
           f"{max(ratios):.2f}x)." if ratios else "") + "\n\n"
        "Reading: Gloo on one machine sends over TCP loopback, where each of the 161 "
        "messages pays a fixed cost, so fusing them into a few large buffers is what makes "
        "it fast. Open MPI moves data through shared memory, where a message costs little "
        "beyond its bytes; there fusion adds two copies of the whole buffer (into and out of "
        "the fusion buffer, each about one memory-copy bound's worth of time here), and "
        "unfused all-reduces start as soon as each gradient is ready. So on one node under "
        "MPI, `--fusion-threshold-mb 0` is the faster choice; across nodes, where every "
        "message crosses the network, fusion is what the presets are for (not measurable "
        "here). float16 compression costs two casts of 25.6M values on 2 cores, more than "
        "it saves over shared memory or loopback: on CPUs leave `--fp16_allreduce` off.",
        FLAGS.write, raw=raw)


def plot(rows, bound: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r[1] for r in rows}, key=[r[1] for r in rows].index)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.2
    for i, (controller, precision) in enumerate([(c, p) for c in CONTROLLERS
                                                  for p in ("fp32", "fp16")]):
        ys = [1e3 * next(r[2] if precision == "fp32" else r[3] for r in rows
                         if r[0] == controller and r[1] == label) for label in labels]
        ax.bar([x + (i - 1.5) * width for x in range(len(labels))], ys, width,
               label=f"{controller} {precision}")
    ax.axhline(1e3 * bound, color="k", ls=":", label="memory-copy bound (fp32)")
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    ax.set_ylabel("all-reduce ms / step")
    ax.set_title("ResNet-50 gradients (161 tensors, 25.6M floats), 2 ranks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    app.run(main)
