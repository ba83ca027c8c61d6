"""Two real hosts on this machine (tools/cluster.sh: network namespaces h1, h2 with their own
address, hostname and sshd): lars-train started across them by our launchers and by Slurm,
a host lost mid-run, and the fixture's clean-up. Needs root; CI runs as root."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from lars_tf.testing import LAUNCH, REPO, job_env, run_job

CLUSTER = str(REPO / "tools" / "cluster.sh")

pytestmark = [pytest.mark.multiprocess, pytest.mark.cluster]  # cluster: root only


def _cluster(env, *args, check=True):
    proc = subprocess.run([CLUSTER, *args], env=env, text=True, capture_output=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _leftovers(state_dir) -> list[str]:
    """What a cluster could leave behind: namespaces, /etc/netns entries, its folder, the
    processes it started (sshd, and Slurm's daemons)."""
    found = [f"netns {n}" for n in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        if n.startswith(("h", "lars-switch"))]
    found += [f"/etc/netns/{n}" for n in os.listdir("/etc/netns")] \
        if os.path.isdir("/etc/netns") else []
    found += [str(state_dir)] if os.path.exists(state_dir) else []
    found += [f"process {line}" for line in subprocess.run(  # sshd, munged, slurmctld, slurmd
        ["pgrep", "-af", str(state_dir)], capture_output=True, text=True).stdout.splitlines()]
    return found


def test_cluster_refuses_bad_requests(tmp_path):
    state = tmp_path / "state"
    env = job_env(LARS_TF_CLUSTER_DIR=state)
    proc = _cluster(env, "up", "0", check=False)
    assert proc.returncode != 0 and "N must be 1..32" in proc.stderr
    proc = _cluster(env, "up", "2", "100gbe", check=False)
    assert proc.returncode != 0 and "link '100gbe'" in proc.stderr
    # the script read from stdin: `nobody` may not enter the folder of the checkout (a
    # clone under mktemp -d), and the test is of the script, not of that folder's mode
    with open(CLUSTER) as script:
        proc = subprocess.run(["runuser", "-u", "nobody", "--", "bash", "-s", "--", "up", "2"],
                              stdin=script, env=env, text=True, capture_output=True,
                              timeout=60)
    assert proc.returncode != 0 and "needs root" in proc.stderr
    assert not state.exists()
    # a folder the cluster did not make is neither reused by up nor deleted by down
    state.mkdir()
    (state / "precious").write_text("kept")
    proc = _cluster(env, "up", "1", check=False)
    assert proc.returncode != 0 and "exists" in proc.stderr
    proc = _cluster(env, "down", check=False)
    assert proc.returncode != 0 and "was not made by tools/cluster.sh up" in proc.stderr
    assert (state / "precious").read_text() == "kept"


def test_cluster_down_leaves_nothing_behind_even_after_a_host_is_killed(tmp_path):
    """Runs first, before the module's cluster: up 2, a process left running on h2, h2
    killed (its processes and link), then down: no namespace, /etc/netns entry, folder or
    sshd is left."""
    state = tmp_path / "state"
    env = job_env(LARS_TF_CLUSTER_DIR=state)
    _cluster(env, "up", "2")
    try:
        assert _cluster(env, "run", "h1", "ssh", "h2", "hostname").stdout.strip() == "h2"
        sleeper = subprocess.Popen([CLUSTER, "run", "h2", "sleep", "600"], env=env)
        deadline = time.monotonic() + 60
        while not any(_cmdline(p) == "sleep 600" for p in _netns_pids("h2")):
            assert sleeper.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        _cluster(env, "kill", "h2")
        assert sleeper.wait(timeout=30) != 0
        assert _cluster(env, "run", "h1", "ssh", "h2", "true", check=False).returncode != 0
        assert _leftovers(state) != []
    finally:
        _cluster(env, "down")
    assert _leftovers(state) == []


def _netns_pids(name) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def hosts_up(tmp_path_factory, n: int):
    """A fixture's body: ``n`` hosts up in a folder of their own, yielding the environment
    that names it; down afterwards, leaving nothing behind."""
    state = tmp_path_factory.mktemp("cluster") / "state"
    env = job_env(LARS_TF_CLUSTER_DIR=state)
    _cluster(env, "up", str(n))
    try:
        yield env
    finally:
        _cluster(env, "down")
        assert _leftovers(state) == []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from hosts_up(tmp_path_factory, 2)


def _summary(model_dir):
    return json.loads((model_dir / "summary.json").read_text())


TRAIN = ["--model=mlp", "--global_batch_size=1024", "--epochs=1", "--train_examples=8192",
         "--learning_rate=1.0", "--warmup_epochs=0.5", "--check_replicas_every=1",
         "--noprogress_bar"]


@pytest.mark.parametrize("controller, hosts", [
    ("--gloo", ["-H", "h1:1,h2:1"]),
    ("--mpi", ["--hostfile", "HOSTFILE"]),
])
def test_horovodrun_launcher_trains_across_two_hosts(cluster, tmp_path, controller, hosts):
    """launch/horovodrun_gpu.sh on h1 starts one rank on each host (ssh to h2), over the
    hosts' eth0; every step checks that both ranks hold identical weights and optimizer
    state (--check_replicas_every=1), and each rank's record names its own host."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("h1 slots=1\nh2 slots=1\n")
    hosts = [str(hostfile) if h == "HOSTFILE" else h for h in hosts]
    model_dir = tmp_path / "run"
    proc = run_job([CLUSTER, "run", "h1", str(LAUNCH / "horovodrun_gpu.sh"), controller,
                    *hosts, "--network-interface", "eth0", "--",
                    f"--model_dir={model_dir}", *TRAIN], timeout=600, **_env(cluster))
    ranks = _summary(model_dir)["ranks"]
    assert [r["host"] for r in ranks] == ["h1", "h2"], proc.stdout[-2000:]
    assert _summary(model_dir)["epochs_done"] == 1


def test_mpirun_launcher_binds_ranks_per_host_and_exports_its_settings(cluster, tmp_path):
    """launch/mpirun_cpu.sh --hostfile across 2 hosts: the remote rank (on h2) trains, and
    its own record holds the settings the launcher exported."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("h1 slots=1\nh2 slots=1\n")
    model_dir = tmp_path / "run"
    run_job([CLUSTER, "run", "h1", str(LAUNCH / "mpirun_cpu.sh"), "--hostfile", str(hostfile),
             "--ranks-per-node", "1", "--network-interface", "eth0",
             "--fusion-threshold-mb", "32", "--cycle-time-ms", "3", "--",
             f"--model_dir={model_dir}", *TRAIN], timeout=600, **_env(cluster))
    ranks = _summary(model_dir)["ranks"]
    assert [r["host"] for r in ranks] == ["h1", "h2"]
    remote = ranks[1]["env"]
    assert remote["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0))), remote
    assert remote["HOROVOD_FUSION_THRESHOLD"] == str(32 * 1024 * 1024), remote
    assert remote["HOROVOD_CYCLE_TIME"] == "3", remote


def _env(cluster) -> dict:
    return {"LARS_TF_CLUSTER_DIR": cluster["LARS_TF_CLUSTER_DIR"]}


def _sbatch(cluster, tmp_path, *args, timeout=600) -> None:
    """Submit a batch job on h1 and wait until it ends, failing with its output unless it
    completed with exit code 0. Polls scontrol every 0.5 s: `sbatch --wait` polls with a
    growing interval, and returned 31 s after a job of 11 s."""
    out = tmp_path / "slurm-%j.out"
    proc = run_job([CLUSTER, "run", "h1", "sbatch", "--parsable", f"--output={out}", *args],
                   timeout=120, **_env(cluster))
    job = proc.stdout.strip().splitlines()[-1].split(";")[0]
    deadline = time.monotonic() + timeout
    while True:
        info = _cluster(cluster, "run", "h1", "scontrol", "-o", "show", "job", job).stdout
        state = re.search(r"JobState=(\S+)", info).group(1)
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            break
        assert time.monotonic() < deadline, f"job {job} still {state} after {timeout} s"
        time.sleep(0.5)
    log = tmp_path / f"slurm-{job}.out"
    text = log.read_text()[-3000:] if log.exists() else "(no output file)"
    assert state == "COMPLETED" and "ExitCode=0:0" in info, f"job {job}: {state}\n{text}"


def test_slurm_sbatch_runs_a_job_across_two_hosts(cluster, tmp_path):
    """Slurm on the hosts (tools/cluster.sh slurm: munged, slurmctld on h1, slurmd on both):
    `sbatch -N 2 launch/slurm.sbatch --launcher mpirun` trains with one rank on each node of
    the allocation, each with the task's CPUs as its threads."""
    _cluster(cluster, "slurm")
    model_dir = tmp_path / "run"
    _sbatch(cluster, tmp_path, "-N", "2", "--ntasks-per-node=1", "--cpus-per-task=2",
            str(LAUNCH / "slurm.sbatch"), "--launcher", "mpirun", "--",
            f"--model_dir={model_dir}", *TRAIN)
    ranks = _summary(model_dir)["ranks"]
    assert [r["host"] for r in ranks] == ["h1", "h2"]
    assert [r["env"]["OMP_NUM_THREADS"] for r in ranks] == ["2", "2"]
    assert _summary(model_dir)["epochs_done"] == 1


def test_slurm_elastic_job_runs_on_the_allocation(cluster, tmp_path):
    """`sbatch -N 2 launch/slurm.sbatch --launcher horovodrun --elastic`: horovodrun's
    elastic driver on the allocation's node list (a discovery script of the nodes) trains
    with one rank on each node, every epoch reading exactly its examples."""
    proc = _cluster(cluster, "slurm", check=False)  # up already, after the test before
    assert proc.returncode == 0 or "already started" in proc.stderr, proc.stderr
    model_dir = tmp_path / "run"
    _sbatch(cluster, tmp_path, "-N", "2", "--ntasks-per-node=1", "--cpus-per-task=2",
            str(LAUNCH / "slurm.sbatch"), "--launcher", "horovodrun", "--elastic", "--",
            f"--model_dir={model_dir}", *TRAIN)
    summary = _summary(model_dir)
    assert sorted(r["host"] for r in summary["ranks"]) == ["h1", "h2"]
    assert summary["config"]["elastic"] is True
    assert [h["examples"] for h in summary["history"]] == [8192.0]


def test_a_lost_host_ends_the_job_and_the_hosts_left_resume(cluster, tmp_path):
    """h2 disappears mid-epoch (every process on it killed, its link taken down, as a host
    that loses power): the job on h1 ends non-zero within 60 s naming the lost rank, and
    --resume on h1 alone continues from the last checkpoint."""
    run = ["--model=mlp", "--global_batch_size=1024", "--epochs=3", "--warmup_epochs=0.5",
           "--noprogress_bar", f"--model_dir={tmp_path}"]
    launch = [CLUSTER, "run", "h1", str(LAUNCH / "horovodrun_gpu.sh"), "--gloo"]
    proc = subprocess.Popen(launch + ["-H", "h1:1,h2:1", "--network-interface", "eth0", "--",
                                      *run], cwd=REPO,
                            env=job_env(**_env(cluster)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "checkpoints" / "epoch-000001").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.1)
        time.sleep(0.5)  # into epoch 2
        _cluster(cluster, "kill", "h2")
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=90)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        _cluster(cluster, "revive", "h2")
    assert proc.returncode != 0, out[-3000:]
    assert seconds < 60, (seconds, out[-3000:])
    # horovodrun's ssh session to h2 ends (the cluster's keepalives: about 6 s), and it ends
    # the job, before Gloo's collectives on h1 would time out (30 s, naming no peer); the
    # launcher's ssh probe names the host that is gone and the checkpoint to resume from
    assert re.search(r"these hosts no longer answer ssh: h2 \(lost", out), out[-3000:]
    assert re.search(r"the newest checkpoint is \S+/checkpoints/epoch-00000[12]: continue "
                     r"from it with --resume", out), out[-3000:]

    # one host left: horovodrun runs it locally (over loopback, not eth0)
    run_job(launch + ["-H", "h1:1", "--", *run, "--resume"], timeout=600, **_env(cluster))
    summary = _summary(tmp_path)
    assert summary["resumed_from_epoch"] in (1, 2) and summary["epochs_done"] == 3
    assert [r["host"] for r in summary["ranks"]] == ["h1"]

