"""What losing a host costs: an elastic job's reset against today's restart from the last
checkpoint, on hosts of ``tools/cluster.sh``.

    python -m benchmarks.elastic_reset [--rounds 2]

Needs root (network namespaces). Four hosts come up (links unshaped): h1..h3 run one rank
each, h4 runs the launcher, as a login node would. The job: the mlp on Fashion-MNIST,
global batch 600 (100 updates an epoch), 3 epochs. Mid-epoch 2 (2 s after the first
checkpoint) the host of rank 2 vanishes (``cluster.sh kill``: link down, every process
killed), and

- **elastic** (``launch/horovodrun_gpu.sh --elastic``, commits every 3 updates): the
  discovery script stops listing the host, the other ranks time out on it (Gloo's timeout,
  ``HOROVOD_GLOO_TIMEOUT_SECONDS``: 10 s here), roll back to their last commit, meet again
  as 2 ranks and go on;
- **restart** (the same job without ``--elastic``): the job ends (the same Gloo timeout),
  and it is started again on the 2 hosts left with ``--resume``, from the last checkpoint.

Each figure is read from the job's own log: from the kill to rank 0's "first update done"
line of the job that goes on, and the update it went on from (the work to redo: the last
commit, or the last checkpoint, against where the job was at the kill). Writes
``benchmarks/results/elastic_reset.json`` and its RESULTS.md section.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from benchmarks import common
from lars_tf import testing

flags.DEFINE_integer("rounds", 2, "Losses measured per way of recovering.")
common.define_output_flags("elastic_reset")
FLAGS = flags.FLAGS

GLOO_TIMEOUT_S = 10
# 100 updates an epoch (about 5 s here): the kill, 2 s after the first checkpoint, falls in
# the middle of epoch 2 for both ways
TRAIN = ["--model=mlp", "--global_batch_size=600", "--train_examples=60000", "--epochs=3",
         "--learning_rate=0.5", "--warmup_epochs=0.5", "--noprogress_bar"]
UPDATES_PER_EPOCH = 100
KILL_AFTER_S = 2.0  # after the first checkpoint: into epoch 2 (about 5 s long on 3 ranks)
_LOG_TIME = re.compile(r"\]<std(?:err|out)>:[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+) ")


def _log_time(line: str) -> float:
    """The wall time (seconds since the epoch) of an absl log line of a rank."""
    m = _LOG_TIME.search(line)
    day = datetime.date.today()
    stamp = datetime.datetime.strptime(f"{day.year}{m.group(1)} {m.group(2)}",
                                       "%Y%m%d %H:%M:%S.%f")
    return stamp.timestamp()


def _first_update_after(log: str, t_kill: float) -> tuple[float, int]:
    """(seconds from the kill, update of the run) of rank 0's first update after it."""
    for line in log.splitlines():
        m = re.search(r"first update done \(update (\d+) of the run\)", line)
        if m and _log_time(line) > t_kill:
            return _log_time(line) - t_kill, int(m.group(1))
    raise RuntimeError(f"no update after the kill in the log:\n{log[-4000:]}")


def _launch(cluster, tmp: Path, args: list[str], log: Path) -> subprocess.Popen:
    env = testing.job_env(LARS_TF_CLUSTER_DIR=cluster.state,
                          LARS_TF_DATA_DIR=testing.fashion_mnist_dir(),
                          HOROVOD_GLOO_TIMEOUT_SECONDS=GLOO_TIMEOUT_S)
    return subprocess.Popen([common.CLUSTER, "run", "h4",
                             str(testing.LAUNCH / "horovodrun_gpu.sh"), *args],
                            cwd=testing.REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(path: Path, proc, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {path} (job ended or {seconds} s passed)")
        time.sleep(0.05)


def elastic_round(cluster, tmp: Path, rank0: bool = False) -> dict:
    listing, script = tmp / "hosts.txt", tmp / "discover.sh"
    listing.write_text("h1:1\nh2:1\nh3:1\n")
    script.write_text(f"#!/bin/sh\ncat {listing}\n")
    script.chmod(0o755)
    run_dir, log = tmp / "run", tmp / "job.log"
    proc = _launch(cluster, tmp, ["--elastic", "--host-discovery-script", str(script),
                                  "-np", "3", "--min-np", "2", "--max-np", "3",
                                  "--network-interface", "eth0", "--",
                                  f"--model_dir={run_dir}", "--elastic_commit_every=3",
                                  *TRAIN], log)
    try:
        _wait_for(run_dir / "checkpoints" / "epoch-000001", proc, 600)
        time.sleep(KILL_AFTER_S)
        text = log.read_text()
        rank0_host = re.search(r"rank 0 on (h\d)", text).group(1)
        victim = rank0_host if rank0 else next(h for h in ("h3", "h2", "h1")
                                               if h != rank0_host)
        listing.write_text("".join(f"{h}:1\n" for h in ("h1", "h2", "h3") if h != victim))
        t_kill = time.time()
        cluster.kill(victim)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.revive(victim)
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"the elastic job failed:\n{text[-4000:]}")
    seconds, update = _first_update_after(text, t_kill)
    rolled = re.search(r"at epoch (\d+), update (\d+): rolling back to epoch (\d+), "
                       r"update (\d+)", text)
    return {"way": "elastic, rank 0's host lost" if rank0 else "elastic",
            "seconds_to_first_update": seconds, "went_on_from": update - 1,
            "epoch_1_images_per_sec": _epoch_1_rate(run_dir),
            "peak_rss_mb_per_rank": _peak_rss_mb(run_dir),
            "failed_at": [int(rolled.group(1)), int(rolled.group(2))] if rolled else None,
            "rolled_back_to": [int(rolled.group(3)), int(rolled.group(4))] if rolled else None}


def restart_round(cluster, tmp: Path) -> dict:
    run_dir, log = tmp / "run", tmp / "job.log"
    base = ["--gloo", "--network-interface", "eth0"]
    proc = _launch(cluster, tmp, [*base, "-H", "h1:1,h2:1,h3:1", "--",
                                  f"--model_dir={run_dir}", *TRAIN], log)
    try:
        _wait_for(run_dir / "checkpoints" / "epoch-000001", proc, 600)
        time.sleep(KILL_AFTER_S)
        t_kill = time.time()
        cluster.kill("h3")
        proc.wait(timeout=300)
        t_ended = time.time()
        log2 = tmp / "resumed.log"
        proc = _launch(cluster, tmp, [*base, "-H", "h1:1,h2:1", "--",
                                      f"--model_dir={run_dir}", "--resume", *TRAIN], log2)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.revive("h3")
    text = log2.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"the resumed job failed:\n{text[-4000:]}")
    seconds, update = _first_update_after(text, t_kill)
    return {"way": "restart", "seconds_to_first_update": seconds, "went_on_from": update - 1,
            "epoch_1_images_per_sec": _epoch_1_rate(run_dir),
            "peak_rss_mb_per_rank": _peak_rss_mb(run_dir),
            "seconds_to_job_end": t_ended - t_kill}


def _epoch_1_rate(run_dir: Path) -> float:
    """Images/sec of epoch 1, on 3 ranks before the loss (tracing included), from the
    run's summary: what --elastic costs while nothing fails."""
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    return float(history[0]["images_per_sec"])


def _peak_rss_mb(run_dir: Path) -> float:
    """The largest peak memory of a rank that finished the run (its summary's)."""
    return max(json.loads((run_dir / "summary.json").read_text())["peak_rss_mb_per_rank"])


class _Cluster(common.Cluster):
    def kill(self, host):
        subprocess.run([common.CLUSTER, "kill", host], env=self.env, check=True, timeout=60)

    def revive(self, host):
        subprocess.run([common.CLUSTER, "revive", host], env=self.env, check=True, timeout=60)


def _report(raw: dict) -> None:
    rows = raw["rows"]

    def med(way, key):
        vals = [r[key] for r in rows if r["way"] == way and r.get(key) is not None]
        return statistics.median(vals) if vals else float("nan")

    table = ["| way | round | kill -> first update (s) | went on from update | epoch 1 on 3 "
             "ranks (images/s) | peak RSS per rank (MB) | note |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        note = (f"failed at epoch {r['failed_at'][0]}, update {r['failed_at'][1]}; rolled "
                f"back to update {r['rolled_back_to'][1]}" if r.get("rolled_back_to")
                else f"job ended {r['seconds_to_job_end']:.1f} s after the kill"
                if "seconds_to_job_end" in r else "")
        table.append(f"| {r['way']} | {i // 3 + 1} | {r['seconds_to_first_update']:.1f} | "
                     f"{r['went_on_from']} | {r.get('epoch_1_images_per_sec', 0):,.0f} | "
                     f"{r.get('peak_rss_mb_per_rank', 0):,.0f} | {note} |")
    e, s = med("elastic", "seconds_to_first_update"), med("restart", "seconds_to_first_update")
    e0 = med("elastic, rank 0's host lost", "seconds_to_first_update")
    conclusion = (
        f"Median time from the loss to the first update after it: elastic **{e:.1f} s** "
        f"({e0:.1f} s when the host was rank 0's), restart **{s:.1f} s** ({s / e:.1f}x). "
        f"Both wait out Gloo's {GLOO_TIMEOUT_S} s "
        "timeout first; the restart then starts every process again (TensorFlow's import, "
        "the data, the model, a trace) and goes back to the last checkpoint "
        f"(update {UPDATES_PER_EPOCH} of the run, the end of epoch 1, or "
        f"{2 * UPDATES_PER_EPOCH} when epoch 2 ended before the loss), where the elastic job "
        "goes back at most `--elastic_commit_every` - 1 updates (9 here), to its last "
        "commit. While nothing fails, --elastic costs throughput: epoch 1's images/s (the "
        "same 3 ranks, tracing included) were "
        f"{med('elastic', 'epoch_1_images_per_sec'):,.0f} elastic against "
        f"{med('restart', 'epoch_1_images_per_sec'):,.0f} without (one Keras fit per epoch, "
        "its data built again, and a commit's copy and broadcast every 10 updates, which "
        "on this tiny model weigh more than on a real one).")
    common.report("elastic_reset", "Elastic reset against a restart (a host lost)",
                  "The time a host's loss costs, from the kill to rank 0's first update "
                  "after it (`benchmarks/elastic_reset.py`: 3 ranks on 3 hosts of "
                  "tools/cluster.sh, the launcher on a fourth; mlp, Fashion-MNIST, global "
                  "batch 600, 100 updates an epoch; a host killed mid-epoch 2: rank 0's or "
                  "another's for the elastic job, rank 2's for the restart). "
                  f"Whole run: {raw['wall_sec']:.0f} s.",
                  table, conclusion, FLAGS.write, raw if FLAGS.report_only else None)


def main(argv):
    del argv
    out = Path(FLAGS.out)
    if FLAGS.report_only:
        _report(json.loads(out.read_text()))
        return
    if os.geteuid() != 0:
        sys.exit("benchmarks.elastic_reset: tools/cluster.sh needs root")
    import tempfile

    t0 = time.time()
    rows = []
    with _Cluster(4, "none") as cluster:
        for _ in range(FLAGS.rounds):
            for fn in (elastic_round, functools.partial(elastic_round, rank0=True),
                       restart_round):
                with tempfile.TemporaryDirectory(prefix="lars_tf_elastic_bench_") as tmp:
                    rows.append(fn(cluster, Path(tmp)))
                    print(rows[-1], flush=True)
    raw = {"command": common.command_line(), "machine": common.machine_line(), "rows": rows,
           "wall_sec": time.time() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(raw, indent=2))
    _report(raw)


if __name__ == "__main__":
    app.run(main)
