"""All-reduce across hosts: ResNet-50's and AlexNet-BN's gradients on 2 and 4 hosts of
``tools/cluster.sh`` (network namespaces with their own sshd, links shaped by ``tc``), each
setting a job of our launchers, against the link's ring bound and mpi4py's raw Allreduce.

    python -m benchmarks.cluster_allreduce [--hosts 2,4] [--links 10gbe,1gbe] [--rounds 2]

Needs root (network namespaces). For each link a cluster of max(--hosts) hosts comes up in a
temporary folder (and goes down at the end, also on failure); then:

- a probe on h1/h2: round-trip time of 1-byte messages and the throughput of one TCP stream
  through the shaped link, so the table can say what the link really carries;
- per host count p (ranks h1..hp, one per host, over eth0), per round, every job in turn:
  ``launch/horovodrun_gpu.sh`` under Gloo and under MPI with each setting below (the presets
  as the launchers apply them, and fusion/cycle settings that separate the buffer size from
  the cycle time), timing fp32 and fp16-compressed all-reduce of both models' gradients
  (``benchmarks/allreduce_worker.py``, the stack's own all-reduce path);
- ``launch/mpirun_cpu.sh`` with mpi4py's ``Allreduce`` of one buffer of the same bytes: what
  MPI alone achieves on the same hosts, so each row shows what Horovod costs on top of it.

The bound of a row: a bandwidth-optimal ring sends 2 (p-1)/p x bytes out of every host, and
every host's egress is shaped to the link's rate, so ``time >= 2 (p-1)/p x bytes / rate``
(the latency terms, 2 (p-1) x RTT/2, are below 1 ms at the measured RTT: not added). Each
figure is the median over rounds of the job's median step. Writes
``benchmarks/results/cluster_allreduce.{json,png}`` and its RESULTS.md section.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from benchmarks import allreduce_worker, common
from lars_tf import testing

flags.DEFINE_list("hosts", ["2", "4"], "Host counts to run on (one rank per host).")
flags.DEFINE_list("links", ["10gbe", "1gbe"], "Links to shape (tools/cluster.sh up's LINK).")
flags.DEFINE_list("models", ["resnet50", "alexnet_bn"], "Whose gradients to all-reduce.")
flags.DEFINE_integer("rounds", 2, "Rounds over all jobs of a (link, hosts).")
flags.DEFINE_integer("steps", 5, "Timed steps per block and model.")
flags.DEFINE_integer("warmup", 2, "Untimed steps before each block.")
flags.DEFINE_string("probe", None, "Internal: 'server' or 'client' of the link probe.")
common.define_output_flags("cluster_allreduce")
FLAGS = flags.FLAGS

RATE_BITS = {"10gbe": 10e9, "1gbe": 1e9}  # tools/cluster.sh's tbf rates
PROBE_PORT, PROBE_BYTES = 29611, 256 * 2**20

# (label, launcher flags): the presets as a user would pick them, then fusion and cycle.
SETTINGS = [
    ("preset single_node", ["--preset", "single_node"]),
    ("preset ethernet", ["--preset", "ethernet"]),
    ("preset infiniband", ["--preset", "infiniband"]),
    ("fusion off, cycle 1 ms", ["--fusion-threshold-mb", "0", "--cycle-time-ms", "1"]),
    ("fusion 128 MB, cycle 1 ms", ["--fusion-threshold-mb", "128", "--cycle-time-ms", "1"]),
    ("fusion 64 MB, cycle 5 ms", ["--fusion-threshold-mb", "64", "--cycle-time-ms", "5"]),
]
CONTROLLERS = ("gloo", "mpi")
OFF = "fusion off, cycle 1 ms"


def probe(role: str) -> None:
    """The link probe's two ends: the client (on h2) measures the RTT of 1-byte round trips
    and the time to push PROBE_BYTES to the server (on h1), which acknowledges the end."""
    if role == "server":
        with socket.create_server(("198.18.0.1", PROBE_PORT)) as srv:
            conn, _ = srv.accept()
            with conn:
                for _ in range(200):
                    conn.sendall(conn.recv(1))
                left = PROBE_BYTES
                while left:
                    left -= len(conn.recv(min(left, 1 << 20)))
                conn.sendall(b"k")
        return
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = socket.create_connection(("198.18.0.1", PROBE_PORT), timeout=30)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(200):
            t0 = time.perf_counter()
            conn.sendall(b"x")
            conn.recv(1)
            rtts.append(time.perf_counter() - t0)
        chunk = bytes(1 << 20)
        t0 = time.perf_counter()
        for _ in range(PROBE_BYTES >> 20):
            conn.sendall(chunk)
        conn.recv(1)
        sec = time.perf_counter() - t0
    print(json.dumps({"rtt_sec": statistics.median(rtts), "tcp_bytes_per_sec": PROBE_BYTES / sec}))


def probe_link(cluster: common.Cluster) -> dict:
    """The link probe between h1 (server) and h2 (client) of ``cluster``."""
    me = [sys.executable, "-m", "benchmarks.cluster_allreduce"]
    server = testing.start_job([common.CLUSTER, "run", "h1", *me, "--probe=server"],
                               LARS_TF_CLUSTER_DIR=cluster.state)
    try:
        out = cluster.run("h2", [*me, "--probe=client"], timeout=300).stdout
    finally:
        server.communicate(timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def horovod_job(cluster: common.Cluster, p: int, controller: str, flags_: list[str],
                out: Path) -> dict:
    hosts = ",".join(f"h{i}:1" for i in range(1, p + 1))
    cmd = [str(testing.LAUNCH / "horovodrun_gpu.sh"), f"--{controller}", "-H", hosts,
           "--network-interface", "eth0", *flags_, "--",
           *allreduce_worker.command(out, FLAGS.models, FLAGS.steps, 1, FLAGS.warmup)]
    cluster.run("h1", cmd, timeout=3600)
    return json.loads(out.read_text())


def mpi4py_job(cluster: common.Cluster, p: int, out: Path) -> dict:
    hosts = ",".join(f"h{i}:1" for i in range(1, p + 1))
    cmd = [str(testing.LAUNCH / "mpirun_cpu.sh"), "-H", hosts, "--ranks-per-node", "1",
           "--network-interface", "eth0", "--",
           *allreduce_worker.command(out, FLAGS.models, FLAGS.steps, 1, FLAGS.warmup,
                                     mpi4py=True)]
    cluster.run("h1", cmd, timeout=3600)
    return json.loads(out.read_text())


def measure() -> dict:
    if os.geteuid() != 0:
        raise app.UsageError("needs root: tools/cluster.sh makes network namespaces")
    counts = sorted({int(h) for h in FLAGS.hosts})
    if counts[0] < 2:
        raise app.UsageError(f"--hosts={','.join(FLAGS.hosts)}: at least 2 hosts per job")
    bad = [link for link in FLAGS.links if link not in RATE_BITS]
    if bad:
        raise app.UsageError(f"--links: {', '.join(bad)} (choose of {', '.join(RATE_BITS)})")
    t0 = time.time()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "job.json"
        for link in FLAGS.links:
            with common.Cluster(counts[-1], link) as cluster:
                probed = probe_link(cluster)
                print(f"[cluster_allreduce] {link}: RTT {1e6 * probed['rtt_sec']:.0f} us, one "
                      f"TCP stream {8 * probed['tcp_bytes_per_sec'] / 1e9:.2f} Gbit/s",
                      flush=True)
                for p in counts:
                    jobs = {f"{c}|{label}": [] for c in CONTROLLERS for label, _ in SETTINGS}
                    jobs["mpi4py|Allreduce"] = []
                    for r in range(FLAGS.rounds):
                        for c in CONTROLLERS:
                            for label, fl in SETTINGS:
                                res = horovod_job(cluster, p, c, fl, out)
                                jobs[f"{c}|{label}"].append(res)
                                print(f"[cluster_allreduce] {link} p={p} round {r + 1} "
                                      f"{c:4s} {label:26s} " + "  ".join(
                                          f"{m} {1e3 * (f['fp32'] - f['local']):7.1f} ms"
                                          for m, f in res.items()), flush=True)
                        res = mpi4py_job(cluster, p, out)
                        jobs["mpi4py|Allreduce"].append(res)
                        print(f"[cluster_allreduce] {link} p={p} round {r + 1} mpi4py "
                              f"Allreduce{'':17s} " + "  ".join(
                                  f"{m} {1e3 * f['allreduce']:7.1f} ms"
                                  for m, f in res.items()), flush=True)
                    runs[f"{link}|{p}"] = {"link": link, "hosts": p, "probe": probed,
                                           "jobs": jobs}
    import tensorflow as tf

    return {"command": common.command_line(), "machine": common.machine_line(),
            "versions": {"tensorflow": tf.__version__}, "rounds": FLAGS.rounds,
            "steps": FLAGS.steps, "warmup": FLAGS.warmup, "models": FLAGS.models,
            "total_sec": time.time() - t0, "runs": runs}


def _sec(results: list[dict], model: str, precision: str) -> float:
    """Median over rounds of a job's all-reduce time (Horovod's: step - step without it)."""
    if "allreduce" in results[0][model]:  # mpi4py
        return statistics.median(r[model]["allreduce"] for r in results)
    return statistics.median(r[model][precision] - r[model]["local"] for r in results)


def rows(raw: dict) -> list[dict]:
    """One row per (link, hosts, model, controller, setting), with the bound and ratios."""
    out = []
    for run in raw["runs"].values():
        link, p, jobs = run["link"], run["hosts"], run["jobs"]
        rate = RATE_BITS[link] / 8
        for model in raw["models"]:
            n_bytes = next(iter(jobs.values()))[0][model]["bytes"]
            bound = 2 * (p - 1) / p * n_bytes / rate
            mpi4py = _sec(jobs["mpi4py|Allreduce"], model, "fp32")
            for key, results in jobs.items():
                controller, label = key.split("|")
                fp32 = _sec(results, model, "fp32")
                first = results[0][model]
                if label.startswith("preset") and first.get("fusion_threshold"):
                    # what the preset held when measured (presets change with these numbers)
                    label += (f" ({int(first['fusion_threshold']) / 2**20:g} MB, "
                              f"{first['cycle_time']} ms)")
                row = {"link": link, "hosts": p, "model": model, "controller": controller,
                       "setting": label, "bytes": n_bytes, "bound": bound, "fp32": fp32,
                       "mpi4py": mpi4py, "probe": run["probe"],
                       "peak_rss_mb": max(max(r[model]["peak_rss_mb_per_rank"])
                                          for r in results)}
                if controller != "mpi4py":
                    row["fp16"] = _sec(results, model, "fp16")
                    row["off"] = _sec(jobs[f"{controller}|{OFF}"], model, "fp32")
                out.append(row)
    return out


def report(raw: dict, out: Path) -> None:
    table = ["| link | hosts | model | controller | setting | fp32 (ms) | vs fusion off | "
             "fraction of ring bound | vs mpi4py Allreduce | fp16 (ms) | fp16 fraction of "
             "fp32 bound | peak RSS/rank (MB) |", "|---" * 12 + "|"]
    found = rows(raw)
    for r in found:
        horovod = r["controller"] != "mpi4py"
        cells = [r["link"], r["hosts"], r["model"], r["controller"], r["setting"],
                 f"{1e3 * r['fp32']:.0f}", f"{r['off'] / r['fp32']:.2f}x" if horovod else "",
                 f"{r['bound'] / r['fp32']:.0%}",
                 f"{r['mpi4py'] / r['fp32']:.2f}x" if horovod else "",
                 f"{1e3 * r['fp16']:.0f}" if horovod else "",
                 f"{r['bound'] / r['fp16']:.0%}" if horovod else "", f"{r['peak_rss_mb']:.0f}"]
        table.append("| " + " | ".join(map(str, cells)) + " |")
    links = []
    for run in raw["runs"].values():
        if run["hosts"] == min(x["hosts"] for x in raw["runs"].values()):
            pr = run["probe"]
            links.append(f"{run['link']}: tbf at {RATE_BITS[run['link']] / 1e9:g} Gbit/s per "
                         f"host egress, RTT {1e6 * pr['rtt_sec']:.0f} us, one TCP stream "
                         f"{8 * pr['tcp_bytes_per_sec'] / 1e9:.2f} Gbit/s")
    sizes = {m: next(r["bytes"] for r in found if r["model"] == m) for m in raw["models"]}
    png = out.with_suffix(".png")
    plot(found, png)
    common.report(
        "cluster_allreduce",
        "All-reduce across hosts (`benchmarks/cluster_allreduce.py`)",
        "Gradients of " + ", ".join(f"{m} ({b / 2**20:.1f} MiB float32)"
                                    for m, b in sizes.items()) +
        " all-reduced (average) by `lars_tf.DistributedOptimizer` across hosts of "
        "`tools/cluster.sh` (network namespaces on this machine, one rank per host, sharing "
        "its 2 cores), each setting a job of `launch/horovodrun_gpu.sh -H h1:1,... "
        "--network-interface eth0`; mpi4py's `Allreduce` of one buffer of the same bytes "
        "through `launch/mpirun_cpu.sh` on the same hosts. Links (" + "; ".join(links) +
        "). Time = step with the all-reduce - the same step without it; median over "
        f"{raw['rounds']} rounds of the median of {raw['steps']} steps. Ring bound = "
        "2 (p-1)/p x bytes / link rate. The whole run took "
        f"{raw['total_sec'] / 60:.1f} min. Raw results: "
        f"`{os.path.relpath(out, common.RESULTS.parent)}`.",
        table + ["", f"![all-reduce across hosts]"
                     f"({os.path.relpath(png, common.RESULTS.parent)})"],
        conclusion(found), FLAGS.write, raw=raw)


def conclusion(found: list[dict]) -> str:
    """Per (link, hosts, model): the ethernet preset (what a user picks for such a link)
    against fusion off and the bound, the best Horovod setting, and raw MPI."""
    lines = []
    for key in sorted({(r["link"], r["hosts"], r["model"]) for r in found}):
        mine = [r for r in found if (r["link"], r["hosts"], r["model"]) == key]
        horovod = [r for r in mine if r["controller"] != "mpi4py"]
        best = min(horovod, key=lambda r: r["fp32"])
        line = f"{key[0]}, {key[1]} hosts, {key[2]}:"
        for c in CONTROLLERS:
            eth = next(r for r in horovod if r["controller"] == c and
                       r["setting"].startswith("preset ethernet"))
            line += (f" {c} ethernet preset {eth['off'] / eth['fp32']:.2f}x fusion off, "
                     f"{eth['bound'] / eth['fp32']:.0%} of the bound;")
        line += (f" best {best['controller']} {best['setting']} "
                 f"{best['bound'] / best['fp32']:.0%}; mpi4py's Allreduce "
                 f"{mine[0]['bound'] / mine[0]['mpi4py']:.0%}.")
        lines.append(line)
    return "\n".join(f"- {line}" for line in lines)


def plot(found: list[dict], png: Path) -> None:
    """Per (link, hosts, model) a row of two panels: time per setting (fp32 and fp16, with
    the ring bound) and the fraction of the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["link"], r["hosts"], r["model"]) for r in found})
    fig, axes = plt.subplots(len(panels), 2, figsize=(16, 2.8 * len(panels)), squeeze=False)
    for (left, right), (link, p, model) in zip(axes, panels):
        mine = [r for r in found if (r["link"], r["hosts"], r["model"]) == (link, p, model)]
        labels = [f"{r['controller']} " + r["setting"].split(" (")[0].replace(
            "preset ", "").replace("fusion ", "").replace(", cycle ", "/") for r in mine]
        xs = range(len(mine))
        for ax, value, ylabel in ((left, lambda r, k: 1e3 * r[k], "ms per all-reduce"),
                                  (right, lambda r, k: r["bound"] / r[k], "fraction of bound")):
            ax.bar([x - 0.2 for x in xs], [value(r, "fp32") for r in mine], 0.4, label="fp32")
            ax.bar([x + 0.2 for x in xs], [value(r, "fp16") if "fp16" in r else 0
                                           for r in mine], 0.4, label="fp16 compression")
            ax.set_xticks(list(xs), labels, fontsize=6, rotation=30, ha="right")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{model}, {p} hosts, {link}", fontsize=9)
        left.axhline(1e3 * mine[0]["bound"], color="k", ls=":", lw=1, label="ring bound (fp32)")
        right.axhline(1.0, color="k", ls=":", lw=1)
        right.axhline(0.7, color="r", ls=":", lw=1, label="70% of the bound")
        left.legend(fontsize=7)
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main(argv):
    del argv
    if FLAGS.probe:
        probe(FLAGS.probe)
        return
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not FLAGS.report_only:
        out.write_text(json.dumps(measure(), indent=1))
    report(json.loads(out.read_text()), out)


if __name__ == "__main__":
    app.run(main)
