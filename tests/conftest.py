"""Helpers that start real multi-process Horovod jobs."""

import inspect
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# lars_tf's default, for this process and every job it starts, whatever imports TensorFlow
# first (the workers do: our imports put first-party lars_tf last).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def job_env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONPATH", str(ROOT))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launcher(kind: str, np_: int = 2) -> list[str]:
    """The command prefix that starts ``np_`` local ranks with ``kind``: gloo | mpirun."""
    if kind == "gloo":
        return [str(BIN / "horovodrun"), "--gloo", "-np", str(np_), "-H", f"localhost:{np_}"]
    if kind == "mpirun":
        cmd = [str(BIN / "mpirun"), "-np", str(np_), "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        return cmd
    raise ValueError(kind)


def run_job(cmd: list[str], timeout: float = 600, check: bool = True, cwd=ROOT,
            **env) -> subprocess.CompletedProcess:
    """Run a job to completion (in ``cwd``, the repository by default); fail the test with
    its output if it fails or hangs. ``timeout`` must be at least 3x the job's time alone,
    so that a busy machine slows the suite down instead of failing it.

    The job runs in its own process group, and all of it is killed on timeout, so that no
    rank outlives its test.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=job_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"job timed out after {timeout}s: {' '.join(cmd)}\n"
                    f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}")
    proc = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        pytest.fail(f"job failed ({proc.returncode}): {' '.join(cmd)}\n"
                    f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def rank_pids(root_pid: int) -> dict[int, int]:
    """{rank: pid} of the Horovod ranks started by the launcher process ``root_pid``
    (horovodrun sets HOROVOD_RANK, Open MPI OMPI_COMM_WORLD_RANK in each rank's environment)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            ancestor = pid
            while ancestor > 1 and ancestor != root_pid:
                ancestor = _parent(ancestor)
            if ancestor != root_pid or pid == root_pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            with open(f"/proc/{pid}/comm", "rb") as f:
                comm = f.read().strip()
        except (OSError, ValueError):
            continue
        rank = env.get(b"HOROVOD_RANK", env.get(b"OMPI_COMM_WORLD_RANK"))
        if rank is not None and comm not in (b"sh", b"bash", b"env"):
            found[int(rank)] = pid
    return found


# What starts another process: a Horovod job, lars-train, lars-convert or a worker script.
_STARTS_A_PROCESS = ("run_job(", "subprocess.", "_cli(", "_train(", "start(")


def _starts_a_process(function, seen: set) -> bool:
    """Whether ``function``, or a function of its own module that it calls, starts a
    process (read from their source)."""
    if function in seen:
        return False
    seen.add(function)
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    if any(s in source for s in _STARTS_A_PROCESS):
        return True
    module = sys.modules.get(function.__module__)
    callees = (getattr(module, name, None) for name in function.__code__.co_names)
    return any(inspect.isfunction(f) and f.__module__ == function.__module__
               and _starts_a_process(f, seen) for f in callees)


def pytest_collection_modifyitems(items):
    """Mark every test that starts another process ``multiprocess`` (itself, through a
    helper of its module, or through a fixture), so that ``make test-fast``
    (``-m "not multiprocess"``) runs the in-process tests alone. Read from the source, so
    that a new test is marked without anyone remembering to."""
    for item in items:
        function = getattr(item, "function", None)
        if function is None:
            continue
        seen: set = set()
        fixtures = [defs[-1].func for defs in item._fixtureinfo.name2fixturedefs.values()
                    if defs]
        if any(_starts_a_process(getattr(f, "__wrapped__", f), seen)
               for f in [function, *fixtures]):
            item.add_marker(pytest.mark.multiprocess)
