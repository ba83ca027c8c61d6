"""pytest set-up: marks the tests that start other processes. The job helpers themselves
(run_job, launcher, job_env, rank_pids, ...) are in ``lars_tf.testing``, shared with the
benchmarks."""

import inspect
import os
import sys

import pytest

# lars_tf's default, for this process and every job it starts, whatever imports TensorFlow
# first (the workers do: our imports put first-party lars_tf last).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


# What starts another process: a Horovod job, lars-train, lars-convert or a worker script.
_STARTS_A_PROCESS = ("run_job(", "start_job(", "subprocess.", "_cli(", "_train(", "start(")


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
