"""Bad ImageNet-format data: corrupt JPEGs, truncated and damaged shards, labels out of
range, bad folders; each named, skipped or fatal as promised (shards:
tests/imagenet_data.py)."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf

from lars_tf import data as data_lib
from lars_tf import testing
from lars_tf.data import imagenet, tfrecords
from tests.imagenet_data import _config, _damage, _epoch_labels


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

@pytest.mark.multiprocess
def test_corrupt_jpegs_are_skipped_counted_and_named(corrupt_dir, capfd):
    def named(err):
        return set(re.findall(r"skipping corrupt JPEG in \S*/(\w+)-00000-of-00001\S* record "
                              r"(\d+)", err))

    d = data_lib.build(_config(corrupt_dir, global_batch_size=1, shuffle_buffer=1), 0, 1)
    seen = [y.numpy() for _, y in d.eval]
    assert sum(len(s) for s in seen) == 8
    assert int(d.skipped.numpy()) == 2
    assert named(capfd.readouterr().err) == {("validation", "3"), ("validation", "6")}
    it = iter(d.train)
    train = [next(it) for _ in range(8)]  # one epoch of the 8 good records
    assert len(train) == 8
    # The prefetch and the parallel decode may already be in the next epoch, and may have
    # skipped its record 3 and 6 too. Deleting the iterator stops and waits for its threads,
    # so the counter and the log below are final; every record skipped is counted once.
    del it, train
    err = capfd.readouterr().err
    assert named(err) == {("train", "3"), ("train", "6")}
    reported = len(re.findall(r"skipping corrupt JPEG in \S*/train-", err))
    assert reported >= 2
    assert int(d.skipped.numpy()) == 2 + reported

@pytest.mark.multiprocess
def test_strict_data_makes_a_corrupt_jpeg_fatal_and_named(corrupt_dir):
    d = data_lib.build(_config(corrupt_dir, global_batch_size=1, strict_data=True), 0, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="validation-00000-of-00001"):
        for _ in d.eval:
            pass

@pytest.mark.multiprocess
def test_truncated_record_file_is_read_to_the_damage_named_and_counted(shards, tmp_path,
                                                                      capfd):
    files = imagenet.split_files(str(shards), "validation")
    good = tfrecords.count_records(files[:1])
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

@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
def test_a_damaged_record_mid_shard_is_named_skipped_and_counted(tmp_path, capfd):
    root = testing.id_shards(tmp_path / "shards", 2, records=40)
    _damage(root / "train-00001-of-00002")
    _damage(root / "validation-00000-of-00001")
    total = tfrecords.count_records(imagenet.split_files(str(root), "train"))
    assert 20 < total < 40
    err = capfd.readouterr().err
    assert re.search(r"train-00001-of-00002: damaged or truncated TFRecord file, readable "
                     r"up to byte offset \d+", err), err
    with pytest.raises(tf.errors.DataLossError,
                       match=r"train-00001-of-00002: damaged .* byte offset \d+.*strict_data"):
        tfrecords.count_records(imagenet.split_files(str(root), "train"), strict=True)

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

@pytest.mark.multiprocess
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
