"""The ImageNet-format TFRecord pipeline on real JPEGs: sharding over ranks, exact eval,
seeded order and crops, dtypes, the reader's blocks and shuffle buffer, decoding, the
synthetic source, and a 2-rank run (shards: tests/imagenet_data.py)."""

import collections
import glob
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import TrainConfig, testing
from lars_tf import data as data_lib
from lars_tf.data import imagenet, tfrecords
from lars_tf.testing import launcher, run_job
from tests.imagenet_data import PER_CLASS, _config, _damage, _epoch_labels, _eval_images


@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
def test_cache_gives_the_same_records_every_epoch(shards):
    d = data_lib.build(_config(shards, cache=True, global_batch_size=2, shuffle_buffer=1), 0, 1)
    labels = np.concatenate([y.numpy() for _, y in d.train.take(2 * d.steps_per_epoch)])
    per_epoch = d.steps_per_epoch * 2
    assert collections.Counter(labels[:per_epoch]) == collections.Counter(labels[per_epoch:])

@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
def test_two_rank_training_run_on_converted_shards(shards, tmp_path):
    """Epoch 1 on uint8 pixels normalised in the model (--normalize_on_device), epoch 2
    resumed from its checkpoint on float images: the checkpoints are the model's own."""
    run = launcher("gloo") + [
        "lars-train", "--dataset=imagenet", f"--data_dir={shards}", "--image_size=32",
        "--num_classes=3", "--model=small_cnn", "--global_batch_size=32", "--epochs=2",
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
                for position, stride, offset in tfrecords.file_assignment(files, rank, size):
                    owners.update((position, i) for i in range(offset, 60, stride))
            assert owners == collections.Counter((p, i) for p in range(files)
                                                 for i in range(60)), (files, size)
            # a rank reads at most a few files beyond its share
            reads = [len(tfrecords.file_assignment(files, r, size)) for r in range(size)]
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

@pytest.mark.multiprocess
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
    got = sorted(tfrecords.records(files, True, strides=strides, offsets=offsets,
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
    assert tfrecords.read_block(44 * 1024) == 64 and tfrecords.read_block(3000 * 1024) == 1
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
