"""lars-train and lars_tf.Trainer end to end: flags, resume, time-to-accuracy, custom models."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import TrainConfig, build
from lars_tf.testing import BIN, job_env, launcher, run_job, run_jobs
from tests.cli_checks import refusal

SHORT = ["--model=small_cnn", "--global_batch_size=4096", "--epochs=2", "--learning_rate=3.0",
         "--warmup_epochs=0.5", "--deterministic", "--keep_checkpoints=1",
         "--noprogress_bar"]


def _job(model_dir, *flags):
    return launcher("gloo") + ["lars-train", f"--model_dir={model_dir}", *SHORT, *flags]


def _train(model_dir, *flags, timeout=600):
    return run_job(_job(model_dir, *flags), timeout=timeout)


def _checkpoint_tensors(model_dir):
    ckpts = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints", ckpts[-1], "ckpt"))
    return ckpts, {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                   if "OBJECT_GRAPH" not in k}


@pytest.mark.multiprocess
@pytest.mark.legacy
def test_resume_equals_an_uninterrupted_run(tmp_path):
    # 10 updates an epoch at global batch 1024: with two inter-op threads per rank, runs of
    # this shape stopped repeating each other (#16); at 4096 they happened not to
    shape = ["--global_batch_size=1024", "--train_examples=10240"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_jobs(_job(straight, *shape, "--target_accuracy=0.6"),
             _job(split, *shape, "--stop_after_epoch=1"))
    stopped = json.loads((split / "summary.json").read_text())
    assert stopped["epochs_done"] == 1 and len(stopped["history"]) == 1
    _train(split, *shape, "--resume")

    ckpts_a, a = _checkpoint_tensors(straight)
    ckpts_b, b = _checkpoint_tensors(split)
    assert ckpts_a == ckpts_b == ["epoch-000002"]  # --keep_checkpoints=1
    assert a.keys() == b.keys()
    # 10 trainable tensors + 4 BatchNorm moving statistics + 10 momentum slots + the step
    # counter, at least (Keras 3 files the model's trainable tensors under the optimizer)
    assert len(a) >= 25
    # one momentum slot per trainable tensor (in the optimizer, or the one it wraps)
    slots = [k for k in a if re.match(r"optimizer/(inner_optimizer/)*_variables/\d+/", k)]
    assert len(slots) == 10 and all(np.abs(a[k]).sum() > 0 for k in slots)
    steps = [int(a[k]) for k in a if k.endswith("_iterations/.ATTRIBUTES/VARIABLE_VALUE")]
    assert max(steps) == 2 * 10
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)

    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((split / "summary.json").read_text())
    assert sb["resumed_from_epoch"] == 1 and len(sb["history"]) == 2
    assert sb["final_test_accuracy"] == pytest.approx(sa["final_test_accuracy"], abs=1e-6)
    # time to accuracy: reached, with the epoch and a positive wall time
    tta = sa["time_to_accuracy"]
    assert tta["target"] == 0.6 and tta["epoch"] in (1, 2) and tta["seconds"] > 0
    assert tta["test_accuracy"] >= 0.6
    assert sa["history"][tta["epoch"] - 1]["test_accuracy"] >= 0.6
    assert sa["final_test_top5"] > sa["final_test_accuracy"]
    assert os.listdir(straight / "tensorboard")


@pytest.mark.multiprocess
def test_custom_keras_model_through_the_python_api(tmp_path):
    run_job(launcher("gloo") + ["python", "tests/workers/custom_model.py", str(tmp_path)])
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for k in ranks[0].files:
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k], err_msg=k)
    assert abs(float(ranks[0]["beta"]) - 1.0) > 1e-3  # the user's own layer trained too
    # BatchNorm's moving statistics are the mean of the ranks' own, not one rank's
    bn = [np.load(tmp_path / f"bn_rank{r}.npz") for r in range(2)]
    assert not np.allclose(bn[0]["local"], bn[1]["local"])
    np.testing.assert_allclose(bn[0]["final"], (bn[0]["local"] + bn[1]["local"]) / 2,
                               rtol=1e-6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_done"] == 2
    assert summary["final_test_accuracy"] > 0.7
    assert summary["time_to_accuracy"] is None  # no target asked for
    # top-5 over 10 classes (not silently top-1) for a model without symbolic outputs
    assert summary["final_test_top5"] > summary["final_test_accuracy"] + 0.05


def _cli(*flags):
    return subprocess.run([str(BIN / "lars-train"), *flags], env=job_env(), text=True,
                          capture_output=True, timeout=120)


BAD_FLAGS = [  # (flags, what lars-train says)
    (["--global_batch_size=-1"], "--global_batch_size=-1"),
    (["--model=resnet51"], "--model='resnet51'"),
    (["--dataset=cifar10"], "--dataset='cifar10'"),
    (["--dataset=imagenet"], "--dataset=imagenet needs --data_dir"),
    (["--dataset=imagenet", "--data_dir=/tmp"], "has no train shards (train-*-of-*)"),
    (["--dataset=tfds:imagenet2012"], "--dataset=tfds:imagenet2012 needs --data_dir"),
    (["--resume"], "--resume needs --model_dir"),
    (["--normalize_on_device"], "--normalize_on_device: --dataset=fashion_mnist"),
    (["--precision=fp8"], "--precision"),
    (["--target_accuracy=90"], "--target_accuracy=90"),
    (["--stop_after_epoch=40", "--epochs=30"], "--stop_after_epoch=40"),
    (["--backward_passes_per_step=0"], "--backward_passes_per_step=0"),
    (["--bucket_mb=-1"], "--bucket_mb=-1"),
    (["--data_dir=/nonexistent/fashion"], "--data_dir='/nonexistent/fashion'"),
    (["--data_dir=/tmp"], "--data_dir='/tmp' has no train-images-idx3-ubyte.gz"),
    (["--preset=resnet50-1k"], "--preset"),
    (["--zero_init_residual"], "--zero_init_residual: --model=small_cnn does not take it"),
    (["--warmup_start_learning_rate=5", "--learning_rate=3"], "--warmup_start_learning_rate=5"),
    # the preset's dataset needs a folder: it is checked like a flag given by hand
    (["--preset=resnet50-32k"], "--dataset=imagenet needs --data_dir"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(b[0]) for b in BAD_FLAGS])
def test_bad_flags_stop_before_horovod_starts(flags, message):
    """lars-train's checks, run in this process (tests/cli_checks.py): refused with a
    message before the Trainer, which would start Horovod and read the data, is made."""
    code, said = refusal(flags)
    assert code in (1, 2) and message in said, (code, said)


@pytest.mark.parametrize("flags, message", [
    (["--precision=fp8"], "--precision"),  # absl's refusal
    (["--dataset=imagenet", "--data_dir=/tmp"], "has no train shards (train-*-of-*)"),
])
@pytest.mark.multiprocess
def test_bad_flags_end_the_command_with_a_message(flags, message):
    """The command itself, for a flag absl refuses and one lars_tf's checks refuse: a
    message, no traceback, no training."""
    proc = _cli(*flags)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "epoch   1" not in proc.stderr


@pytest.mark.multiprocess
def test_existing_checkpoints_are_never_overwritten_without_resume(tmp_path):
    ckpt = tmp_path / "checkpoints" / "epoch-000003"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text('{"epoch": 3}')
    proc = _cli(f"--model_dir={tmp_path}")
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert (ckpt / "meta.json").read_text() == '{"epoch": 3}'
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


@pytest.mark.multiprocess
def test_every_config_field_is_a_flag():
    proc = subprocess.run([sys.executable, "-c", "import lars_tf.cli as c; "
                           "print(' '.join(c.FLAGS))"], env=job_env(), text=True,
                          capture_output=True, timeout=120)
    flag_names = set(proc.stdout.split())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields <= flag_names, fields - flag_names


@pytest.mark.multiprocess
def test_a_preset_fills_the_flags_not_given(tmp_path):
    # SHORT (and --epochs=1) give the model, batch, epochs, learning rate and warmup: those win; the
    # preset brings the rest (warmup from 1.0, its epoch size); the chief says what changed
    proc = _train(tmp_path, "--preset=alexnet_bn-8k", "--dataset=fashion_mnist", "--epochs=1",
                  "--model=mlp")  # a given flag wins (and the mlp trains an epoch fast)
    config = json.loads((tmp_path / "summary.json").read_text())["config"]
    assert config["preset"] == "alexnet_bn-8k"
    assert (config["model"], config["global_batch_size"], config["learning_rate"]) == \
        ("mlp", 4096, 3.0)
    assert config["warmup_start_learning_rate"] == 1.0
    assert config["train_examples"] == 1281167
    assert "preset alexnet_bn-8k (its source: " in proc.stderr
    assert "learning_rate=3.0 (preset 10.0)" in proc.stderr
    assert "warmup_start_learning_rate" not in proc.stderr.split("changed from it:")[1] \
        .splitlines()[0]
    assert "its learning rate and warmup are only a starting point" in proc.stderr


@pytest.mark.multiprocess
def test_skipped_updates_at_the_minimum_loss_scale_stop_the_run():
    """A model that always gives NaN: the loss scale halves from 2^15 to 1 in 15 skipped
    updates, and 5 more skipped at 1 stop the run with exit 4, naming the step (before,
    it trained nothing for its whole length)."""
    proc = run_job(["python", "tests/workers/nan_model.py", "5"], timeout=180, check=False)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert re.search(r"the last 5 weight updates up to step 19 \(epoch 2, batch 3\) were all "
                     r"skipped .* minimum loss scale", proc.stderr), proc.stderr[-3000:]
    proc = run_job(["python", "tests/workers/nan_model.py", "0"], timeout=180)  # 0: off
    assert "training ended without stopping" in proc.stdout


@pytest.mark.multiprocess
def test_a_registered_model_on_your_own_datasets():
    """fit(train_ds) without a model builds --model for --num_classes classes (it was built
    with 0 outputs, and oneDNN aborted the process)."""
    script = ("import lars_tf, tensorflow as tf\n"
              "config = lars_tf.TrainConfig(model='mlp', num_classes=10, global_batch_size=32, "
              "epochs=1, warmup_epochs=0, progress_bar=False)\n"
              "trainer = lars_tf.Trainer(config)\n"
              "ds = tf.data.Dataset.from_tensors((tf.zeros([32, 28, 28, 1]), tf.ones([32])))\n"
              "trainer.fit(ds, None, steps_per_epoch=3)\n"
              "print('outputs', trainer.model.outputs[0].shape[-1])\n")
    proc = run_job(["python", "-c", script], timeout=120)
    assert "outputs 10" in proc.stdout


@pytest.mark.multiprocess
def test_steps_per_epoch_must_hold_whole_accumulation_windows():
    script = ("import lars_tf, tensorflow as tf\n"
              "config = lars_tf.TrainConfig(model='mlp', global_batch_size=64, epochs=1, "
              "warmup_epochs=0, backward_passes_per_step=2)\n"
              "trainer = lars_tf.Trainer(config)\n"
              "ds = tf.data.Dataset.from_tensors((tf.zeros([32, 28, 28, 1]), tf.zeros([32])))\n"
              "trainer.fit(ds, None, steps_per_epoch=5)\n")
    proc = run_job(["python", "-c", script], timeout=120, check=False)
    assert proc.returncode != 0
    assert ("steps_per_epoch=5): must be a multiple of --backward_passes_per_step=2"
            in proc.stderr), proc.stderr[-2000:]


@pytest.mark.multiprocess
def test_the_last_epoch_of_a_run_is_always_evaluated(tmp_path):
    """--eval_every=2 with --stop_after_epoch=1: epoch 1 ends this run, so it is evaluated
    (the summary reported no accuracy, or a stale one)."""
    proc = _cli("--model=mlp", "--epochs=3", "--warmup_epochs=0.5", "--eval_every=2",
                "--stop_after_epoch=1", f"--model_dir={tmp_path}", "--noprogress_bar")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_done"] == 1
    assert summary["final_test_accuracy"] == summary["history"][0]["test_accuracy"] > 0.5


@pytest.mark.multiprocess
def test_lamb_trains_and_is_refused_on_keras_2(tmp_path):
    """--optimizer=lamb (Keras 3's LAMB) trains the MLP for an epoch in one process; on
    Keras 2, which has no LAMB, it is refused naming the flag."""
    from lars_tf import keras_compat

    proc = _cli("--model=mlp", "--epochs=1", "--warmup_epochs=0.5", "--global_batch_size=512",
                "--optimizer=lamb", "--learning_rate=0.01", f"--model_dir={tmp_path}",
                "--noprogress_bar")
    if not keras_compat.KERAS3:
        assert proc.returncode != 0 and "--optimizer=lamb" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_test_accuracy"] > 0.75, summary["final_test_accuracy"]


@pytest.mark.parametrize("optimizer, name", [("nesterov", "NesterovSGD"), ("lamb", "lamb")])
def test_the_baseline_optimizers_are_what_the_flag_says(optimizer, name):
    """nesterov: LARS' weight decay and exclusions, Nesterov momentum, no trust ratio;
    lamb: Keras 3's LAMB with decoupled weight decay on the same variables as LARS'."""
    import keras

    from lars_tf import keras_compat

    if optimizer == "lamb" and not keras_compat.KERAS3:
        pytest.skip("Keras 2 has no LAMB")
    built = build.build_local_optimizer(TrainConfig(optimizer=optimizer, weight_decay=1e-4),
                                        steps_per_epoch=10)
    assert built.name == name
    dense = keras.layers.Dense(2)
    dense.build((None, 3))
    if optimizer == "nesterov":
        assert built.nesterov and not built.uses_layer_adaptation(dense.kernel)
        assert built.uses_weight_decay(dense.kernel) and not built.uses_weight_decay(dense.bias)
    else:
        assert built.weight_decay == 1e-4
        assert built._use_weight_decay(dense.kernel) and not built._use_weight_decay(dense.bias)
