"""What every benchmark reports: the machine, the command, peak memory, a RESULTS.md section."""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
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
