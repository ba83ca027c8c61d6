"""Training throughput of ResNet-50 on synthetic data: 1 rank x 2 threads against 2 ranks x
1 thread on this machine (the same cores), and where the 2-rank step goes (compute vs
all-reduce, from the Horovod timeline).

    python -m benchmarks.scaling [--image_size 224] [--batch_per_core 16] [--epochs 3]

Both runs go through launch/mpirun_cpu.sh (ranks bound to their cores, TensorFlow and
OpenMP threads sized to them): --ranks-per-node 1 (2 threads) and 2 (1 thread each), the same
per-core batch, fp32, LARS. Each epoch is 10 global batches; the first epoch (graph tracing)
is left out of the throughput. The 2-rank run writes a Horovod timeline: the k-th all-reduce
of every gradient tensor belongs to step k, so the union of their ALLREDUCE intervals is the
all-reduce time of that step (the rest of the step is compute, input and waiting; the
all-reduce can overlap the backward pass, so "compute" is an upper bound). The part of it
before the step's last gradient reaches Horovod (the latest NEGOTIATE_ALLREDUCE start) ran
while the backward pass went on: the hidden all-reduce time. Writes
benchmarks/results/scaling.{json,png} and its RESULTS.md section.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from absl import app, flags

from benchmarks import common
from lars_tf import testing

flags.DEFINE_integer("image_size", 224, "Synthetic image side.")
flags.DEFINE_integer("batch_per_core", 16, "Examples per core per step.")
flags.DEFINE_integer("epochs", 3, "Epochs of 10 steps; the first is warm-up.")
flags.DEFINE_integer("cores", 2, "Cores of the node to use.")
common.define_output_flags("scaling")
FLAGS = flags.FLAGS


def run(ranks: int, work: Path, timeline: Path | None) -> dict:
    model_dir = work / f"ranks{ranks}"
    cmd = [str(testing.LAUNCH / "mpirun_cpu.sh"), "--ranks-per-node", str(ranks),
           "--cores-per-node", str(FLAGS.cores)]
    if timeline:
        cmd += ["--timeline-filename", str(timeline)]
    cmd += ["--", "--model=resnet50", "--dataset=synthetic", f"--image_size={FLAGS.image_size}",
            f"--global_batch_size={FLAGS.batch_per_core * FLAGS.cores}",
            f"--epochs={FLAGS.epochs}", "--warmup_epochs=0", "--eval_every=1000",
            "--noprogress_bar", f"--model_dir={model_dir}", "--checkpoint_every=0"]
    t0 = time.time()
    testing.run_job(cmd, timeout=3600)
    summary = json.loads((model_dir / "summary.json").read_text())
    steps = summary["steps_per_epoch"]
    speeds = [h["images_per_sec"] for h in summary["history"][1:]]
    return {"ranks": ranks, "threads_per_rank": FLAGS.cores // ranks,
            "images_per_sec": statistics.mean(speeds), "epoch_images_per_sec": speeds,
            "step_sec": statistics.mean(h["epoch_time_sec"] for h in summary["history"][1:])
            / steps, "steps_per_epoch": steps, "command": " ".join(cmd),
            "peak_rss_mb_per_rank": summary["peak_rss_mb_per_rank"],
            "wall_sec": time.time() - t0}


def _union(intervals, until=None) -> float:
    """Length of the union of ``intervals`` (cut at ``until``), in the timeline's units."""
    busy, end = 0.0, None
    for s, e in sorted(intervals):
        if until is not None:
            s, e = min(s, until), min(e, until)
        if end is None or s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy


def allreduce_per_step(timeline: Path, skip_steps: int) -> tuple[list[float], list[float]]:
    """Seconds of all-reduce activity in each step after the first ``skip_steps``, and of it
    the seconds before the step's last gradient was handed to Horovod (the start of its
    negotiation: the backward pass had not ended, so that all-reduce time was hidden
    behind it)."""
    events = json.loads(timeline.read_text())
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name" and "name" in e["args"]}
    spans = defaultdict(list)  # pid -> [(start, end)] of its ALLREDUCE activities
    submitted = defaultdict(list)  # pid -> [start of each NEGOTIATE_ALLREDUCE]
    open_at = {}
    stack = defaultdict(list)
    for e in events:
        pid = e.get("pid")
        if e.get("ph") == "B":
            stack[pid].append(e.get("name"))
            if e.get("name") == "ALLREDUCE":
                open_at[pid] = e["ts"]
            elif e.get("name") == "NEGOTIATE_ALLREDUCE":
                submitted[pid].append(e["ts"])
        elif e.get("ph") == "E" and stack[pid]:
            if stack[pid].pop() == "ALLREDUCE":
                spans[pid].append((open_at.pop(pid), e["ts"]))
    # gradient tensors are all-reduced once per step: the most frequent count
    counts = [len(v) for v in spans.values()]
    per_step = max(set(counts), key=counts.count)
    grads = [pid for pid, v in spans.items() if len(v) == per_step
             and len(submitted[pid]) == per_step and "Allreduce" in names.get(pid, "Allreduce")]
    busy, hidden = [], []
    for k in range(skip_steps, per_step):
        intervals = [spans[pid][k] for pid in grads]
        last_gradient = max(submitted[pid][k] for pid in grads)
        busy.append(_union(intervals) / 1e6)
        hidden.append(_union(intervals, until=last_gradient) / 1e6)
    return busy, hidden


def main(argv):
    del argv
    import tensorflow as tf


    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not FLAGS.report_only:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            timeline = work / "timeline.json"
            one = run(1, work, None)
            two = run(FLAGS.cores, work, timeline)
            ar, hidden = allreduce_per_step(timeline, skip_steps=two["steps_per_epoch"])
        raw = {"command": common.command_line(), "machine": common.machine_line(),
               "versions": {"tensorflow": tf.__version__}, "image_size": FLAGS.image_size,
               "batch_per_core": FLAGS.batch_per_core, "runs": [one, two],
               "allreduce_sec_per_step": ar, "hidden_allreduce_sec_per_step": hidden}
        out.write_text(json.dumps(raw, indent=1))
    report(json.loads(out.read_text()), out)


def report(raw: dict, out: Path) -> None:

    one, two = raw["runs"]
    ar = statistics.mean(raw["allreduce_sec_per_step"])
    hidden = statistics.mean(raw.get("hidden_allreduce_sec_per_step") or [0.0])
    compute = two["step_sec"] - ar
    efficiency = two["images_per_sec"] / one["images_per_sec"]
    table = ["| ranks x threads | images/sec | step (s) | all-reduce (s/step) | compute + "
             "rest (s/step) | vs 1 x 2 | peak RSS/rank (MB) |", "|---|---|---|---|---|---|---|",
             f"| 1 x {one['threads_per_rank']} | {one['images_per_sec']:.2f} | "
             f"{one['step_sec']:.2f} | - | {one['step_sec']:.2f} | 1.00x | "
             f"{max(one['peak_rss_mb_per_rank']):.0f} |",
             f"| {two['ranks']} x {two['threads_per_rank']} | {two['images_per_sec']:.2f} | "
             f"{two['step_sec']:.2f} | {ar:.3f} ({ar / two['step_sec']:.1%}) | {compute:.2f} | "
             f"{efficiency:.2f}x | {max(two['peak_rss_mb_per_rank']):.0f} |"]
    png = out.with_suffix(".png")
    plot(one, two, ar, png)
    common.report(
        "scaling", "Scaling on this machine (`benchmarks/scaling.py`)",
        f"ResNet-50 v1.5, synthetic {raw['image_size']}x{raw['image_size']} images, "
        f"{raw['batch_per_core']} examples per core per step, fp32, LARS, through "
        f"`launch/mpirun_cpu.sh` (ranks bound to cores); throughput over epochs 2+ (10 steps "
        f"each); all-reduce time per step from the 2-rank run's Horovod timeline. "
        f"Raw results: "
        f"`{os.path.relpath(out, common.RESULTS.parent)}`.",
        table + ["", f"![throughput and step split]"
                     f"({os.path.relpath(png, common.RESULTS.parent)})"],
        f"Scaling efficiency (2 ranks x 1 thread over 1 rank x 2 threads, same cores): "
        f"{efficiency:.2f}x; the all-reduce of the 25.6M gradients takes "
        f"{ar / two['step_sec']:.1%} of a 2-rank step, and {hidden / ar:.0%} of it "
        f"({hidden:.3f} s a step) runs before the step's last gradient is handed to Horovod, "
        "hidden behind the backward pass.\n\n"
        f"Reading: compute + rest is {one['step_sec']:.2f} s with 1 rank x 2 threads and "
        f"{compute:.2f} s with 2 ranks x 1 thread, and the all-reduce left after the "
        f"backward pass is {ar - hidden:.3f} s a step. " + (
            f"Of the 2-rank step's {two['step_sec'] - one['step_sec']:.2f} s over the 1-rank "
            f"one, {compute - one['step_sec']:.2f} s is compute (or input, or waiting) that "
            "ran slower on one thread per rank than half of it on two, and the rest the "
            "all-reduce. "
            if two["step_sec"] > one["step_sec"] else
            f"The 2-rank step takes {two['step_sec'] - one['step_sec']:+.2f} s against the "
            "1-rank one: what the all-reduce adds, the compute on one thread per rank "
            "recovers. ") +
        "The ALLREDUCE spans include the time Horovod's background thread waits for its "
        "rank's only core, which TensorFlow's compute shares.",
        FLAGS.write, raw=raw)


def plot(one: dict, two: dict, ar: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"1 x {one['threads_per_rank']}", f"{two['ranks']} x {two['threads_per_rank']}"]
    ax1.bar(labels, [one["images_per_sec"], two["images_per_sec"]], color=["C0", "C1"])
    ax1.set_ylabel("images / sec")
    ax1.set_xlabel("ranks x threads per rank")
    ax1.set_title("ResNet-50 training throughput")
    ax2.bar(labels, [one["step_sec"], two["step_sec"] - ar], label="compute + rest")
    ax2.bar(labels, [0, ar], bottom=[one["step_sec"], two["step_sec"] - ar],
            label="all-reduce (timeline)")
    ax2.set_ylabel("seconds / step")
    ax2.set_title("step time split")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    app.run(main)
