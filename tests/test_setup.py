"""tools/setup_env.sh refuses what it cannot set up, before it creates or installs anything."""

import glob
import os
import shutil
import subprocess

import pytest

from lars_tf.testing import REPO, job_env

SETUP = str(REPO / "tools" / "setup_env.sh")


def _setup(tmp_path, **env):
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", SETUP], env=job_env(LARS_TF_VENV=venv, LARS_TF_SKIP_APT=1,
                                                       LARS_TF_CACHE=tmp_path / "cache", **env),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert not venv.exists() and not (tmp_path / "cache").exists()
    return proc.stderr


def test_an_unknown_stack_is_refused(tmp_path):
    err = _setup(tmp_path, LARS_TF_STACK="keras4")
    assert "LARS_TF_STACK=keras4: must be keras3 (the default) or keras2" in err


@pytest.mark.parametrize("stack, version", [("keras3", "3.10"), ("keras2", "3.12")])
def test_a_python_the_stack_has_no_wheels_for_is_refused(stack, version, tmp_path):
    candidates = [shutil.which(f"python{version}"), *glob.glob(os.path.expanduser(
        f"~/.pyenv/versions/{version}*/bin/python{version}"))]
    python = next((p for p in candidates if p and subprocess.run(
        [p, "-c", "pass"], capture_output=True).returncode == 0), None)
    if python is None:
        pytest.skip(f"no python{version} runs on this machine")
    err = _setup(tmp_path, LARS_TF_STACK=stack, PYTHON=python)
    want = "3.11-3.13" if stack == "keras3" else "3.11"
    assert f"needs Python {want}" in err and f"Python {version}" in err


def test_a_missing_python_is_refused(tmp_path):
    err = _setup(tmp_path, PYTHON=os.path.join(str(tmp_path), "no-python"))
    assert "no-python not found" in err
