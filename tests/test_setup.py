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


@pytest.mark.multiprocess
def test_an_unknown_stack_is_refused(tmp_path):
    err = _setup(tmp_path, LARS_TF_STACK="keras4")
    assert "LARS_TF_STACK=keras4: must be keras3 (the default) or keras2" in err


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
def test_a_missing_python_is_refused(tmp_path):
    err = _setup(tmp_path, PYTHON=os.path.join(str(tmp_path), "no-python"))
    assert "no-python not found" in err


@pytest.mark.parametrize("env, message", [
    ({"LARS_TF_STACK": "keras2"}, "the GPU build is made for the default stack only"),
    ({"LARS_TF_CUDA_HOME": "/nonexistent/cuda"},
     "LARS_TF_CUDA_HOME=/nonexistent/cuda: no working bin/nvcc there"),
    ({"LARS_TF_CUDA_HOME": "/", "LARS_TF_CUDA_ARCHS": "sm_80"}, None),
], ids=["legacy-stack", "no-nvcc", "bad-archs"])
@pytest.mark.multiprocess
def test_a_gpu_build_that_cannot_be_made_is_refused(env, message, tmp_path):
    if message is None:  # the archs are checked once a toolkit is found: give it a fake nvcc
        fake = tmp_path / "cuda"
        (fake / "bin").mkdir(parents=True)
        (fake / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, "
                                           "release 12.9, V12.9.86'\n")
        (fake / "bin" / "nvcc").chmod(0o755)
        env["LARS_TF_CUDA_HOME"] = str(fake)
        message = "LARS_TF_CUDA_ARCHS=sm_80: give compute capabilities like 80,90"
    # the default stack unless the case says otherwise, whichever stack runs the suite
    # (LARS_TF_STACK=keras2 make test exports it)
    err = _setup(tmp_path, LARS_TF_GPU="1", **{"LARS_TF_STACK": "keras3", **env})
    assert message in err


@pytest.mark.multiprocess
def test_a_source_package_that_differs_from_its_pinned_sha256_is_not_built(tmp_path):
    """Horovod and mpi4py are built from source (as root on CI): each source package is
    checked against tools/sdists.sha256 first. A tampered one in the cache stops set-up,
    naming the file and both hashes, before a venv is made; the file is removed."""
    cache = tmp_path / "cache"
    (cache / "sdists").mkdir(parents=True)
    sdist = cache / "sdists" / "mpi4py-4.1.2.tar.gz"
    sdist.write_bytes(b"not the real mpi4py")
    pinned = (REPO / "tools" / "sdists.sha256").read_text()
    assert "  mpi4py-4.1.2.tar.gz" in pinned and "  horovod-0.28.1.tar.gz" in pinned
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", SETUP], env=job_env(LARS_TF_VENV=venv, LARS_TF_SKIP_APT=1,
                                                       LARS_TF_CACHE=cache),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "mpi4py-4.1.2.tar.gz has sha256 " in proc.stderr
    assert "not the 56860286dc45f20e" in proc.stderr and "not building from it" in proc.stderr
    assert not sdist.exists() and not venv.exists()


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"),
                    reason="set-up installs the cluster's packages as root only")
def test_set_up_leaves_no_cluster_service_enabled_at_boot():
    """openssh-server, munge and slurm-wlm enable their services when installed; set-up
    (which ran before this suite) disables them: nothing of ours starts at boot."""
    enabled = []
    for service in ("ssh", "munge", "slurmd", "slurmctld"):
        enabled += glob.glob(f"/etc/systemd/system/*.wants/{service}.service")
        enabled += glob.glob(f"/etc/rc[2-5].d/S*{service}")
    assert enabled == []
