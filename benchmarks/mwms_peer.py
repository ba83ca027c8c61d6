"""lars_tf against the peer a TensorFlow user would pick instead: the same training step of
the same model, the same per-rank batch, on the same hosts of ``tools/cluster.sh``, through
``lars_tf.DistributedOptimizer`` (Horovod over Gloo, ``launch/horovodrun_gpu.sh --preset
ethernet``) and through ``tf.distribute.MultiWorkerMirroredStrategy`` (its ring all-reduce over
gRPC, one worker per host, a custom training loop: Keras 3's ``fit`` under MWMS is broken,
tensorflow#72388).

    python -m benchmarks.mwms_peer [--hosts 2,4] [--links 10gbe,1gbe] [--models small_cnn,resnet50]
    python -m benchmarks.mwms_peer --quick        # 2 hosts, 10gbe, small_cnn, 1 round

Needs root (network namespaces). For each link a cluster of max(--hosts) hosts comes up (and
goes down at the end, also on failure). Per host count p, per round, per model, both jobs run
one after the other. In every worker (one per host, all sharing this machine's cores, each
with the same TensorFlow thread settings), blocks alternate between

- the local step: forward, backward and an SGD update of a model of its own, no communication;
- the distributed step: the same step with the gradients averaged across the p workers (ours:
  ``DistributedOptimizer(SGD)`` in one ``tf.function``, the gradients all-reduced in buckets,
  each as soon as the backward pass has them; in our jobs also the same with one all-reduce
  op per gradient, ``bucket_mb=0``, the earlier design; MWMS: ``strategy.run`` of the step,
  where Keras' optimizer all-reduces the gradients with the strategy's collective ops,
  ``CommunicationImplementation.RING``).

Steps/s = 1 / median distributed step; all-reduce time = distributed step - local step (what
the communication adds to a step, after whatever overlap each achieves). Each figure is the
median over rounds. Writes ``benchmarks/results/mwms_peer.{json,png}`` and its RESULTS.md
section.
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
from lars_tf.config import BUCKET_MB

# The models' input shapes and classes, and the per-worker batch (the same for both jobs).
# ResNet-50 at 64x64: its full gradient (25.6 M parameters, 97.5 MiB float32) at a step the
# shared 2 cores can afford.
MODELS = {"small_cnn": ((28, 28, 1), 10, 256), "resnet50": ((64, 64, 3), 1000, 16)}
IMPLS = ("lars_tf", "mwms")
PORT = 29700  # MWMS's gRPC servers: 198.18.0.<i>:PORT on host h<i>

flags.DEFINE_list("hosts", ["2", "4"], "Host counts to run on (one worker per host).")
flags.DEFINE_list("links", ["10gbe", "1gbe"], "Links to shape (tools/cluster.sh up's LINK).")
flags.DEFINE_list("models", list(MODELS), f"Models to train, of {', '.join(MODELS)}.")
flags.DEFINE_integer("rounds", 2, "Rounds over all jobs of a (link, hosts).")
flags.DEFINE_integer("steps", 6, "Timed steps per block.")
flags.DEFINE_integer("blocks", 2, "Alternating (local, distributed) blocks per job.")
flags.DEFINE_integer("warmup", 2, "Untimed steps before each block.")
flags.DEFINE_bool("quick", False, "2 hosts, 10gbe, small_cnn, 1 round of 1 block of 3 steps, "
                  "into a temporary file, RESULTS.md untouched: checks that the benchmark "
                  "works (CI), measures little.")
flags.DEFINE_list("launcher_flags", [], "More flags for our jobs' horovodrun_gpu.sh, after "
                  "--preset ethernet (e.g. --cycle-time-ms,5).")
flags.DEFINE_float("bucket_mb", BUCKET_MB, "Our DistributedOptimizer's bucket size (MiB); "
                   "our jobs also time one all-reduce op per gradient (0) beside it.")
flags.DEFINE_string("worker", None, "Internal: run one worker of this implementation.")
flags.DEFINE_string("model", None, "Internal: the worker's model.")
flags.DEFINE_integer("task", 0, "Internal (MWMS worker): this worker's index.")
flags.DEFINE_integer("workers", 1, "Internal (MWMS worker): how many workers.")
flags.DEFINE_integer("threads", 0, "Internal (worker): TensorFlow's intra-op threads.")
common.define_output_flags("mwms_peer")  # --out: a worker's figures when run as a worker
FLAGS = flags.FLAGS


# --- the worker side -------------------------------------------------------------------------

def _data(name: str, seed: int):
    import tensorflow as tf

    shape, classes, batch = MODELS[name]
    x = tf.random.stateless_uniform((batch, *shape), seed=(7, seed))
    y = tf.random.stateless_uniform((batch,), seed=(8, seed), maxval=classes, dtype=tf.int32)
    return x, y


def _step_fn(model, optimizer, x, y, scale: float):
    """One training step's body: loss of the batch (times ``scale``), gradients, update."""
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="sum")

    def body():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) * scale
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return body


def _time(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()  # every step returns a tensor of its loss: numpy() waits for the step
        out.append(time.perf_counter() - t0)
    return out


def worker(impl: str) -> None:
    """One worker: alternating blocks of the local and the distributed step."""
    import tensorflow as tf

    if impl == "mwms":  # the strategy must exist before TensorFlow's context does
        hosts = [f"198.18.0.{i}:{PORT}" for i in range(1, FLAGS.workers + 1)]
        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": hosts},
                                              "task": {"type": "worker", "index": FLAGS.task}})
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, FLAGS.threads))
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        rank, size = FLAGS.task, FLAGS.workers
    else:
        import lars_tf

        world = lars_tf.init(FLAGS.threads, max(2, FLAGS.threads))
        rank, size = world.rank, world.size
    import keras

    from lars_tf import models

    name = FLAGS.model
    shape, classes, batch = MODELS[name]
    x, y = _data(name, rank)
    scale = 1.0 / (batch * size)  # the mean over the global batch, as both jobs train

    local_model = models.get(name, shape, classes)
    local = tf.function(_step_fn(local_model, keras.optimizers.SGD(0.01), x, y, 1.0 / batch))

    if impl == "mwms":
        with strategy.scope():
            model = models.get(name, shape, classes)
            optimizer = keras.optimizers.SGD(0.01)
        body = _step_fn(model, optimizer, x, y, scale)

        @tf.function
        def distributed():
            return strategy.reduce("SUM", strategy.run(body), axis=None)
    else:
        import lars_tf

        def ours(bucket_mb):
            model = models.get(name, shape, classes)
            optimizer = lars_tf.DistributedOptimizer(keras.optimizers.SGD(0.01),
                                                     loss_scale="none", bucket_mb=bucket_mb)
            # DistributedOptimizer averages: each rank's loss is its own batch's mean
            return model, tf.function(_step_fn(model, optimizer, x, y, 1.0 / batch))

        model, distributed = ours(FLAGS.bucket_mb)
        _, per_tensor = ours(0)

    def run(fn):
        return lambda: fn().numpy()

    timed = {"local": local, "step": distributed}
    if impl != "mwms":
        timed["step_per_tensor"] = per_tensor
    found = {k: [] for k in timed}
    for _ in range(FLAGS.blocks):
        for k, fn in timed.items():
            found[k] += _time(run(fn), FLAGS.steps, FLAGS.warmup)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in found.items()}
        local, step = med["local"], med["step"]
        n_params = sum(int(v.shape.num_elements()) for v in model.trainable_variables)
        Path(FLAGS.out).write_text(json.dumps({
            **med, "allreduce": step - local, "bucket_mb": FLAGS.bucket_mb,
            "gradient_bytes": 4 * n_params, "batch_per_worker": batch, "workers": size,
            "threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "peak_rss_mb": testing.peak_rss_mb()}))


def worker_command(impl: str, name: str, out: Path, threads: int, **extra) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.mwms_peer", f"--worker={impl}", f"--model={name}",
           f"--out={out}", f"--threads={threads}", f"--steps={FLAGS.steps}",
           f"--blocks={FLAGS.blocks}", f"--warmup={FLAGS.warmup}",
           f"--bucket_mb={FLAGS.bucket_mb}"]
    return cmd + [f"--{k}={v}" for k, v in extra.items()]


# --- the driver side -------------------------------------------------------------------------

def lars_tf_job(cluster, p: int, name: str, out: Path, threads: int) -> dict:
    hosts = ",".join(f"h{i}:1" for i in range(1, p + 1))
    cmd = [str(testing.LAUNCH / "horovodrun_gpu.sh"), "--gloo", "-H", hosts,
           "--network-interface", "eth0", "--preset", "ethernet", *FLAGS.launcher_flags, "--",
           *worker_command("lars_tf", name, out, threads)]
    cluster.run("h1", cmd, timeout=3600)
    return json.loads(out.read_text())


def mwms_job(cluster, p: int, name: str, out: Path, threads: int) -> dict:
    procs = []
    try:
        for i in range(p):
            cmd = worker_command("mwms", name, out, threads, task=i, workers=p)
            procs.append(testing.start_job([common.CLUSTER, "run", f"h{i + 1}", *cmd],
                                           LARS_TF_CLUSTER_DIR=cluster.state))
        for i, proc in enumerate(procs):
            stdout, stderr = proc.communicate(timeout=3600)
            if proc.returncode:
                raise RuntimeError(f"MWMS worker {i} failed ({proc.returncode}):\n"
                                   f"{stderr[-3000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return json.loads(out.read_text())


def measure() -> dict:
    if os.geteuid() != 0:
        raise app.UsageError("needs root: tools/cluster.sh makes network namespaces")
    if FLAGS.quick:
        FLAGS.hosts, FLAGS.links, FLAGS.models = ["2"], ["10gbe"], ["small_cnn"]
        FLAGS.rounds, FLAGS.blocks, FLAGS.steps = 1, 1, 3
    counts = sorted({int(h) for h in FLAGS.hosts})
    if counts[0] < 2:
        raise app.UsageError(f"--hosts={','.join(FLAGS.hosts)}: at least 2 hosts per job")
    bad = [m for m in FLAGS.models if m not in MODELS]
    if bad:
        raise app.UsageError(f"--models: {', '.join(bad)} (choose of {', '.join(MODELS)})")
    threads = os.cpu_count() or 1  # what our launcher gives a rank alone on a host
    t0 = time.time()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "job.json"
        for link in FLAGS.links:
            with common.Cluster(counts[-1], link) as cluster:
                for p in counts:
                    for name in FLAGS.models:
                        jobs = {impl: [] for impl in IMPLS}
                        for r in range(FLAGS.rounds):
                            for impl, job in (("lars_tf", lars_tf_job), ("mwms", mwms_job)):
                                out.unlink(missing_ok=True)
                                res = job(cluster, p, name, out, threads)
                                jobs[impl].append(res)
                                print(f"[mwms_peer] {link} p={p} {name} round {r + 1} "
                                      f"{impl:8s} step {1e3 * res['step']:7.1f} ms, local "
                                      f"{1e3 * res['local']:7.1f} ms, all-reduce "
                                      f"{1e3 * res['allreduce']:7.1f} ms"
                                      + (f", one op per gradient "
                                         f"{1e3 * res['step_per_tensor']:7.1f} ms"
                                         if "step_per_tensor" in res else ""), flush=True)
                        runs[f"{link}|{p}|{name}"] = {"link": link, "hosts": p, "model": name,
                                                      "jobs": jobs}
    import tensorflow as tf

    return {"command": common.command_line(), "machine": common.machine_line(),
            "versions": {"tensorflow": tf.__version__}, "rounds": FLAGS.rounds,
            "steps": FLAGS.steps, "blocks": FLAGS.blocks, "threads": threads,
            "quick": FLAGS.quick, "total_sec": time.time() - t0, "runs": runs}


def rows(raw: dict) -> list[dict]:
    out = []
    for run in raw["runs"].values():
        med = {impl: {k: statistics.median(r[k] for r in res)
                      for k in ("step", "local", "allreduce")}
               for impl, res in run["jobs"].items()}
        first = run["jobs"]["lars_tf"][0]
        if "step_per_tensor" in first:  # buckets against one op per gradient, same jobs
            med["lars_tf"]["per_tensor"] = statistics.median(
                r["step_per_tensor"] for r in run["jobs"]["lars_tf"])
        out.append({"link": run["link"], "hosts": run["hosts"], "model": run["model"],
                    "bytes": first["gradient_bytes"], "batch": first["batch_per_worker"],
                    "ours": med["lars_tf"], "mwms": med["mwms"],
                    "speedup": med["mwms"]["step"] / med["lars_tf"]["step"],
                    "ours_bucket_mb": first.get("bucket_mb"),
                    "peak_rss_mb": max(r["peak_rss_mb"] for res in run["jobs"].values()
                                       for r in res)})
    return out


def report(raw: dict, out: Path) -> None:
    found = rows(raw)
    per_tensor = all("per_tensor" in r["ours"] for r in found)
    table = ["| link | hosts | model (gradient MiB, batch/worker) | ours steps/s | MWMS steps/s "
             "| ours / MWMS | at most, with a free all-reduce | ours all-reduce (ms) | MWMS "
             "all-reduce (ms) | local step (ms) | peak RSS/worker (MB) |"
             + (" ours, one op per gradient: steps/s | buckets / one op per gradient |"
                if per_tensor else ""), "|---" * (13 if per_tensor else 11) + "|"]
    for r in found:
        o, m = r["ours"], r["mwms"]
        table.append("| " + " | ".join(map(str, [
            r["link"], r["hosts"], f"{r['model']} ({r['bytes'] / 2**20:.1f}, {r['batch']})",
            f"{1 / o['step']:.2f}", f"{1 / m['step']:.2f}", f"**{r['speedup']:.2f}x**",
            f"{m['step'] / m['local']:.2f}x", f"{1e3 * o['allreduce']:.0f}",
            f"{1e3 * m['allreduce']:.0f}",
            f"{1e3 * o['local']:.0f} / {1e3 * m['local']:.0f}",
            f"{r['peak_rss_mb']:.0f}"]
            + ([f"{1 / o['per_tensor']:.2f}", f"{o['per_tensor'] / o['step']:.2f}x"]
               if per_tensor else []))) + " |")
    png = out.with_suffix(".png")
    plot(found, png)
    worst = min(found, key=lambda r: r["speedup"])
    conclusion = (f"Ours / MWMS: {min(r['speedup'] for r in found):.2f}x to "
                  f"{max(r['speedup'] for r in found):.2f}x over {len(found)} rows (goal: "
                  f"at least 1.2x on every cross-host row); the lowest: {worst['link']}, "
                  f"{worst['hosts']} hosts, {worst['model']}.")
    bounded = [r for r in found if r["mwms"]["step"] / r["mwms"]["local"] < 1.2]
    conclusion += (
        " 'At most, with a free all-reduce': MWMS's step over its own local step (the same "
        "model, batch and threads without communication), i.e. what any implementation "
        "sharing that compute could reach against MWMS if its all-reduce cost nothing.")
    if bounded:
        conclusion += (
            f" On {len(bounded)} row(s) ("
            + "; ".join(f"{r['link']} {r['hosts']} hosts {r['model']}: "
                        f"{r['mwms']['step'] / r['mwms']['local']:.2f}x" for r in bounded)
            + ") that bound is under 1.2x: the all-reduce is too small a part of MWMS's "
            "step there for any all-reduce to reach the goal.")
    if per_tensor:
        gains = [r["ours"]["per_tensor"] / r["ours"]["step"] for r in found]
        conclusion += (
            f" Our buckets ({found[0]['ours_bucket_mb']} MiB) against one all-reduce op per "
            f"gradient, in the same jobs: {min(gains):.2f}x to {max(gains):.2f}x the steps/s "
            f"(median {statistics.median(gains):.2f}x).")
    if raw.get("quick"):
        conclusion += " Quick mode: one round of few steps, a check that the benchmark runs."
    common.report(
        "mwms_peer",
        "Against MultiWorkerMirroredStrategy (`benchmarks/mwms_peer.py`)",
        "The same training step (forward, backward, SGD update) of the same model with the "
        "same per-worker batch, one worker per host of `tools/cluster.sh` (network "
        "namespaces on this machine sharing its cores, every worker with "
        f"{raw['threads']} intra-op threads), through `lars_tf.DistributedOptimizer` "
        "(Horovod over Gloo, `launch/horovodrun_gpu.sh --preset ethernet`, the gradients "
        "all-reduced in buckets as they are ready) and through "
        "`tf.distribute.MultiWorkerMirroredStrategy` (ring all-reduce over gRPC, custom "
        "training loop). All-reduce time = distributed step - the same worker's local step "
        "(no communication). Median over "
        f"{raw['rounds']} rounds of the median of {raw['blocks']} x {raw['steps']} steps. "
        f"The whole run took {raw['total_sec'] / 60:.1f} min. Raw results: "
        f"`{os.path.relpath(out, common.RESULTS.parent)}`.",
        table + ["", f"![ours against MWMS]({os.path.relpath(png, common.RESULTS.parent)})"],
        conclusion, FLAGS.write, raw=raw)


def plot(found: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6))
    labels = [f"{r['model']}\n{r['hosts']} hosts {r['link']}" for r in found]
    xs = range(len(found))
    for ax, key, ylabel in ((left, "step", "steps/s"), (right, "allreduce", "all-reduce ms")):
        value = (lambda s: 1 / s) if key == "step" else (lambda s: 1e3 * s)
        ax.bar([x - 0.2 for x in xs], [value(r["ours"][key]) for r in found], 0.4,
               label="lars_tf (Horovod, Gloo)")
        ax.bar([x + 0.2 for x in xs], [value(r["mwms"][key]) for r in found], 0.4,
               label="MultiWorkerMirroredStrategy (gRPC ring)")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main(argv):
    del argv
    if FLAGS.worker:
        worker(FLAGS.worker)
        return
    if FLAGS.quick:
        with tempfile.TemporaryDirectory() as tmp:
            FLAGS.write = False
            out = Path(tmp) / "mwms_peer.json"
            out.write_text(json.dumps(measure(), indent=1))
            report(json.loads(out.read_text()), out)
        return
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not FLAGS.report_only:
        out.write_text(json.dumps(measure(), indent=1))
    report(json.loads(out.read_text()), out)


if __name__ == "__main__":
    app.run(main)
