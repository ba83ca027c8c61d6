"""What every benchmark reports: the machine, the command, peak memory, a RESULTS.md section."""

from __future__ import annotations

import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lars_tf import testing

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        m = re.search(r"model name\s*:\s*(.+)", info)
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
        cpu_flags = set(m.group(1).split()) if m else set()
        # the vector units decide TensorFlow's CPU kernels (and its oneDNN default)
        vector = [name for flag, name in (("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"),
                                          ("avx2", "AVX2")) if flag in cpu_flags][:1]
        cpu = ", ".join([cpu, *vector])
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    import tensorflow as tf

    return (f"{len(os.sched_getaffinity(0))} cores ({cpu}), {mem_gib:.0f} GiB, "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def command_line() -> str:
    """How this benchmark was run, as a command from the checkout's root."""
    name = Path(sys.argv[0]).stem
    return " ".join(["python", "-m", f"benchmarks.{name}", *map(shlex.quote, sys.argv[1:])])


def define_output_flags(name: str) -> None:
    """--out (raw JSON; the PNG goes beside it), --report_only and --write, shared by the
    benchmarks that keep raw results in benchmarks/results/."""
    from absl import flags

    flags.DEFINE_string("out", str(RESULTS.parent / "results" / f"{name}.json"),
                        "Raw results (JSON); the PNG goes beside it.")
    flags.DEFINE_bool("report_only", False,
                      "Rebuild the table, plot and RESULTS.md section from the raw JSON of --out.")
    flags.DEFINE_bool("write", True, "Write the section of benchmarks/RESULTS.md.")


# Training-step benchmarks: (model, input shape, batch, timed steps).
TRAIN_STEP_MODELS = (("small_cnn", (28, 28, 1), 1024, 10), ("resnet50", (224, 224, 3), 16, 3))


def _train_step(name: str):
    """(model, x, y, steps): ``name`` of ``TRAIN_STEP_MODELS`` compiled with lars_tf.LARS
    as the trainer compiles (no XLA), on random images, traced and warmed up."""
    import tensorflow as tf

    import lars_tf
    from lars_tf import models

    _, shape, batch, steps = next(m for m in TRAIN_STEP_MODELS if m[0] == name)
    tf.keras.utils.set_random_seed(0)
    model = models.get(name, shape, 10)
    model.compile(optimizer=lars_tf.LARS(learning_rate=0.1, weight_decay=5e-5),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    x = tf.random.normal((batch, *shape))
    y = tf.random.uniform((batch,), 0, 10, tf.int32)
    for _ in range(2):  # trace and warm up
        model.train_on_batch(x, y)
    return model, x, y, steps


def paired_cells(name: str, batch: int, a: list[dict], b: list[dict]) -> tuple[float, str]:
    """Rounds of ``name``'s training step under two settings (``a[i]`` and ``b[i]`` taken in
    round i): b's images/sec over a's (the median of the per-round ratios), and the first
    four cells of its table row (model, a's and b's median images/sec, the ratio)."""
    ratio = statistics.median(y["images_per_sec"] / x["images_per_sec"] for x, y in zip(a, b))
    return ratio, (f"| {name} ({batch}) | "
                   f"{statistics.median(x['images_per_sec'] for x in a):.1f} | "
                   f"{statistics.median(x['images_per_sec'] for x in b):.1f} | {ratio:.2f}x | ")


def train_step_rate(name: str) -> dict:
    """Images/sec of a training step of ``name`` (``TRAIN_STEP_MODELS``) with lars_tf.LARS,
    in this process (TensorFlow loads here), on random images; with the versions and
    whether oneDNN is on."""
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    from lars_tf import keras_compat

    model, x, y, steps = _train_step(name)
    batch = int(x.shape[0])
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return {"images_per_sec": steps * batch / (time.perf_counter() - t0),
            "onednn": bool(_pywrap_util_port.IsMklEnabled()),
            "tensorflow": tf.__version__, "keras3": keras_compat.KERAS3,
            "python": platform.python_version(), "peak_rss_mb": testing.peak_rss_mb()}


def op_profile(name: str, steps: int = 3) -> dict:
    """The same training step as ``train_step_rate``, op by op: TensorFlow's profiler traces
    ``steps`` steps, and the time of every op kernel (the ``name:Type`` events on the
    executor's threads of the trace's host plane) is summed by op type. Returns the step's
    wall time and ``{type: ms per step}`` (kernel time summed over threads, so the ops of a
    step can add up to more than its wall time when they run side by side)."""
    import collections
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    model, x, y, _ = _train_step(name)
    op_event = re.compile(r"^[^:]+:([A-Za-z0-9_]+)$")
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        wall = (time.perf_counter() - t0) / steps
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(next(Path(logdir).rglob("*.xplane.pb")).read_bytes())
    ps = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                m = op_event.match(plane.event_metadata[event.metadata_id].name)
                if m:
                    ps[m.group(1)] += event.duration_ps
    return {"wall_ms": 1e3 * wall, "ops": {k: v / 1e9 / steps for k, v in ps.items()},
            "tensorflow": tf.__version__}


CLUSTER = str(testing.REPO / "tools" / "cluster.sh")


class Cluster:
    """tools/cluster.sh in a temporary state folder: up on enter, down on exit (root only)."""

    def __init__(self, n: int, link: str):
        self.n, self.link = n, link
        self.state = tempfile.mkdtemp(prefix="lars_tf_bench_cluster_")
        os.rmdir(self.state)  # cluster.sh makes it
        self.env = testing.job_env(LARS_TF_CLUSTER_DIR=self.state)

    def __enter__(self):
        subprocess.run([CLUSTER, "up", str(self.n), self.link], env=self.env, check=True,
                       timeout=300)
        return self

    def __exit__(self, *exc):
        subprocess.run([CLUSTER, "down"], env=self.env, timeout=300)

    def run(self, host: str, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        return testing.run_job([CLUSTER, "run", host, *cmd], timeout=timeout,
                               LARS_TF_CLUSTER_DIR=self.state)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers in RESULTS.md."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)


def report(section: str, heading: str, description: str, table: list[str], conclusion: str,
           write: bool, raw: dict | None = None) -> str:
    """Print a benchmark's result (what was measured, the command, the machine, peak memory,
    the table, the conclusion) and, with ``write``, put it in its RESULTS.md section.

    ``raw``: the saved results of an earlier run (``--report_only``), whose command and
    machine are reported instead of this process's."""
    lines = [f"- command: `{command_line()}`", f"- machine: {machine_line()}",
             f"- peak RSS of the process: {testing.peak_rss_mb():.0f} MB"]
    if raw is not None:
        lines = [f"- command: `{raw['command']}`", f"- machine: {raw['machine']}"]
    body = "\n".join([
        f"## {heading}", "", description, "",
        *lines,
        "", *table, "", conclusion,
    ])
    print(body)
    if write:
        write_section(section, body)
    return body
