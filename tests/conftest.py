"""pytest set-up: the markers' meaning (declared in pytest.ini, ``--strict-markers``), and a
guard that keeps the ``multiprocess`` marker true. The job helpers themselves (run_job,
launcher, job_env, rank_pids, ...) are in ``lars_tf.testing``, shared with the benchmarks.

- ``multiprocess``: the test (or a fixture it uses) starts another process. A test without
  the marker that starts one fails, naming the command: ``make test-fast``
  (``-m "not multiprocess"``) stays in-process.
- ``cluster``: needs the hosts of ``tools/cluster.sh``; skipped unless root.
- ``keras3_only``: skipped on the legacy stack.
- ``legacy``: in the legacy stack's CI subset (``make test-legacy``: ``-m legacy``).
"""

import contextlib
import os
import platform
import subprocess

import numpy.testing  # noqa: F401  (see below)
import pytest

# lars_tf's default, for this process and every job it starts, whatever imports TensorFlow
# first (the workers do: our imports put first-party lars_tf last).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# What libraries run once per process, lazily, done here before the guard below is on:
# numpy 1.x's numpy.testing runs lscpu when first imported (the legacy stack's numpy; it
# is imported above), and platform.processor() runs uname. Neither is a test's process.
platform.processor()


def pytest_collection_modifyitems(items):
    keras3 = None
    for item in items:
        if item.get_closest_marker("cluster") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="tools/cluster.sh needs root"))
        if item.get_closest_marker("keras3_only"):
            if keras3 is None:
                from lars_tf import keras_compat

                keras3 = keras_compat.KERAS3
            if not keras3:
                item.add_marker(pytest.mark.skip(reason="Keras 3 only"))


@contextlib.contextmanager
def _in_process(item):
    """While an unmarked test (or its fixtures) runs, starting a process fails it."""
    if item.get_closest_marker("multiprocess"):
        yield
        return
    start = subprocess.Popen._execute_child

    def refuse(self, args, *rest, **kwargs):
        command = args if isinstance(args, str) else " ".join(map(str, args))
        raise AssertionError(f"{item.nodeid} starts a process ({command[:200]}): mark it "
                             "@pytest.mark.multiprocess")

    subprocess.Popen._execute_child = refuse
    try:
        yield
    finally:
        subprocess.Popen._execute_child = start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _in_process(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _in_process(item):
        yield


# the ImageNet-format tests' folder of JPEGs and its shards, made once a session
from tests.imagenet_data import image_folder, shards  # noqa: E402, F401
