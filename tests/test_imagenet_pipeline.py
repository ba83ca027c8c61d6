"""ImageNet-format TFRecords end to end, on real JPEGs: lars-convert, the input pipeline
(sharding, exact eval, determinism, corrupt input), the synthetic source, and a 2-rank run."""

import collections
import glob
import importlib.util
import json
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import TrainConfig
from lars_tf import data as data_lib
from lars_tf.data import fashion_mnist, imagenet
from tests.conftest import BIN, job_env, launcher, run_job

FMNIST = os.environ.get("LARS_TF_DATA_DIR", "/usr/share/datasets/fashion-mnist")
PER_CLASS = 40


def _photos():
    """Real photographs bundled in scikit-image's wheel (not imported, just read)."""
    spec = importlib.util.find_spec("skimage")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return {name: os.path.join(folder, name) for name in
            ("rocket.jpg", "retina.jpg", "hubble_deep_field.jpg", "astronaut.png",
             "coffee.png", "chelsea.png")}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes of Fashion-MNIST images as 64x64 RGB JPEGs, plus photos (JPEG and PNG),
    plus two files no decoder can read."""
    root = tmp_path_factory.mktemp("images")
    x, y = fashion_mnist.load(FMNIST, "test")
    for label in range(3):
        folder = root / f"class_{label}"
        folder.mkdir()
        picks = np.flatnonzero(y == label)[:PER_CLASS]
        for i in picks:
            rgb = tf.image.resize(tf.image.grayscale_to_rgb(tf.constant(x[i])), [64, 64])
            jpeg = tf.io.encode_jpeg(tf.cast(rgb, tf.uint8), quality=90).numpy()
            (folder / f"fmnist_{i}.jpg").write_bytes(jpeg)
    photos = _photos()
    for n, (name, path) in enumerate(sorted(photos.items())):
        (root / f"class_{n % 3}" / name).write_bytes(open(path, "rb").read())
    (root / "class_0" / "noise.jpg").write_bytes(os.urandom(5000))
    rocket = open(photos["rocket.jpg"], "rb").read()
    (root / "class_1" / "truncated.jpg").write_bytes(rocket[: len(rocket) // 3])
    return root


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfrecords")
    for split, n in (("train", 4), ("validation", 2)):
        proc = subprocess.run(
            [str(BIN / "lars-convert"), f"--input_dir={image_folder}", f"--output_dir={out}",
             f"--split={split}", f"--num_shards={n}", "--workers=2"],
            env=job_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{n}/{n} shards" in proc.stderr  # the progress bar
    return out


def test_convert_report_and_schema(shards):
    report = json.loads((shards / "report-train.json").read_text())
    assert report["classes"] == ["class_0", "class_1", "class_2"]
    skipped = sorted(os.path.basename(s["file"]) for s in report["skipped"])
    assert skipped == ["noise.jpg", "truncated.jpg"]
    assert sorted(os.path.basename(f) for f in report["reencoded"]) == [
        "astronaut.png", "chelsea.png", "coffee.png"]
    assert report["written"] == 3 * PER_CLASS + 6
    files = imagenet.split_files(str(shards), "train")
    assert len(files) == 4 and imagenet.count_records(files) == 3 * PER_CLASS + 6
    labels = collections.Counter()
    for rec in tf.data.TFRecordDataset(files):
        image_bytes, label, _ = imagenet.parse(rec)
        assert bool(tf.io.is_jpeg(image_bytes))
        labels[int(label)] += 1
    assert labels == {0: PER_CLASS + 2, 1: PER_CLASS + 2, 2: PER_CLASS + 2}


def _config(shards, **kw):
    base = dict(dataset="imagenet", data_dir=str(shards), image_size=32, num_classes=3,
                global_batch_size=16, deterministic=True, shuffle_buffer=64)
    return TrainConfig(**{**base, **kw})


def _eval_images(d):
    return np.concatenate([x.numpy() for x, _ in d.eval])


@pytest.mark.parametrize("val_shards", [2, 1])  # file-level, then example-level sharding
def test_eval_covers_every_example_exactly_once(shards, tmp_path, val_shards):
    data_dir = shards
    if val_shards == 1:  # one validation file for two ranks: sharded by example
        data_dir = tmp_path
        for f in imagenet.split_files(str(shards), "train"):
            os.symlink(f, tmp_path / os.path.basename(f))
        with tf.io.TFRecordWriter(str(tmp_path / "validation-00000-of-00001")) as w:
            for rec in tf.data.TFRecordDataset(imagenet.split_files(str(shards), "validation")):
                w.write(rec.numpy())
    one = _eval_images(data_lib.build(_config(data_dir), 0, 1))
    two = [_eval_images(data_lib.build(_config(data_dir), r, 2)) for r in range(2)]
    assert len(one) == 3 * PER_CLASS + 6 == sum(len(t) for t in two)
    assert min(len(t) for t in two) > 0

    def rows(a):
        return collections.Counter(np.round(r, 3).tobytes() for r in a.reshape(len(a), -1))

    assert rows(two[0]) + rows(two[1]) == rows(one)


def test_train_batches_shapes_normalisation_and_seeded_order(shards):
    d = data_lib.build(_config(shards), 0, 2)
    assert d.steps_per_epoch == (3 * PER_CLASS + 6) // 2 // 8
    x, y = next(iter(d.train))
    assert x.shape == (8, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    assert -3 < float(tf.reduce_min(x)) < 0 < float(tf.reduce_max(x)) < 3
    first = [y.numpy() for _, y in d.train.take(6)]
    again = [y.numpy() for _, y in data_lib.build(_config(shards), 0, 2).train.take(6)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # two ranks read disjoint files: their label streams differ
    other = [y.numpy() for _, y in data_lib.build(_config(shards), 1, 2).train.take(6)]
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_output_dtype_follows_the_policy(shards):
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        d = data_lib.build(_config(shards), 0, 1)
        assert next(iter(d.train))[0].dtype == tf.bfloat16
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def _write_shard(path, payloads):
    with tf.io.TFRecordWriter(str(path)) as w:
        for payload, label in payloads:
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[payload])),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(
                    value=[label])),
            })).SerializeToString())


@pytest.fixture()
def corrupt_dir(shards, tmp_path):
    good = [imagenet.parse(r)[0].numpy() for r in
            tf.data.TFRecordDataset(imagenet.split_files(str(shards), "validation")).take(10)]
    payloads = [(g, i % 3) for i, g in enumerate(good)]
    payloads[3] = (os.urandom(3000), 0)             # not a JPEG
    payloads[6] = (good[6][: len(good[6]) // 2], 1)  # a truncated JPEG
    _write_shard(tmp_path / "train-00000-of-00001", payloads)
    _write_shard(tmp_path / "validation-00000-of-00001", payloads)
    return tmp_path


def test_corrupt_jpegs_are_skipped_counted_and_named(corrupt_dir, capfd):
    d = data_lib.build(_config(corrupt_dir, global_batch_size=1, shuffle_buffer=1), 0, 1)
    seen = [y.numpy() for _, y in d.eval]
    assert sum(len(s) for s in seen) == 8
    train = [y for _, y in d.train.take(8)]  # one epoch of the 8 good records
    assert len(train) == 8
    err = capfd.readouterr().err
    assert "skipping corrupt JPEG in" in err and "train-00000-of-00001" in err
    assert "record 3" in err and "record 6" in err
    assert int(d.skipped.numpy()) >= 4  # 2 in eval + 2 in the training epoch


def test_strict_data_makes_a_corrupt_jpeg_fatal_and_named(corrupt_dir):
    d = data_lib.build(_config(corrupt_dir, global_batch_size=1, strict_data=True), 0, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="validation-00000-of-00001"):
        for _ in d.eval:
            pass


def test_truncated_record_file_is_read_to_the_damage_named_and_counted(shards, tmp_path,
                                                                      capfd):
    files = imagenet.split_files(str(shards), "validation")
    good = imagenet.count_records(files[:1])
    raw = open(files[0], "rb").read()
    (tmp_path / "validation-00000-of-00001").write_bytes(raw[: int(len(raw) * 0.6)])
    for f in imagenet.split_files(str(shards), "train"):
        os.symlink(f, tmp_path / os.path.basename(f))
    d = data_lib.build(_config(tmp_path), 0, 1)
    n = sum(len(y) for _, y in d.eval)
    assert 0 < n < good
    err = capfd.readouterr().err
    assert "truncated or corrupt TFRecord file" in err
    assert "validation-00000-of-00001" in err
    assert int(d.skipped.numpy()) == 1
    # the complete training shards are not reported
    assert all(f"train-0000{i}" not in err for i in range(4))
    with pytest.raises(tf.errors.DataLossError, match="truncated record"):
        for _ in data_lib.build(_config(tmp_path, strict_data=True), 0, 1).eval:
            pass


def test_cache_gives_the_same_records_every_epoch(shards):
    d = data_lib.build(_config(shards, cache=True, global_batch_size=2, shuffle_buffer=1), 0, 1)
    labels = np.concatenate([y.numpy() for _, y in d.train.take(2 * d.steps_per_epoch)])
    per_epoch = d.steps_per_epoch * 2
    assert collections.Counter(labels[:per_epoch]) == collections.Counter(labels[per_epoch:])


def test_bad_data_dirs_and_labels_fail_before_training(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_dir="):
        data_lib.build(_config(tmp_path / "missing"), 0, 1)
    with pytest.raises(FileNotFoundError, match=r"no train shards \(train-\*-of-\*\)"):
        data_lib.build(_config(tmp_path), 0, 1)
    with pytest.raises(ValueError, match=r"record \d+ has label \d, which with "
                                         r"--label_offset=0 is outside \[0, --num_classes=2\)"):
        data_lib.build(_config(shards, num_classes=2), 0, 1)
    with pytest.raises(ValueError, match="--label_offset=1"):
        data_lib.build(_config(shards, label_offset=1), 0, 1)


def test_synthetic_source():
    config = TrainConfig(dataset="synthetic", image_size=48, num_classes=7,
                         global_batch_size=64, train_examples=640)
    d = data_lib.build(config, 0, 2)
    assert d.steps_per_epoch == 10 and d.eval is None  # 640 examples / global batch 64
    x, y = next(iter(d.train))
    assert x.shape == (32, 48, 48, 3) and int(tf.reduce_max(y)) < 7


def test_two_rank_training_run_on_converted_shards(shards, tmp_path):
    run_job(launcher("gloo") + [
        "lars-train", "--dataset=imagenet", f"--data_dir={shards}", "--image_size=32",
        "--num_classes=3", "--model=resnet20", "--global_batch_size=32", "--epochs=2",
        "--learning_rate=1.0", "--warmup_epochs=1", f"--model_dir={tmp_path}",
        "--noprogress_bar"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    last = summary["history"][-1]
    assert last["test_examples"] == 3 * PER_CLASS + 6  # every validation image, once
    assert summary["steps_per_epoch"] == (3 * PER_CLASS + 6) // 2 // 16
    assert summary["final_test_accuracy"] is not None
    assert glob.glob(str(tmp_path / "checkpoints" / "epoch-000002"))
