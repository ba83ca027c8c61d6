"""Failure behaviour with real 2-rank jobs: a killed rank, a kill during a checkpoint write,
a NaN loss, replicas that drift apart, a stalled rank, and a sweep of bad input. Every job
is bounded in time; none may hang."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lars_tf.testing import BIN, REPO, job_env, launcher, rank_pids, run_job
from tests.cli_checks import refusal
from tests.test_trainer import _checkpoint_tensors

RUN = ["--model=mlp", "--epochs=3", "--warmup_epochs=0.5", "--global_batch_size=1024",
       "--deterministic", "--noprogress_bar"]


def start(cmd, **env):
    return subprocess.Popen(cmd, cwd=REPO, env=job_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout):
    """(output, seconds until exit); kills the whole job if it outlives ``timeout``."""
    t0 = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the job hung for {timeout}s:\n{out[-4000:]}")
    return out, time.monotonic() - t0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("uninterrupted")
    run_job(launcher("gloo") + ["lars-train", f"--model_dir={model_dir}", *RUN], timeout=240)
    return model_dir


@pytest.mark.parametrize("kind, names_rank", [
    ("gloo", r"Process 1 exit with status code 137"),  # horovodrun's report
    ("mpirun", r"process rank 1 with PID \d+ on node \S+ exited on\s+signal 9"),
])
@pytest.mark.multiprocess
def test_killed_rank_ends_the_job_and_resume_loses_nothing(kind, names_rank, uninterrupted,
                                                           tmp_path):
    proc = start(launcher(kind) + [str(BIN / "lars-train"), f"--model_dir={tmp_path}", *RUN])
    deadline = time.monotonic() + 180
    while not (tmp_path / "checkpoints" / "epoch-000001").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    time.sleep(0.3)  # into epoch 2
    pids = rank_pids(proc.pid)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGKILL)
    out, seconds = finish(proc, timeout=60)
    assert proc.returncode != 0
    assert seconds < 60
    assert re.search(names_rank, out), out[-3000:]

    run_job(launcher(kind) + ["lars-train", f"--model_dir={tmp_path}", *RUN, "--resume"],
            timeout=240)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from_epoch"] in (1, 2)
    _, want = _checkpoint_tensors(uninterrupted)
    ckpts, got = _checkpoint_tensors(tmp_path)
    assert ckpts[-1] == "epoch-000003" and got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


WRITER = """
import sys, tensorflow as tf
from lars_tf import LARS, checkpoint, models
model = models.get("resnet50", (64, 64, 3), 10)
opt = LARS(learning_rate=0.1)
opt.build(model.trainable_variables)
for epoch in range(int(sys.argv[2]), 10**6):
    checkpoint.save(sys.argv[1], epoch, model, opt, {"epoch": epoch}, keep=2)
    print(epoch, flush=True)
"""


@pytest.mark.multiprocess
def test_kill_during_checkpoint_write_leaves_latest_checkpoint_readable(tmp_path):
    """kill -9 a writer of ResNet-50 checkpoints (~300 MB with LARS' momentum) at random
    moments, mostly inside a write: the newest complete checkpoint always restores."""
    from lars_tf import LARS, checkpoint, models

    rng = np.random.default_rng(0)
    model = models.get("resnet50", (64, 64, 3), 10)
    opt = LARS(learning_rate=0.1)
    opt.build(model.trainable_variables)
    next_epoch = 1
    for _ in range(3):
        proc = start([sys.executable, "-c", WRITER, str(tmp_path), str(next_epoch)])
        assert proc.stdout.readline(), "the writer did not start"  # one checkpoint done
        time.sleep(rng.uniform(0.05, 0.6))
        proc.kill()
        proc.communicate(timeout=30)
        found = checkpoint.latest(str(tmp_path))
        assert found is not None
        meta = checkpoint.restore(found[1], model, opt)
        assert meta["epoch"] == found[0]
        names = os.listdir(tmp_path / "checkpoints")
        assert all(re.fullmatch(r"epoch-\d{6}|\.(tmp|old)-.*", n) for n in names), names
        next_epoch = found[0] + 1
    # the next save clears what killed writers left behind
    checkpoint.save(str(tmp_path), next_epoch, model, opt, {}, keep=2)
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]


@pytest.mark.multiprocess
def test_nan_loss_stops_every_rank_naming_the_step(tmp_path):
    proc = start(launcher("gloo") + [
        str(BIN / "lars-train"), f"--model_dir={tmp_path}", "--model=mlp", "--epochs=2",
        "--warmup_epochs=0", "--optimizer=sgd", "--learning_rate=1e6", "--noprogress_bar"])
    out, seconds = finish(proc, timeout=120)
    assert proc.returncode != 0
    m = re.search(r"the training loss is (nan|inf) at step (\d+) \(epoch 1, batch \d+\) on "
                  r"rank (\d)", out)
    assert m, out[-3000:]
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


@pytest.mark.multiprocess
def test_replica_check_names_the_first_differing_variable(tmp_path):
    fault = [sys.executable, str(REPO / "tests" / "workers" / "faults.py")]
    # a healthy run passes the check every 2 steps
    run_job(launcher("gloo") + fault + ["none", str(tmp_path / "ok"), "check_replicas_every=2"],
            timeout=180)
    # rank 1 nudges its copy of fc1's bias after step 3: the check after step 4 stops both
    proc = start(launcher("gloo") + fault + ["diverge", str(tmp_path / "bad"),
                                             "check_replicas_every=1"])
    out, _ = finish(proc, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"ranks hold different weights or optimizer state after step 4: first "
                     r"differing variable '(\S+/)?fc1/bias(:0)?'", out), out[-3000:]
    assert "exit with status code 4" in out  # lars-train's code for diverged replicas


@pytest.mark.multiprocess
def test_stalled_rank_shuts_the_job_down_within_the_launchers_bound(tmp_path):
    proc = start([str(REPO / "launch" / "horovodrun_gpu.sh"), "--mpi", "--gpus-per-host", "2",
                  "--stall-check-shutdown-time-seconds", "8", "--", sys.executable,
                  str(REPO / "tests" / "workers" / "faults.py"), "stall", str(tmp_path)],
                 HOROVOD_STALL_CHECK_TIME_SECONDS=2)
    out, _ = finish(proc, timeout=150)
    assert proc.returncode != 0
    assert "rank 1: stalling" in out
    stalled_at = out.index("rank 1: stalling")
    assert re.search(r"Missing ranks:\s*(\S+\s+)?1!?:", out[stalled_at:]), out[-3000:]
    assert "is stalled for longer than 8 seconds. Will shutdown." in out
    # rank 0's collective failed: lars_tf says why and where to resume from
    assert "another rank failed or stopped responding, so Horovod shut the job down" in out
    assert "No checkpoint was written yet." in out


@pytest.mark.multiprocess
def test_frozen_rank_is_ended_by_the_watchdog(tmp_path):
    """A rank frozen whole (SIGSTOP: its Horovod thread too) defeats Horovod's stall check;
    under Gloo the other rank would wait forever. --watchdog_sec ends the job."""
    proc = start(launcher("gloo") + [
        str(BIN / "lars-train"), f"--model_dir={tmp_path}", *RUN, "--epochs=6",
        "--watchdog_sec=10"])
    deadline = time.monotonic() + 180
    while not (tmp_path / "checkpoints" / "epoch-000001").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    pids = rank_pids(proc.pid)
    os.kill(pids[1], signal.SIGSTOP)
    out, seconds = finish(proc, timeout=90)
    assert proc.returncode != 0 and seconds < 60
    assert re.search(r"rank 0: no training step has finished for \d+ s \(--watchdog_sec=10; "
                     r"waiting for step \d+ of this run\)", out), out[-3000:]
    assert "Process 0 exit with status code 6" in out


# what rank 0 raised in CI when its peer's host vanished: Gloo timed out before Horovod shut down
GLOO_TIMEOUT = ("[/tmp/hvdsrc/t/horovod-0.28.1/third_party/compatible17_gloo/gloo/transport/tcp/"
                "unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation to complete\n"
                "\t [[{{node HorovodGroupedAllreduce_gradient_tape_mlp_1_fc1_1_MatMul_MatMul_0}}]]")


@pytest.mark.parametrize("error, code, says", [
    ("UnknownError", 5, "another rank failed or stopped responding"),
    ("UnknownError-shutdown", 5, "another rank failed or stopped responding"),
    ("InvalidArgumentError", 3, "bad input data"),
])
def test_a_failed_collective_is_reported_as_a_lost_rank_with_where_to_resume(
        error, code, says, model_dir_with_checkpoints, caplog):
    import types

    import tensorflow as tf

    from lars_tf.cli import run_with_exit_codes

    message = {"UnknownError": GLOO_TIMEOUT,
               "UnknownError-shutdown": "Horovod has been shut down. This was caused by an "
                                        "exception on one of the ranks or an attempt to ...",
               "InvalidArgumentError": "label 12 is outside [0, 10) in record 7"}[error]
    kind = getattr(tf.errors, error.split("-")[0])

    def fit():
        raise kind(None, None, message)

    config = types.SimpleNamespace(model_dir=str(model_dir_with_checkpoints))
    with pytest.raises(SystemExit) as exit_:
        run_with_exit_codes(config, fit)
    assert exit_.value.code == code
    assert says in caplog.text
    if code == 5:
        assert (f"Continue from {model_dir_with_checkpoints}/checkpoints/epoch-000002 (epoch 2) "
                f"with --resume --model_dir={model_dir_with_checkpoints}") in caplog.text


def _tree_digest(path):
    digest = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                digest[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return digest


@pytest.fixture
def model_dir_with_checkpoints(tmp_path):
    from lars_tf import LARS, checkpoint, models

    model = models.get("mlp", (28, 28, 1), 10)
    opt = LARS(learning_rate=0.1)
    opt.build(model.trainable_variables)
    for epoch in (1, 2):
        checkpoint.save(str(tmp_path / "run"), epoch, model, opt, {"history": []}, keep=3)
    return tmp_path / "run"


def _bad_shards(root):
    root.mkdir()
    for split in ("train", "validation"):
        (root / f"{split}-00000-of-00001").write_bytes(os.urandom(4096))
    return root


def _damaged_shards(root):
    """Real TFRecord shards whose train shard has one damaged byte in the middle (a record
    whose CRC fails, as after bit rot or an interrupted copy)."""
    import tensorflow as tf

    root.mkdir()
    jpeg = tf.io.encode_jpeg(tf.fill([40, 40, 3], tf.constant(90, tf.uint8))).numpy()
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
    })).SerializeToString()
    for split in ("train", "validation"):
        with tf.io.TFRecordWriter(str(root / f"{split}-00000-of-00001")) as w:
            for _ in range(20):
                w.write(example)
    train = root / "train-00000-of-00001"
    raw = bytearray(train.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    train.write_bytes(bytes(raw))
    return root


BEFORE_START = [  # (flags, message): refused before Horovod starts
    (["--global_batch_size=-8"], "--global_batch_size=-8: must be an integer >= 1"),
    (["--model=resnet51"], "--model='resnet51': unknown model"),
    (["--dataset=imagenet", "--data_dir=/no/such/imagenet"],
     "--data_dir='/no/such/imagenet' is not a directory"),
    (["--checkpoint_every=-1"], "--checkpoint_every=-1"),
]


@pytest.mark.parametrize("flags, message", BEFORE_START,
                         ids=[" ".join(b[0]) for b in BEFORE_START])
def test_bad_flags_leave_checkpoints_untouched(flags, message, model_dir_with_checkpoints):
    """Refused in this process, as lars-train refuses them (tests/cli_checks.py), with the
    --resume of a model directory that holds checkpoints: they stay byte for byte."""
    before = _tree_digest(model_dir_with_checkpoints)
    code, said = refusal(["--model=mlp", f"--model_dir={model_dir_with_checkpoints}",
                          "--resume", "--noprogress_bar", *flags])
    assert code == 2 and message in said, (code, said)
    assert _tree_digest(model_dir_with_checkpoints) == before


BAD_INPUT = [  # (flags, launcher, exit code, message): refused once the job has started
    (["--global_batch_size=1000", "--backward_passes_per_step=3"], "gloo", 2,
     "--global_batch_size=1000 is not divisible by the 2 ranks x --backward_passes_per_step=3"),
    (["--dataset=imagenet", "--data_dir={shards}", "--strict_data"], None, 3,
     "train-00000-of-00001"),
    (["--dataset=imagenet", "--data_dir={damaged}", "--strict_data", "--num_classes=2"], None,
     3, "train-00000-of-00001: damaged or truncated TFRecord file, readable up to byte offset"),
    (["--dataset=imagenet", "--data_dir={damaged}", "--strict_data", "--num_classes=2"],
     "gloo", 3, "train-00000-of-00001: damaged or truncated TFRecord file"),
    (["--corrupt_latest"], None, 2, "checkpoints/epoch-000002 cannot be restored"),
]


@pytest.mark.multiprocess
@pytest.mark.parametrize("flags, kind, code, message", BAD_INPUT,
                         ids=[" ".join(b[0]) for b in BAD_INPUT])
def test_bad_input_fails_clearly_and_leaves_checkpoints_untouched(
        flags, kind, code, message, model_dir_with_checkpoints, tmp_path):
    model_dir = model_dir_with_checkpoints
    if flags == ["--corrupt_latest"]:
        data = [f for f in os.listdir(model_dir / "checkpoints" / "epoch-000002")
                if f.startswith("ckpt.data")][0]
        path = model_dir / "checkpoints" / "epoch-000002" / data
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        flags = []
    before = _tree_digest(model_dir)
    flags = [f.format(shards=_bad_shards(tmp_path / "shards")) if "{shards}" in f else
             f.format(damaged=_damaged_shards(tmp_path / "damaged")) if "{damaged}" in f else f
             for f in flags]
    cmd = ["lars-train", "--model=mlp", f"--model_dir={model_dir}", "--resume",
           "--noprogress_bar", *flags]
    cmd = launcher(kind) + cmd if kind else [str(BIN / cmd[0]), *cmd[1:]]
    proc = run_job(cmd, timeout=120, check=False)
    # horovodrun exits 1 whatever the rank's code (it names the rank's code); alone,
    # lars-train's own code shows
    assert proc.returncode == (1 if kind else code), proc.stderr[-3000:]
    if kind:
        assert f"exit with status code {code}" in proc.stdout + proc.stderr
    assert message in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "epoch   1" not in proc.stderr
    assert _tree_digest(model_dir) == before


@pytest.mark.multiprocess
def test_a_damaged_shard_without_strict_data_trains_on_and_names_it(tmp_path):
    """A record whose CRC fails in the middle of a shard: the run counts the records before
    the damage, trains on them, and names the file and byte offset (it ended the job, with
    TensorFlow's "corrupted record at N" from the record count, naming no file)."""
    shards = _damaged_shards(tmp_path / "damaged")
    proc = run_job([str(BIN / "lars-train"), "--dataset=imagenet", f"--data_dir={shards}",
                    "--num_classes=2", "--image_size=32", "--model=mlp", "--epochs=1",
                    "--warmup_epochs=0", "--global_batch_size=4", "--noprogress_bar",
                    f"--model_dir={tmp_path / 'run'}"], timeout=120)
    assert re.search(r"train-00000-of-00001: damaged or truncated TFRecord file, readable up "
                     r"to byte offset \d+ of \d+ \(\d+ records before it\)", proc.stderr)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["steps_per_epoch"] < 5 and summary["epochs_done"] == 1


@pytest.mark.multiprocess
def test_model_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("precious")
    proc = run_job([str(BIN / "lars-train"), f"--model_dir={target}"], timeout=60, check=False)
    assert proc.returncode == 2
    assert f"--model_dir='{target}' exists and is not a directory" in proc.stderr
    assert target.read_text() == "precious"
