"""The launchers in launch/: real 2-rank runs on localhost, dry runs, and bad input."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from lars_tf.testing import LAUNCH, REPO, job_env, run_job

pytestmark = pytest.mark.multiprocess

SHORT_RUN = ["--model=mlp", "--epochs=1", "--warmup_epochs=0", "--global_batch_size=1024",
             "--progress_bar=false"]


def ranks_of(model_dir):
    return json.loads((model_dir / "summary.json").read_text())["ranks"]


def timeline_events(path):
    events = json.loads(path.read_text())  # must be valid JSON as written
    return {e.get("name") for e in events if e.get("ph") == "B"}


def test_horovodrun_launcher_settings_reach_every_rank(tmp_path):
    run = tmp_path / "run"
    timeline = tmp_path / "timeline.json"
    run_job([str(LAUNCH / "horovodrun_gpu.sh"), "-H", "localhost", "--gpus-per-host", "2",
             "--fusion-threshold-mb", "32", "--cycle-time-ms", "3",
             "--timeline-filename", str(timeline),
             "--", *SHORT_RUN, f"--model_dir={run}"], timeout=240)
    ranks = ranks_of(run)
    assert len(ranks) == 2
    for r in ranks:
        assert r["env"]["HOROVOD_FUSION_THRESHOLD"] == str(32 * 2**20)  # flag
        assert r["env"]["HOROVOD_CYCLE_TIME"] == "3"  # flag
        assert r["env"]["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "120"  # preset single_node
    events = timeline_events(timeline)
    assert {"NEGOTIATE_ALLREDUCE", "ALLREDUCE"} <= events
    # fusion on: Horovod packed gradients into its fusion buffer
    assert "MEMCPY_IN_FUSION_BUFFER" in events


def test_fusion_off_reaches_horovod(tmp_path):
    """Threshold 0 must switch Horovod's tensor fusion off: the timeline then shows
    all-reduces but never a copy into the fusion buffer. (With the Gloo controller; the
    test above runs the default, MPI.)"""
    timeline = tmp_path / "timeline.json"
    run_job([str(LAUNCH / "horovodrun_gpu.sh"), "--gloo", "--gpus-per-host", "2",
             "--fusion-threshold-mb", "0", "--timeline-filename", str(timeline),
             "--", *SHORT_RUN], timeout=240)
    events = timeline_events(timeline)
    assert "ALLREDUCE" in events
    assert "MEMCPY_IN_FUSION_BUFFER" not in events


def test_mpirun_launcher_binds_ranks_sizes_threads_and_autotunes(tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "autotune.csv"
    run_job([str(LAUNCH / "mpirun_cpu.sh"), "--ranks-per-node", "2", "--cores-per-node", "2",
             "--autotune-log-file", str(log), "--", *SHORT_RUN, f"--model_dir={run}"],
            timeout=240,
            # a short run: let autotune score a sample every 5 steps, after 1 warmup sample
            HOROVOD_AUTOTUNE_WARMUP_SAMPLES=1, HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE=5)
    ranks = ranks_of(run)
    assert len(ranks) == 2
    cores = [set(r["cpu_affinity"]) for r in ranks]
    assert all(len(c) == 1 for c in cores) and not cores[0] & cores[1]  # one core each
    for r in ranks:
        assert r["intra_op_threads"] == 1
        assert r["env"]["OMP_NUM_THREADS"] == "1"
        assert r["env"]["HOROVOD_AUTOTUNE"] == "1"
        assert r["env"]["HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE"] == "5"  # caller's env, via -x
        # Open MPI yields while Horovod's per-cycle collective waits (busy-polling took 31%
        # of the compute of a rank bound to one core)
        assert r["env"]["OMPI_MCA_mpi_yield_when_idle"] == "1"
    lines = log.read_text().splitlines()
    assert "tensor_fusion_threshold" in lines[0] and "cycle_time_ms" in lines[0]
    assert len(lines) >= 2 and all(float(x) >= 0 for x in lines[1].split(","))


def dry_run(script, *args, **env):
    proc = subprocess.run([str(LAUNCH / script), "--dry-run", *args], cwd=REPO,
                          env=job_env(**env), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    env_lines = [line for line in proc.stdout.splitlines() if line.startswith("export ")]
    command = proc.stdout.strip().splitlines()[-1]
    return env_lines, command


def test_dry_run_shows_every_setting_and_where_it_came_from():
    env_lines, command = dry_run(
        "horovodrun_gpu.sh", "-H", "a:4,b:4", "--preset", "ethernet", "--fusion-threshold-mb",
        "32", "--fp16-allreduce", "--gloo", "--", "--model=resnet50", HOROVOD_CYCLE_TIME="7")
    assert "export HOROVOD_FUSION_THRESHOLD=33554432  # flag" in env_lines
    assert "export HOROVOD_CYCLE_TIME=7  # your environment" in env_lines
    assert "export HOROVOD_HIERARCHICAL_ALLREDUCE=1  # preset ethernet" in env_lines
    assert command.startswith("horovodrun --gloo -np 8 -H a:4\\,b:4 lars-train")
    assert command.split()[-2:] == ["--model=resnet50", "--fp16_allreduce"]


def test_hostfile_entries_are_validated_and_numbers_are_decimal(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1 slots=2\n* slots=2\n")
    proc = subprocess.run([str(LAUNCH / "mpirun_cpu.sh"), "--hostfile", str(hostfile)],
                          env=job_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert f"--hostfile={hostfile}: '* slots=2': '*' is not a host name" in proc.stderr
    env_lines, command = dry_run("horovodrun_gpu.sh", "-H", "n1.example.org:02,10.0.0.7",
                                 "--fusion-threshold-mb", "010", "--cache-capacity", "08")
    assert "export HOROVOD_FUSION_THRESHOLD=10485760  # flag" in env_lines  # not octal 8 MB
    assert "export HOROVOD_CACHE_CAPACITY=8  # flag" in env_lines
    assert "-H n1.example.org:2\\,10.0.0.7:" in command


def fake_slurm(tmp_path):
    """A scontrol that expands the node list, as Slurm's would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'n1\\nn2\\n'\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    return dict(SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2", SLURM_TASKS_PER_NODE="2(x2)",
                SLURM_CPUS_PER_TASK="4", SLURM_JOB_NODELIST="n[1-2]",
                PATH=f"{bin_dir}:{job_env()['PATH']}")


def test_slurm_launcher_reads_the_allocation(tmp_path):
    env = fake_slurm(tmp_path)
    env_lines, command = dry_run("slurm.sbatch", "--", "--model=resnet50", **env)
    assert command.startswith("srun --mpi=pmix --ntasks=4 --ntasks-per-node=2 "
                              "--cpus-per-task=4 --cpu-bind=cores --kill-on-bad-exit=1")
    assert command.endswith("lars-train --model=resnet50 --intra_op_threads=4")
    assert "export OMP_NUM_THREADS=4  # launcher" in env_lines
    _, command = dry_run("slurm.sbatch", "--launcher", "mpirun", "--", "python", "mine.py",
                         **env)
    assert "mpirun -np 4 -H n1:2\\,n2:2 --map-by ppr:2:node:PE=4 --bind-to core" in command
    assert command.endswith("python mine.py")
    # elastic: horovodrun over the allocation's nodes, each listed with its tasks
    _, command = dry_run("slurm.sbatch", "--launcher", "horovodrun", "--elastic", "--min-np",
                         "2", "--", "--model=mlp", **env)
    assert command.startswith("horovodrun --gloo -np 4 --min-np 2 --max-np 4 "
                              "--slots-per-host 2 --host-discovery-script "), command
    assert command.endswith("lars-train --model=mlp --intra_op_threads=4 --elastic")


GPU, CPU, SLURM = "horovodrun_gpu.sh", "mpirun_cpu.sh", "slurm.sbatch"


@pytest.mark.parametrize("script,args,message", [
    (GPU, ["--hostfile", "/no/hosts"], "--hostfile=/no/hosts: no such hostfile"),
    (GPU, ["-np", "5", "-H", "a:2,b:2"], "more processes than the 4 slots"),
    (GPU, ["--preset", "wifi"], "--preset=wifi: unknown preset"),
    (GPU, ["--fusion-threshold-mb", "lots"], "--fusion-threshold-mb=lots: must be an integer"),
    (GPU, ["--timeline-filename", "/no/dir/t.json"], "--timeline-filename=/no/dir/t.json: folder"),
    (GPU, ["--timeline", "t.json"],
     "--timeline is now --timeline-filename, as horovodrun spells it"),
    (GPU, ["--fusion"], "unknown option '--fusion'"),
    (CPU, ["-H", "a:2", "--hostfile", "/no/hosts"], "give -H or --hostfile, not both"),
    (GPU, ["--fp16-allreduce", "--", "python", "mine.py"], "--fp16-allreduce passes"),
    (CPU, ["--ranks-per-node", "3", "--cores-per-node", "2"], "more ranks than the 2 cores"),
    (CPU, ["-H", "a:1", "--ranks-per-node", "2", "--cores-per-node", "2"], "a offers 1 slots"),
    (CPU, ["--mpirun", "/no/mpirun"], "--mpirun=/no/mpirun: not found"),
    (CPU, ["--cycle-time-ms", "-1"], "--cycle-time-ms=-1: must be a number"),
    (SLURM, [], "not inside a Slurm allocation"),
    (SLURM, ["--launcher", "ssh", "--dry-run"],
     "--launcher=ssh: must be srun, mpirun or horovodrun"),
    (SLURM, ["--elastic", "--dry-run"], "--elastic needs --launcher horovodrun"),
    (SLURM, ["--min-np", "2", "--dry-run"], "--min-np needs --elastic"),
    # host entries reach ssh (the lost-host probe) and the launchers: an option or a glob
    # in their place ran a command on this machine, or expanded to file names
    (GPU, ["-H", "-oProxyCommand=touch${IFS}/tmp/x:1"],
     "'-oProxyCommand=touch${IFS}/tmp/x' is not a host name"),
    (CPU, ["-H", "a:2,*:2"], "-H: '*:2': '*' is not a host name"),
    (GPU, ["-H", "h1;reboot"], "'h1;reboot' is not a host name"),
    (GPU, ["-H", "300.1.1.1:2"], "'300.1.1.1' is not a host name"),
    (GPU, ["-H", "fe80::1"], "IPv6 addresses cannot be given in host:slots lists"),
    (GPU, ["--preset", "../presets/ethernet"], "--preset=../presets/ethernet: unknown preset"),
])
def test_bad_input_fails_before_anything_starts(script, args, message, tmp_path):
    env = job_env()
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run([str(LAUNCH / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "[launch]" not in proc.stderr  # nothing was started
    assert os.listdir(tmp_path) == []


@pytest.mark.keras3_only  # the legacy stack's Horovod is unpatched
def test_horovodrun_knows_gloo_and_mpi_were_built_without_loading_tensorflow():
    """horovodrun asked by forking a process that imported TensorFlow (3.5 s of every
    launch); the patched build records the answer. Loading the extension is made to fail
    here: the answers must come from the record."""
    code = """
import sys
from horovod.common import util
def refuse(*args, **kwargs):
    raise AssertionError("loaded the extension to ask")
util._check_extension_lambda = refuse
print(util.gloo_built(), util.mpi_built(), "tensorflow" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], env=job_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "False"]


@pytest.mark.parametrize("launcher", ["horovodrun_gpu.sh", "mpirun_cpu.sh", "slurm.sbatch"])
def test_help_is_generated_from_the_option_table_and_names_every_option(launcher):
    """--help prints every option the launcher parses (its table and the tuning one), each
    with its text; a flag the table does not hold is refused, naming it."""
    script = str(LAUNCH / launcher)
    text = open(script).read() + open(LAUNCH / "lib" / "args.sh").read()
    flags = set()
    for entry in re.findall(r'^\s+"(-[^"#]+?) \S+ \S+ #', text, re.M):
        flags |= set(entry.split("|"))
    assert {"--preset", "--dry-run", "--fusion-threshold-mb"} <= flags and len(flags) > 15
    proc = run_job([script, "--help"])
    for flag in flags:
        assert re.search(rf"(^|[ ,]){re.escape(flag)}\b", proc.stdout, re.M), (flag, proc.stdout)
    bad = run_job([script, "--no-such-flag", "--dry-run"], check=False)
    assert bad.returncode == 2 and "unknown option '--no-such-flag'" in bad.stderr
