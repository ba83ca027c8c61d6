"""Elastic jobs on real hosts (tools/cluster.sh: h1..h3 run ranks, h4 runs horovodrun, as a
login node would): a host lost mid-epoch and added back, rank 0's host among them, and a
host that keeps failing. Needs root; CI runs as root."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from lars_tf.testing import BIN, LAUNCH, REPO, fashion_mnist_dir, job_env, run_job
from tests.test_cluster import CLUSTER, _cluster, _cmdline, hosts_up

pytestmark = [pytest.mark.multiprocess, pytest.mark.cluster]  # cluster: root only


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    yield from hosts_up(tmp_path_factory, 4)


def _discovery(tmp_path, listed):
    """A discovery script that prints the hosts in a file the test edits."""
    listing = tmp_path / "hosts.txt"
    listing.write_text("".join(f"{h}:1\n" for h in listed))
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {listing}\n")
    script.chmod(0o755)
    return script, listing


# 30 updates of 600 per epoch (18,000 examples), about 2 s an epoch here: long enough for a
# lost host to come back before the end; commits every 3 updates
EPOCHS = 16
TRAIN = ["--model=mlp", "--global_batch_size=600", "--train_examples=18000",
         f"--epochs={EPOCHS}",
         "--learning_rate=0.5", "--warmup_epochs=0.5", "--deterministic", "--noprogress_bar",
         "--elastic_commit_every=3", "--check_replicas_every=5"]


def _start(hosts, tmp_path, script, np_, min_np, extra=(), timeout_s=60, cooldown=None):
    cmd = [CLUSTER, "run", "h4", str(LAUNCH / "horovodrun_gpu.sh"), "--elastic",
           "--host-discovery-script", str(script), "-np", str(np_), "--min-np", str(min_np),
           "--max-np", "3", "--elastic-timeout", str(timeout_s),
           *(["--blacklist-cooldown-range", cooldown] if cooldown else []),
           "--network-interface", "eth0", "--", *extra]
    # a lost peer shows on the others as a Gloo timeout: 10 s here, not Horovod's 30
    env = job_env(LARS_TF_CLUSTER_DIR=hosts["LARS_TF_CLUSTER_DIR"],
                  LARS_TF_DATA_DIR=fashion_mnist_dir(), HOROVOD_GLOO_TIMEOUT_SECONDS=10)
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    proc.log = tmp_path / "job.log"
    return proc


def _output(proc) -> str:
    return proc.log.read_text()


def _wait_for(path, proc, seconds, what):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the job ended before {what}:\n{_output(proc)[-6000:]}"
        assert time.monotonic() < deadline, \
            f"no {what} after {seconds} s:\n{_output(proc)[-6000:]}"
        time.sleep(0.1)


def _end(proc, timeout: float) -> tuple[str, float]:
    """The job's output once it has ended (killed, with its process group, after
    ``timeout`` s), and the seconds it took to end."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return _output(proc), time.monotonic() - t0


def test_rank_0s_host_is_lost_mid_epoch_and_comes_back(hosts, tmp_path):
    """3 ranks on h1..h3. Mid-epoch 2, rank 0's host vanishes: its processes killed, its
    link down, and the discovery script stops listing it. The job goes on with 2 ranks
    without a restart, rank 0 now on a survivor writing the checkpoints; the host comes back
    (after the 5-10 s a failed host sits out) and the job grows to 3 again. Every epoch
    reads exactly 30 updates x 600 examples, and the result is a one-process run's."""
    script, listing = _discovery(tmp_path, ["h1", "h2", "h3"])
    run_dir = tmp_path / "run"
    proc = _start(hosts, tmp_path, script, 3, 2, [f"--model_dir={run_dir}", *TRAIN],
                  cooldown="5 10")
    ok = False
    try:
        _wait_for(run_dir / "checkpoints" / "epoch-000001", proc, 300, "first checkpoint")
        victim = re.search(r"rank 0 on (h\d)", _output(proc)).group(1)
        time.sleep(1.0)  # into epoch 2
        listing.write_text("".join(f"{h}:1\n" for h in ("h1", "h2", "h3") if h != victim))
        _cluster(hosts, "kill", victim)
        t_lost = time.monotonic()
        deadline = t_lost + 300
        while not re.search(r"is now rank \d of 2", _output(proc)):
            assert proc.poll() is None and time.monotonic() < deadline, _output(proc)[-6000:]
            time.sleep(0.1)
        recovered = time.monotonic() - t_lost
        _cluster(hosts, "revive", victim)
        listing.write_text("h1:1\nh2:1\nh3:1\n")
        ok = True
    finally:
        out, _ = _end(proc, 600 if ok else 0)
        _cluster(hosts, "revive", victim) if "victim" in locals() else None
    assert proc.returncode == 0, out[-6000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_done"] == EPOCHS
    assert [h["examples"] for h in summary["history"]] == [18000.0] * EPOCHS, \
        summary["history"]
    # the same global batch on 2 ranks as on 3, as each logged it when it (re)started
    assert "3 ranks x 1 passes x 200 = global batch 600" in out, out[-6000:]
    assert "2 ranks x 1 passes x 300 = global batch 600" in out, out[-6000:]
    assert summary["elastic_resets"] >= 2, out[-6000:]
    # grown back to 3, the lost host among them, and rank 0 on a host that stayed
    assert summary["world_size"] == 3, out[-6000:]
    assert victim in [r["host"] for r in summary["ranks"]]
    assert summary["ranks"][0]["host"] != victim
    # the checkpoints after the loss came from the new rank 0
    assert (run_dir / "checkpoints" / f"epoch-{EPOCHS:06d}").exists()
    print(f"lost {victim} (rank 0) -> 2 ranks again in {recovered:.1f} s")

    one = tmp_path / "one"
    run_job([str(BIN / "lars-train"), f"--model_dir={one}", "--elastic", *TRAIN],
            timeout=600, LARS_TF_DATA_DIR=fashion_mnist_dir())
    alone = json.loads((one / "summary.json").read_text())
    assert abs(summary["final_test_accuracy"] - alone["final_test_accuracy"]) < 0.005, \
        (summary["final_test_accuracy"], alone["final_test_accuracy"])


def test_a_host_that_keeps_failing_ends_the_job_below_min_np(hosts, tmp_path):
    """h2's rank is killed while the discovery script still lists h2: Horovod blacklists
    the host, the job has 1 rank left for --min-np 2, and after --elastic-timeout (20 s)
    it ends non-zero, leaving no rank behind on any host."""
    script, _ = _discovery(tmp_path, ["h1", "h2"])
    run_dir = tmp_path / "run"
    proc = _start(hosts, tmp_path, script, 2, 2,
                  [f"--model_dir={run_dir}", *TRAIN], timeout_s=20)
    ok = False
    try:
        _wait_for(run_dir / "checkpoints" / "epoch-000001", proc, 300, "first checkpoint")
        pids = subprocess.run(["ip", "netns", "pids", "h2"], capture_output=True,
                              text=True).stdout.split()
        ranks = [p for p in pids if "lars-train" in _cmdline(p)]
        assert ranks, pids
        for p in ranks:
            os.kill(int(p), signal.SIGKILL)
        ok = True
    finally:
        out, seconds = _end(proc, 180 if ok else 0)
    assert proc.returncode != 0, out[-4000:]
    # h2 is still listed, but blacklisted: no rank is started there again, and 1 slot is
    # left for --min-np 2
    assert "enough resources to run at least 2 Horovod processes" in out, out[-4000:]
    assert "Timeout after 20 seconds" in out, out[-4000:]
    assert seconds < 120, seconds
    print(f"a rank killed on h2 -> the job ended {seconds:.1f} s later")
    # the rank left on h1 waits for a new assignment from the driver, which is gone: it
    # gives up within Gloo's timeout (10 s here) and exits
    deadline = time.monotonic() + 60
    while left := _ranks_left():
        assert time.monotonic() < deadline, left
        time.sleep(0.5)
    print(f"no rank left {time.monotonic() - deadline + 60:.1f} s after the job ended")


def _ranks_left() -> list[str]:
    return [f"{h}: {_cmdline(p)}" for h in ("h1", "h2", "h3", "h4")
            for p in subprocess.run(["ip", "netns", "pids", h], capture_output=True,
                                    text=True).stdout.split()
            if "lars-train" in _cmdline(p) or "horovodrun" in _cmdline(p)]

