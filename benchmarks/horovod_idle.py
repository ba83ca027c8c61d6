"""What Horovod's background loop costs the compute while it has nothing to all-reduce.

    python -m benchmarks.horovod_idle [--cycles 1,5,20] [--rounds 3] [--pairs 5] [--nowrite]

Horovod's background thread runs a coordination round with the other ranks every cycle
(``HOROVOD_CYCLE_TIME``), whether or not a tensor is queued. On CPU hosts it shares the
cores with TensorFlow's compute. Each job here is 2 ranks of ``launch/horovodrun_gpu.sh
--gloo`` on this machine (TensorFlow's threads as lars_tf gives a rank: the cores split
between the ranks), at one cycle time. Every rank times the same local training step of
small_cnn (forward, backward, SGD update on its own random batch of 256; no communication)
in alternating blocks with Horovod started (``hvd.init()``) and stopped
(``hvd.shutdown()``), ``--pairs`` pairs of blocks; Horovod starting again is the ranks'
rendezvous, and a collective before each stop lines them up. Figure: the median over ranks,
pairs and rounds of (step with Horovod running / step without), with the median steps.
Writes benchmarks/results/horovod_idle.json and its RESULTS.md section.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from benchmarks import common
from lars_tf import testing

flags.DEFINE_list("cycles", ["1", "5", "20"], "Horovod cycle times (ms), one job each.")
flags.DEFINE_integer("rounds", 3, "Rounds over the cycle times.")
flags.DEFINE_integer("pairs", 5, "Pairs of blocks (Horovod stopped, running) per job.")
flags.DEFINE_integer("steps", 20, "Timed steps per block.")
flags.DEFINE_integer("warmup", 5, "Untimed steps before each block.")
flags.DEFINE_string("worker", None, "Internal: a rank; write its figures to this file.")
common.define_output_flags("horovod_idle")
FLAGS = flags.FLAGS

BATCH = 256


def worker(out: str) -> None:
    import horovod.tensorflow as hvd
    import keras
    import tensorflow as tf

    from lars_tf import distributed, models  # lars_tf was imported first: oneDNN is on

    threads = distributed.threads_per_rank(int(os.environ.get("HOROVOD_LOCAL_SIZE", "1")))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    model = models.get("small_cnn", (28, 28, 1), 10)
    optimizer = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    x = tf.random.uniform((BATCH, 28, 28, 1))
    y = tf.random.uniform((BATCH,), maxval=10, dtype=tf.int32)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def block() -> float:
        for _ in range(FLAGS.warmup):
            step().numpy()
        times = []
        for _ in range(FLAGS.steps):
            t0 = time.perf_counter()
            step().numpy()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def stop():
        hvd.allreduce(tf.constant(0.0), name="line_up")  # both ranks stop together
        hvd.shutdown()

    hvd.init()
    rank = hvd.rank()
    stop()
    pairs = []
    for _ in range(FLAGS.pairs):
        off = block()
        hvd.init()  # the rendezvous: both ranks start the next block together
        on = block()
        stop()
        pairs.append({"off": off, "on": on})
    Path(out).write_text(json.dumps({"rank": rank, "threads": threads, "pairs": pairs,
                                     "peak_rss_mb": testing.peak_rss_mb()}))


def run_job(cycle: str, tmp: Path) -> list[dict]:
    outs = [tmp / f"rank{r}.json" for r in range(2)]
    for o in outs:
        o.unlink(missing_ok=True)
    script = tmp / "rank.sh"  # each rank writes its own file
    script.write_text(
        "#!/bin/bash\nexec " + " ".join([
            sys.executable, "-m", "benchmarks.horovod_idle",
            f"--worker={tmp}/rank$HOROVOD_RANK.json", f"--pairs={FLAGS.pairs}",
            f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}"]) + "\n")
    script.chmod(0o755)
    testing.run_job([str(testing.LAUNCH / "horovodrun_gpu.sh"), "--gloo", "--gpus-per-host",
                     "2", "--cycle-time-ms", cycle, "--", str(script)], timeout=1800)
    return [json.loads(o.read_text()) for o in outs]


def main(argv):
    del argv
    if FLAGS.worker:
        worker(FLAGS.worker)
        return
    out = Path(FLAGS.out)
    if not FLAGS.report_only:
        t0 = time.time()
        runs = {c: [] for c in FLAGS.cycles}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(FLAGS.rounds):
                for c in FLAGS.cycles:
                    ranks = run_job(c, Path(tmp))
                    runs[c].append(ranks)
                    ratios = [p["on"] / p["off"] for rk in ranks for p in rk["pairs"]]
                    print(f"[horovod_idle] round {r + 1} cycle {c} ms: running / stopped "
                          f"{statistics.median(ratios):.3f} (pairs "
                          f"{', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": common.command_line(),
                                   "machine": common.machine_line(), "rounds": FLAGS.rounds,
                                   "pairs": FLAGS.pairs, "steps": FLAGS.steps,
                                   "total_sec": time.time() - t0, "runs": runs}, indent=1))
    report(json.loads(out.read_text()), out)


def report(raw: dict, out: Path) -> None:
    table = ["| cycle time (ms) | step, Horovod stopped (ms) | step, Horovod running (ms) | "
             "running / stopped (median of pairs) | pairs slower when running | spread of "
             "the pairs | peak RSS/rank (MB) |", "|---|---|---|---|---|---|---|"]
    found = {}
    for c, jobs in raw["runs"].items():
        pairs = [p for ranks in jobs for rk in ranks for p in rk["pairs"]]
        ratios = [p["on"] / p["off"] for p in pairs]
        found[c] = statistics.median(ratios)
        peak = max(rk["peak_rss_mb"] for ranks in jobs for rk in ranks)
        table.append(
            f"| {c} | {1e3 * statistics.median(p['off'] for p in pairs):.1f} | "
            f"{1e3 * statistics.median(p['on'] for p in pairs):.1f} | "
            f"**{found[c]:.3f}x** | {sum(x > 1 for x in ratios)} of {len(ratios)} | "
            f"{min(ratios):.2f}x to {max(ratios):.2f}x | {peak:.0f} |")
    threads = raw["runs"][next(iter(raw["runs"]))][0][0]["threads"]
    common.report(
        "horovod_idle", "Horovod's idle loop against the compute (`benchmarks/horovod_idle.py`)",
        "2 ranks of `launch/horovodrun_gpu.sh --gloo` on this machine, each with "
        f"{threads} intra-op thread(s), each timing the same local small_cnn training step "
        f"(batch {BATCH}, no communication) in alternating blocks with Horovod running "
        "(`hvd.init()`) and stopped (`hvd.shutdown()`): "
        f"{raw['pairs']} pairs of {raw['steps']} steps per job and rank, {raw['rounds']} "
        f"round(s) per cycle time. The whole run took {raw['total_sec'] / 60:.1f} min. Raw "
        f"results: `{os.path.relpath(out, common.RESULTS.parent)}`.",
        table,
        "With nothing to all-reduce, Horovod running made the step "
        + ", ".join(f"{(found[c] - 1) * 100:+.1f}% at a {c} ms cycle" for c in found)
        + " (median of the per-pair ratios). Horovod's background thread runs a coordination "
        "round with the other ranks every cycle, queued tensors or not, on the cores the "
        "compute uses.",
        FLAGS.write, raw=raw if FLAGS.report_only else None)


if __name__ == "__main__":
    app.run(main)
