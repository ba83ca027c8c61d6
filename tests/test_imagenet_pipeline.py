"""ImageNet-format TFRecords end to end, on real JPEGs: lars-convert, the input pipeline
(sharding, exact eval, determinism, corrupt input), the synthetic source, and a 2-rank run."""

import collections
import glob
import json
import os
import re
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import TrainConfig, testing
from lars_tf import data as data_lib
from lars_tf.data import fashion_mnist, imagenet
from lars_tf.testing import BIN, job_env, launcher, run_job

FMNIST = testing.fashion_mnist_dir()
PER_CLASS = 40


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
    photos = testing.photos(("rocket.jpg", "retina.jpg", "hubble_deep_field.jpg",
                             "astronaut.png", "coffee.png", "chelsea.png"))
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
    # the decoder's own words, without TensorFlow's internal op prefix
    assert all(s["error"] and "{{function_node" not in s["error"] and "[Op:" not in s["error"]
               for s in report["skipped"]), report["skipped"]
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
    # or the dtype given (the trainer gives its precision's), whatever the policy
    d = data_lib.build(_config(shards), 0, 1, dtype=tf.float16)
    assert next(iter(d.train))[0].dtype == next(iter(d.eval))[0].dtype == tf.float16


@pytest.fixture()
def corrupt_dir(shards, tmp_path):
    good = [imagenet.parse(r)[0].numpy() for r in
            tf.data.TFRecordDataset(imagenet.split_files(str(shards), "validation")).take(10)]
    payloads = [(g, i % 3) for i, g in enumerate(good)]
    payloads[3] = (os.urandom(3000), 0)             # not a JPEG
    payloads[6] = (good[6][: len(good[6]) // 2], 1)  # a truncated JPEG
    testing.write_shard(tmp_path / "train-00000-of-00001", payloads)
    testing.write_shard(tmp_path / "validation-00000-of-00001", payloads)
    return tmp_path


def test_corrupt_jpegs_are_skipped_counted_and_named(corrupt_dir, capfd):
    def named(err):
        return set(re.findall(r"skipping corrupt JPEG in \S*/(\w+)-00000-of-00001\S* record "
                              r"(\d+)", err))

    d = data_lib.build(_config(corrupt_dir, global_batch_size=1, shuffle_buffer=1), 0, 1)
    seen = [y.numpy() for _, y in d.eval]
    assert sum(len(s) for s in seen) == 8
    assert int(d.skipped.numpy()) == 2
    assert named(capfd.readouterr().err) == {("validation", "3"), ("validation", "6")}
    train = [y for _, y in d.train.take(8)]  # one epoch of the 8 good records
    assert len(train) == 8
    assert named(capfd.readouterr().err) == {("train", "3"), ("train", "6")}
    # 2 more in the training epoch (the prefetch may already be in the next one)
    assert int(d.skipped.numpy()) in (4, 6)


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
    assert re.search(r"damaged or truncated TFRecord file \S*validation-00000-of-00001\S* at "
                     r"byte offset \d+", err), err
    assert int(d.skipped.numpy()) == 1
    # the complete training shards are not reported
    assert all(f"train-0000{i}" not in err for i in range(4))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"truncated TFRecord file \S*validation-00000-of-00001\S* at byte"):
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
    # converted shards: from the label range in their index, naming the shard
    with pytest.raises(ValueError, match=r"train-0000\d-of-00004: its labels run from 0 to 2 "
                                         r".*--label_offset=0 is not within "
                                         r"\[0, --num_classes=2\)"):
        data_lib.build(_config(shards, num_classes=2), 0, 1)
    with pytest.raises(ValueError, match="--label_offset=1"):
        data_lib.build(_config(shards, label_offset=1), 0, 1)


def test_uint8_pixels_normalised_in_the_model_match_the_float_pipeline(shards):
    """--normalize_on_device: the pipeline's uint8 eval crops through the model's first
    layer (NormalizePixels) equal the float32 pipeline's, up to the rounding to uint8."""
    from lars_tf import build

    floats = _eval_images(data_lib.build(_config(shards), 0, 1))
    d = data_lib.build(_config(shards, normalize_on_device=True), 0, 1)
    assert d.uint8_pixels and next(iter(d.train))[0].dtype == tf.uint8
    pixels = np.concatenate([x.numpy() for x, _ in d.eval])
    assert pixels.dtype == np.uint8 and pixels.shape == floats.shape
    normalised = build.NormalizePixels()(pixels).numpy()
    half_step = 0.5 / min(pre_std for pre_std in (0.229 * 255, 0.224 * 255, 0.225 * 255))
    assert np.abs(normalised - floats).max() <= half_step + 1e-5
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        assert build.NormalizePixels()(pixels[:2]).dtype == tf.float16
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


def test_synthetic_source():
    config = TrainConfig(dataset="synthetic", image_size=48, num_classes=7,
                         global_batch_size=64, train_examples=640)
    d = data_lib.build(config, 0, 2)
    assert d.steps_per_epoch == 10 and d.eval is None  # 640 examples / global batch 64
    x, y = next(iter(d.train))
    assert x.shape == (32, 48, 48, 3) and int(tf.reduce_max(y)) < 7


def test_two_rank_training_run_on_converted_shards(shards, tmp_path):
    """Epoch 1 on uint8 pixels normalised in the model (--normalize_on_device), epoch 2
    resumed from its checkpoint on float images: the checkpoints are the model's own."""
    run = launcher("gloo") + [
        "lars-train", "--dataset=imagenet", f"--data_dir={shards}", "--image_size=32",
        "--num_classes=3", "--model=resnet20", "--global_batch_size=32", "--epochs=2",
        "--learning_rate=1.0", "--warmup_epochs=1", f"--model_dir={tmp_path}",
        "--noprogress_bar"]
    run_job(run + ["--normalize_on_device", "--stop_after_epoch=1"])
    assert glob.glob(str(tmp_path / "checkpoints" / "epoch-000001"))
    run_job(run + ["--resume"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["epoch"] for row in summary["history"]] == [1, 2]
    last = summary["history"][-1]
    assert last["test_examples"] == 3 * PER_CLASS + 6  # every validation image, once
    assert summary["steps_per_epoch"] == (3 * PER_CLASS + 6) // 2 // 16
    assert summary["final_test_accuracy"] is not None
    assert glob.glob(str(tmp_path / "checkpoints" / "epoch-000002"))


# --- correctness at scale: partitions, per-rank randomness, labels, damaged shards --------

def _epoch_labels(d, epoch):
    """The labels rank ``d`` reads in epoch ``epoch`` (0-based) of its train stream."""
    batches = d.train.skip(epoch * d.steps_per_epoch).take(d.steps_per_epoch)
    return np.concatenate([y.numpy() for _, y in batches])


@pytest.mark.parametrize("files", [2, 4])
@pytest.mark.parametrize("cache, deterministic", [(False, True), (False, False), (True, True)])
def test_every_record_is_read_by_exactly_one_rank_each_epoch(files, cache, deterministic,
                                                             tmp_path):
    """3 ranks on 2 files (fewer files than ranks) and on 4 (not a multiple): each epoch the
    multiset of record ids read over all ranks is the dataset (file_assignment is checked
    for every count up to 12 files and 9 ranks below)."""
    root = testing.id_shards(tmp_path / "shards", files)
    config = _config(root, num_classes=24, global_batch_size=6, cache=cache,
                     deterministic=deterministic, shuffle_buffer=4)
    ranks = [data_lib.build(config, r, 3) for r in range(3)]
    assert {d.steps_per_epoch for d in ranks} == {4}  # 24 records / 3 ranks / batch 2
    for epoch in (0, 1):
        seen = collections.Counter(np.concatenate([_epoch_labels(d, epoch) for d in ranks]))
        assert seen == collections.Counter(range(24)), f"epoch {epoch + 1}: {seen}"


def test_file_assignment_is_a_partition_for_any_counts():
    for files in range(1, 13):
        for size in range(1, 10):
            owners = collections.Counter()
            for rank in range(size):
                for position, stride, offset in imagenet.file_assignment(files, rank, size):
                    owners.update((position, i) for i in range(offset, 60, stride))
            assert owners == collections.Counter((p, i) for p in range(files)
                                                 for i in range(60)), (files, size)
            # a rank reads at most a few files beyond its share
            reads = [len(imagenet.file_assignment(files, r, size)) for r in range(size)]
            assert max(reads) <= files // size + max(1, files % size)


def _first_images(d, n=2):
    return np.concatenate([x.numpy() for x, _ in d.train.take(n)])


def test_ranks_draw_different_crops_and_flips_and_a_rerun_repeats_them(tmp_path):
    """Every record is the same photo: what differs between two ranks' images is only the
    random crop and flip, which come from (seed, rank, epoch) and repeat with the seed. (Every
    rank sets the same global seed, as the trainer does for the initial weights.)"""
    root = testing.id_shards(tmp_path / "shards", 1, records=16)
    config = _config(root, num_classes=16, global_batch_size=8, shuffle_buffer=1)

    def images(rank, seed=0):
        tf.keras.utils.set_random_seed(0)
        return _first_images(data_lib.build(config.replace(seed=seed), rank, 2))

    rank0, rank1 = images(0), images(1)
    assert rank0.shape == (8, 32, 32, 3)
    differ = [not np.allclose(a, b) for a, b in zip(rank0, rank1)]
    assert all(differ)
    np.testing.assert_array_equal(images(0), rank0)  # reproducible from the seed
    np.testing.assert_array_equal(images(1), rank1)
    assert not np.allclose(images(0, seed=1), rank0)
    # within one rank, the draws differ from record to record
    assert not np.allclose(rank0[0], rank0[1])


def test_a_label_out_of_range_stops_training_even_where_corrupt_jpegs_are_skipped(tmp_path):
    """1-based labels read with --label_offset=0: the last class, 3 of num_classes=3, must
    stop training and eval, naming file and record, beyond the sample checked before
    training (it was silently dropped with the corrupt-JPEG skipping)."""
    good = testing.id_shards(tmp_path / "ids", 1, records=1)
    jpeg = imagenet.parse(next(iter(tf.data.TFRecordDataset(
        imagenet.split_files(str(good), "validation")))))[0].numpy()
    root = tmp_path / "shards"
    root.mkdir()
    payloads = [(jpeg, i % 3) for i in range(30)]
    payloads[20] = (jpeg, 3)
    testing.write_shard(root / "train-00000-of-00002", [(jpeg, i % 3) for i in range(30)])
    testing.write_shard(root / "train-00001-of-00002", payloads)
    testing.write_shard(root / "validation-00000-of-00001", payloads)
    d = data_lib.build(_config(root, global_batch_size=4, shuffle_buffer=1), 0, 1)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"label out of range in \S*train-00001-of-00002\S* record 20 label 3"):
        for _ in d.train.take(3 * d.steps_per_epoch):
            pass
    with pytest.raises(tf.errors.InvalidArgumentError, match="record 20 label 3"):
        for _ in d.eval:
            pass
    # before training: the first records of every shard, not only of the first one
    payloads[2] = (jpeg, 3)
    testing.write_shard(root / "train-00001-of-00002", payloads)
    with pytest.raises(ValueError, match="train-00001-of-00002: record 2 has label 3"):
        data_lib.build(_config(root), 0, 1)


def _damage(path, at=0.5):
    """Flip one byte inside a record in the middle of the file: its CRC no longer matches."""
    raw = bytearray(open(path, "rb").read())
    raw[int(len(raw) * at)] ^= 0xFF
    open(path, "wb").write(bytes(raw))


def test_a_damaged_record_mid_shard_is_named_skipped_and_counted(tmp_path, capfd):
    root = testing.id_shards(tmp_path / "shards", 2, records=40)
    _damage(root / "train-00001-of-00002")
    _damage(root / "validation-00000-of-00001")
    total = imagenet.count_records(imagenet.split_files(str(root), "train"))
    assert 20 < total < 40
    err = capfd.readouterr().err
    assert re.search(r"train-00001-of-00002: damaged or truncated TFRecord file, readable "
                     r"up to byte offset \d+", err), err
    with pytest.raises(tf.errors.DataLossError,
                       match=r"train-00001-of-00002: damaged .* byte offset \d+.*strict_data"):
        imagenet.count_records(imagenet.split_files(str(root), "train"), strict=True)

    d = data_lib.build(_config(root, num_classes=40, global_batch_size=2), 0, 1)
    n_eval = sum(len(y) for _, y in d.eval)
    assert 0 < n_eval < 40 and int(d.skipped.numpy()) == 1
    read = _epoch_labels(d, 0)
    assert len(read) == d.steps_per_epoch * 2 and len(set(read)) == len(read)
    assert int(d.skipped.numpy()) >= 2  # and once more each epoch that reads the file
    err = capfd.readouterr().err
    for name in ("train-00001-of-00002", "validation-00000-of-00001"):
        assert re.search(rf"damaged or truncated TFRecord file \S*{name}\S* at byte offset \d+",
                         err), err
    assert "train-00000-of-00002" not in err

    strict = _config(root, num_classes=40, global_batch_size=2, strict_data=True,
                     train_examples=20)
    d = data_lib.build(strict, 0, 1)
    for ds in (d.train.take(40), d.eval):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"damaged or truncated TFRecord file \S*-000\d\d-of-000\d\d\S* "
                                 r"at byte offset \d+"):
            for _ in ds:
                pass


@pytest.mark.parametrize("block", [1, 3, 64])
def test_the_reader_keeps_each_files_stride_across_read_blocks(block, tmp_path, capfd):
    """Files are read ``block`` records at a time: whatever the block, a rank gets exactly
    the records ``i % stride == offset`` of each file with their indexes, a damaged file up
    to its damage (named once)."""
    root = testing.id_shards(tmp_path / "shards", 2, records=40)
    _damage(root / "train-00001-of-00002")
    files = imagenet.split_files(str(root), "train")
    strides, offsets = [2, 3], [1, 0]
    want = sorted((r, f.encode(), i) for k, f in enumerate(files)
                  for i, r in enumerate(tf.data.TFRecordDataset(f).ignore_errors()
                                        .as_numpy_iterator()) if i % strides[k] == offsets[k])
    assert 10 < len(want) < 17  # file 0: its 10 odd records; file 1: every 3rd before damage
    got = sorted(imagenet.records(files, True, strides=strides, offsets=offsets,
                                  block=block).as_numpy_iterator())
    assert got == want
    err = capfd.readouterr().err
    assert len(re.findall(r"damaged or truncated TFRecord file \S*train-00001-of-00002", err)) \
        == 1, err


@pytest.mark.parametrize("record_kb, buffer", [(44, 10000), (110, 10000),
                                               (3000, 2048 * 1024 // 3000)])
def test_the_shuffle_buffer_holds_at_most_shuffle_buffer_mb(record_kb, buffer):
    config = TrainConfig(dataset="imagenet", data_dir="x", shuffle_buffer=10000,
                         shuffle_buffer_mb=2048)
    assert imagenet.shuffle_buffer(config, record_kb * 1024) == buffer
    assert imagenet.shuffle_buffer(config.replace(shuffle_buffer_mb=1), 2 ** 30) == 1
    assert imagenet.read_block(44 * 1024) == 64 and imagenet.read_block(3000 * 1024) == 1
    with pytest.raises(ValueError, match="--shuffle_buffer_mb"):
        config.replace(shuffle_buffer_mb=0)


def test_crop_geometry(tmp_path):
    """The random-resized crop's window: area and aspect ratio in range, and the central
    crop when no window fits (here: a strip too thin for any allowed window)."""
    from lars_tf.data import preprocessing as pre

    shape = tf.constant([375, 500, 3])
    areas, aspects = [], []
    for i in range(300):
        y, x, h, w = pre.crop_window(shape, 224, tf.constant([7, i], tf.int64)).numpy()
        assert 0 <= y and 0 <= x and y + h <= 375 and x + w <= 500
        areas.append(h * w / (375 * 500))
        aspects.append(w / h)
    assert 0.08 - 0.01 <= min(areas) and max(areas) <= 1.0
    assert min(areas) < 0.2 and max(areas) > 0.6  # the range is used, not one size
    assert 3 / 4 * 0.95 <= min(aspects) and max(aspects) <= 4 / 3 * 1.05
    assert min(aspects) < 0.85 and max(aspects) > 1.2
    # no 3/4..4/3 window of >= 8% of a 2000x12 strip exists: the central crop instead
    y, x, h, w = pre.crop_window(tf.constant([12, 2000, 3]), 224,
                                 tf.constant([1, 2], tf.int64)).numpy()
    side = int(224 / (224 + 32) * 12)
    assert (h, w) == (side, side) and y == (12 - side + 1) // 2 and x == (2000 - side + 1) // 2
    # and the eval crop is the central 224/256 of the shorter side
    assert side == 10


def test_validation_split_takes_the_train_labels(shards, image_folder, tmp_path):
    """A validation folder missing class_1 keeps class_2's label 2 (each split numbered its
    own folders before); a folder that is no train class is refused, naming it."""
    from lars_tf.data.convert import convert

    val = tmp_path / "val"
    for name in ("class_0", "class_2"):
        (val / name).mkdir(parents=True)
        for f in sorted(f for f in os.listdir(image_folder / name)
                        if f.startswith("fmnist_"))[:3]:
            os.symlink(image_folder / name / f, val / name / f)
    out = tmp_path / "out"
    out.mkdir()
    labels = (shards / "labels.txt").read_text()
    (out / "labels.txt").write_text(labels)
    report = convert(str(val), str(out), "validation", num_shards=1, workers=1)
    assert report.classes == ["class_0", "class_1", "class_2"]
    got = collections.Counter(int(imagenet.parse(r)[1]) for r in tf.data.TFRecordDataset(
        imagenet.split_files(str(out), "validation")))
    assert got == {0: 3, 2: 3}
    assert (out / "labels.txt").read_text() == labels  # not rewritten by the validation split
    (val / "class_9").mkdir()
    with pytest.raises(ValueError, match="class folder 'class_9' is not a class of the train"):
        convert(str(val), str(out), "validation", num_shards=1, workers=1)
    with pytest.raises(FileNotFoundError, match="convert the train split first"):
        convert(str(val), str(tmp_path / "empty"), "validation", num_shards=1, workers=1)


# --- validated once, at conversion: the shard index -----------------------------------------

def _copy_converted(shards, dest):
    """A copy of the converted shards and their indexes (a test may change it)."""
    import shutil

    shutil.copytree(shards, dest)
    return dest


def test_converted_shards_carry_an_index_that_training_trusts(shards, tmp_path, monkeypatch):
    from lars_tf.data import shard_index

    files = imagenet.split_files(str(shards), "train")
    for f in files + imagenet.split_files(str(shards), "validation"):
        index, why = shard_index.read(f)
        assert index is not None, why
        labels = [int(imagenet.parse(r)[1]) for r in tf.data.TFRecordDataset(f)]
        assert (index.records, index.label_min, index.label_max) == (
            len(labels), min(labels), max(labels))
        assert index.bytes == os.path.getsize(f) and shard_index.verify(f) == ""
    # the indexes and a conversion's temporary files are not shards
    assert not any(f.endswith((".json", ".tmp")) for f in files)
    (shards / "train-00009-of-00010.tmp").write_bytes(b"half a shard")
    try:
        assert imagenet.split_files(str(shards), "train") == files
    finally:
        (shards / "train-00009-of-00010.tmp").unlink()

    # no pass over the data before training: counts and labels come from the indexes
    def no_pass(files, *args, **kwargs):
        assert not files, f"read before training: {files}"
        return 0

    monkeypatch.setattr(imagenet, "count_records", no_pass)
    monkeypatch.setattr(imagenet, "check_labels", no_pass)
    d = data_lib.build(_config(shards), 0, 1)
    assert d.train_examples == 3 * PER_CLASS + 6
    assert sum(len(y) for _, y in d.eval) == 3 * PER_CLASS + 6


def test_lars_convert_verify_names_a_shard_that_changed(shards, tmp_path):
    root = _copy_converted(shards, tmp_path / "copy")

    def verify():
        return subprocess.run([str(BIN / "lars-convert"), "--verify", f"--output_dir={root}"],
                              env=job_env(), capture_output=True, text=True, timeout=120)

    ok = verify()
    assert ok.returncode == 0 and "every shard" in ok.stderr, ok.stderr[-2000:]
    _damage(root / "train-00002-of-00004")
    bad = verify()
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert re.search(r"train-00002-of-00004: sha256 \w+ differs", bad.stderr), bad.stderr
    assert "train-00001-of-00004" not in bad.stderr


def test_a_validated_shard_still_has_every_label_and_crc_checked(tmp_path, capfd):
    """Trusting a shard drops the JPEG structure check only: a label beyond the range its
    index claims still stops training, naming the record, and a record damaged after
    conversion in the middle of the shard (same size, outside the 64 KiB at either end that
    the index fingerprints: the index still matches) is skipped and named."""
    from lars_tf.data import shard_index

    root = testing.id_shards(tmp_path / "shards", 2, records=80)  # 2 x 40 records, ~217 KB each
    classes = [str(i) for i in range(80)]
    for f in imagenet.split_files(str(root), "train"):
        shard_index.write(f, 40, [0, 29], classes)  # forged: records of ids 0..79 claim 0..29
    shard_index.write(str(root / "validation-00000-of-00001"), 80, [0, 29], classes)
    d = data_lib.build(_config(root, num_classes=30, global_batch_size=2), 0, 1)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"label out of range in \S*-0000\d-of-0000\d\S* record \d+ "
                             r"label [3-7]\d"):
        for _ in d.train.take(d.steps_per_epoch):
            pass

    _damage(root / "train-00001-of-00002")
    assert shard_index.read(str(root / "train-00001-of-00002"))[0] is not None
    config = _config(root, num_classes=80, global_batch_size=2)
    d = data_lib.build(config, 0, 1)
    assert d.steps_per_epoch == 40  # from the indexes: 80 records, before any is read
    first, second = _epoch_labels(d, 0), _epoch_labels(d, 1)
    assert int(d.skipped.numpy()) >= 1
    err = capfd.readouterr().err
    assert re.search(r"damaged or truncated TFRecord file \S*train-00001-of-00002\S* at byte "
                     r"offset \d+", err), err
    # every record of the whole shard (the even ids) and some of the damaged one; the
    # epoch filled from its own records, so that the next epoch is what a run resumed
    # there reads
    assert len(first) == 80 and set(range(0, 80, 2)) < set(first) < set(range(80))
    np.testing.assert_array_equal(
        second, _epoch_labels(data_lib.build(config, 0, 1, initial_epoch=1), 0))


def test_a_shard_rewritten_after_conversion_gets_the_full_checks(shards, tmp_path, capfd):
    """A converted shard replaced by another file (its index no longer matches its size):
    its corrupt JPEG is caught by the per-record check and named, as for any shard that
    lars-convert did not write."""
    root = _copy_converted(shards, tmp_path / "copy")
    good = [imagenet.parse(r)[0].numpy() for r in
            tf.data.TFRecordDataset(str(root / "validation-00000-of-00002")).take(4)]
    testing.write_shard(root / "validation-00000-of-00002",
                 [(good[0], 0), (os.urandom(3000), 1), (good[1], 2)])
    from lars_tf.data import shard_index

    index, why = shard_index.read(str(root / "validation-00000-of-00002"))
    assert index is None and "changed since lars-convert wrote it" in why
    d = data_lib.build(_config(root), 0, 1)
    n = sum(len(y) for _, y in d.eval)
    assert n == 2 + imagenet.count_records([str(root / "validation-00001-of-00002")])
    assert re.search(r"skipping corrupt JPEG in \S*validation-00000-of-00002\S* record 1",
                     capfd.readouterr().err)


def test_dct_scaled_decode_matches_a_full_decode(tmp_path):
    """Large photos (real ones upscaled to 3000x4000 and re-encoded): the random-resized
    crop decoded at 1/2..1/8 DCT scale is within a mean absolute error of 2.5 (of 255; 4
    for any one crop) of decoding the whole window and resizing it bilinearly, and within 2
    of the antialiased resize of the full decode: closer to it, on average, than the
    bilinear resize of the full decode is (which aliases at these 8-16x reductions)."""
    from lars_tf.data import preprocessing as pre

    ratios, vs_bilinear, vs_area, bilinear_vs_area = [], [], [], []
    for path in testing.photos(("astronaut.png", "rocket.jpg")).values():
        image = tf.io.decode_image(open(path, "rb").read(), channels=3, expand_animations=False)
        big = tf.cast(tf.round(tf.image.resize(image, [3000, 4000])), tf.uint8)
        jpeg = tf.io.encode_jpeg(big, quality=90)
        shape = tf.image.extract_jpeg_shape(jpeg)
        for i in range(8):
            window = pre.crop_window(shape, 224, tf.constant([5, i], tf.int64))
            ratios.append(pre.DCT_RATIOS[int(pre.dct_ratio(window[2], window[3], 224))])
            ours = pre.decode_resized(jpeg, shape, window, 224)
            full = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
            bilinear = tf.image.resize(full, [224, 224])
            area = tf.image.resize(full, [224, 224], antialias=True)
            vs_bilinear.append(float(tf.reduce_mean(tf.abs(ours - bilinear))))
            vs_area.append(float(tf.reduce_mean(tf.abs(ours - area))))
            bilinear_vs_area.append(float(tf.reduce_mean(tf.abs(bilinear - area))))
    assert min(ratios) >= 2 and max(ratios) == 8, ratios  # DCT scaling is used
    assert np.mean(vs_bilinear) < 2.5 and max(vs_bilinear) < 4, vs_bilinear
    assert max(vs_area) < 2 and np.mean(vs_area) < np.mean(bilinear_vs_area), (
        vs_area, bilinear_vs_area)
    # a window under twice the output is decoded at full scale, as before
    small = tf.io.encode_jpeg(big[:375, :500])
    window = tf.constant([10, 20, 300, 400])
    np.testing.assert_array_equal(
        pre.decode_resized(small, tf.image.extract_jpeg_shape(small), window, 224),
        tf.image.resize(tf.image.decode_and_crop_jpeg(small, window, channels=3), [224, 224]))


# --- an index that cannot change what is trained (issue: no sharp edges) ------------------

def _edit_index(shard, **fields):
    path = f"{shard}.index.json"
    raw = json.loads(open(path).read())
    raw.update(fields)
    open(path, "w").write(json.dumps(raw))


def test_an_index_promising_more_records_than_its_shard_holds_stops_the_run(shards,
                                                                              tmp_path):
    """An inflated ``records`` field made an epoch many more steps long, filled by
    repeating the shard's images; the reader counts what it meets and names the shard."""
    root = _copy_converted(shards, tmp_path / "copy")
    shard = root / "train-00001-of-00004"
    _edit_index(shard, records=500)
    d = data_lib.build(_config(root), 0, 1)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"train-00001-of-00004: its lars-convert index promises 500 "
                             r"records, the file holds \d+ \(the index does not describe"):
        for _ in d.train.take(d.steps_per_epoch):
            pass


def test_a_shard_rewritten_at_the_same_size_is_not_trusted(shards, tmp_path):
    """The index is tied to its shard by the size and a hash of each end: a shard rewritten
    at the same size (here a byte of its first record) gets the full checks, and says why."""
    from lars_tf.data import shard_index

    root = _copy_converted(shards, tmp_path / "copy")
    shard = root / "train-00000-of-00004"
    _damage(shard, at=0.01)
    index, why = shard_index.read(str(shard))
    assert index is None and "first or last 64 KiB differ" in why
    _, untrusted = imagenet.read_indexes(imagenet.split_files(str(root), "train"))
    assert list(untrusted) == [str(shard)]


def test_lars_convert_refuses_a_folder_with_another_set_and_overwrite_replaces_it(
        shards, image_folder, tmp_path):
    """Converting into a folder with an older set kept both (every image read twice an
    epoch): refused, naming the old set; --overwrite leaves exactly the new set."""
    from lars_tf.data.convert import convert

    out = _copy_converted(shards, tmp_path / "copy")
    with pytest.raises(ValueError, match=r"holds 4 train shards already \(e\.g\. "
                                         r"train-00000-of-00004\).*--overwrite"):
        convert(str(image_folder), str(out), "train", num_shards=2, workers=1)
    assert len(imagenet.split_files(str(out), "train")) == 4  # nothing touched
    convert(str(image_folder), str(out), "train", num_shards=2, workers=1, overwrite=True)
    files = imagenet.split_files(str(out), "train")
    assert [os.path.basename(f) for f in files] == ["train-00000-of-00002",
                                                     "train-00001-of-00002"]
    assert sorted(glob.glob(str(out / "train-*.index.json"))) == [
        f + ".index.json" for f in files]
    assert data_lib.build(_config(out), 0, 1).train_examples == 3 * PER_CLASS + 6


def test_train_and_validation_of_different_class_lists_are_refused(shards, image_folder,
                                                                   tmp_path):
    """Re-converting train with another class list silently relabelled the old validation
    shards; each index records its class list's hash, and training refuses the pair."""
    import shutil

    from lars_tf.data.convert import convert

    out = _copy_converted(shards, tmp_path / "copy")
    more = tmp_path / "more"
    shutil.copytree(image_folder, more)
    shutil.copytree(more / "class_0", more / "class_00")  # a new class, label 1
    report = convert(str(more), str(out), "train", num_shards=2, workers=1, overwrite=True)
    assert sorted(report.stale_validation) == imagenet.split_files(str(out), "validation")
    with pytest.raises(ValueError, match=r"validation-0000\d-of-00002 was converted with "
                                         r"another class list than .*train-0000\d-of-00002"):
        data_lib.build(_config(out, num_classes=4), 0, 1)


def test_lars_convert_verify_names_every_kind_of_mismatch(shards, tmp_path):
    root = _copy_converted(shards, tmp_path / "copy")
    _edit_index(root / "train-00000-of-00004", records=7)       # the count
    _edit_index(root / "train-00001-of-00004", label_max=2000)  # the label range
    os.remove(root / "train-00002-of-00004")                    # a shard of the set
    (root / "validation-00000-of-00003").write_bytes(b"")       # a second set
    proc = subprocess.run([str(BIN / "lars-convert"), "--verify", f"--output_dir={root}"],
                          env=job_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    err = proc.stderr
    assert re.search(r"train-00000-of-00004: holds \d+ records, its index says 7", err), err
    assert re.search(r"train-00001-of-00004: its labels run from 0 to 2, its index says "
                     r"0 to 2000", err), err
    assert "train-00002-of-00004: missing (its set has the others)" in err
    assert "train-00002-of-00004.index.json: an index whose shard is gone" in err
    assert "validation-00000-of-00003: no index" in err
    assert "two or more shard sets of validation (-of-00002, -of-00003)" in err
    assert "train-00003-of-00004" not in err
