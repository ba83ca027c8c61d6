"""lars-convert: the conversion, the validation split's labels, the shard index that
training trusts, --verify, and what is refused (shards: tests/imagenet_data.py)."""

import collections
import glob
import json
import os
import re
import subprocess

import pytest
import tensorflow as tf

from lars_tf import data as data_lib
from lars_tf import testing
from lars_tf.data import imagenet, tfrecords
from lars_tf.testing import BIN, job_env
from tests.imagenet_data import (
    PER_CLASS,
    _config,
    _copy_converted,
    _damage,
    _edit_index,
)


@pytest.mark.multiprocess
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
    assert len(files) == 4 and tfrecords.count_records(files) == 3 * PER_CLASS + 6
    labels = collections.Counter()
    for rec in tf.data.TFRecordDataset(files):
        image_bytes, label, _ = imagenet.parse(rec)
        assert bool(tf.io.is_jpeg(image_bytes))
        labels[int(label)] += 1
    assert labels == {0: PER_CLASS + 2, 1: PER_CLASS + 2, 2: PER_CLASS + 2}

@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
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
    assert n == 2 + tfrecords.count_records([str(root / "validation-00001-of-00002")])
    assert re.search(r"skipping corrupt JPEG in \S*validation-00000-of-00002\S* record 1",
                     capfd.readouterr().err)

@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
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

@pytest.mark.multiprocess
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
