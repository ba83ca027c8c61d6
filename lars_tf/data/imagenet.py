"""ImageNet-format TFRecord shards: ``train-*`` and ``validation-*`` in one folder.

Each record is a ``tf.train.Example`` with ``image/encoded`` (JPEG bytes) and
``image/class/label`` (int64; 0-based, or 1-based as in the files of TF's
build_imagenet_data.py: give ``label_offset=1``), and optionally the bounding boxes
``image/object/bbox/{ymin,xmin,ymax,xmax}`` (fractions) that the training crop then covers.
"""

from __future__ import annotations

import glob
import os
import re
import sys

import tensorflow as tf
from absl import logging

from lars_tf.data import preprocessing

SPLIT_PATTERNS = {"train": "train-*-of-*", "validation": "validation-*-of-*"}
_BOX = ("ymin", "xmin", "ymax", "xmax")
FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    **{f"image/object/bbox/{k}": tf.io.VarLenFeature(tf.float32) for k in _BOX},
}


def split_files(data_dir: str, split: str) -> list[str]:
    """The split's shard files, sorted; a clear error when there are none."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data_dir={data_dir!r} is not a directory")
    pattern = os.path.join(data_dir, SPLIT_PATTERNS[split])
    files = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(
            f"--data_dir={data_dir!r} has no {split} shards ({SPLIT_PATTERNS[split]}): "
            "make them with lars-convert, or point --data_dir at ImageNet TFRecords")
    return files


def count_records(files: list[str]) -> int:
    """Records in ``files`` (reads them, decodes nothing)."""
    return int(tf.data.TFRecordDataset(files).reduce(tf.constant(0, tf.int64),
                                                     lambda n, _: n + 1))


def parse(record: tf.Tensor, label_offset: int = 0):
    """``(jpeg_bytes, label, bbox [1, N, 4])`` of one serialized Example."""
    f = tf.io.parse_single_example(record, FEATURES)
    box = tf.stack([tf.sparse.to_dense(f[f"image/object/bbox/{k}"]) for k in _BOX], axis=-1)
    return f["image/encoded"], tf.cast(f["image/class/label"] - label_offset, tf.int32), \
        box[None]


def check_labels(files: list[str], num_classes: int, label_offset: int, records: int = 256,
                 strict: bool = False):
    """Look at the first records of the first shard before training: labels outside
    ``[0, num_classes)`` after ``label_offset`` mean a wrong ``--label_offset`` or
    ``--num_classes``, so fail now rather than mid-epoch. A shard that is not readable
    there fails now with ``strict`` (``--strict_data``); otherwise the pipeline skips and
    reports it."""
    i, it = 0, iter(tf.data.TFRecordDataset(files[:1]).take(records))
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except tf.errors.DataLossError as e:
            if not strict:
                return
            why = re.sub(r"\{\{.*?\}\}\s*", "", e.message).split("(")[0].strip()
            raise tf.errors.DataLossError(
                None, None, f"{files[0]}: record {i} cannot be read ({why}): not a TFRecord "
                "file, or a damaged one (--strict_data)") from e
        i += 1
        label = int(tf.io.parse_single_example(rec, FEATURES)["image/class/label"])
        if not 0 <= label - label_offset < num_classes:
            raise ValueError(
                f"{files[0]}: record {i - 1} has label {label}, which with --label_offset="
                f"{label_offset} is outside [0, --num_classes={num_classes})")


def size_table(files: list[str]) -> tf.lookup.StaticHashTable:
    """File path -> size in bytes, for ``records`` to tell a complete file from a cut one."""
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(files)), tf.constant([os.path.getsize(f) for f in files],
                                                  tf.int64)),
        default_value=-1)


def records(files, deterministic: bool, cycle_length: int = 16, strict: bool = False,
            skipped: tf.Variable | None = None,
            sizes: tf.lookup.StaticHashTable | None = None) -> tf.data.Dataset:
    """``(serialized, file, index_in_file)`` from ``files``, interleaved in parallel.

    A truncated or corrupt shard ends that file early instead of ending the run: the bytes
    read (each record plus its 16 framing bytes) are compared with the file's size, and a
    shortfall is reported on stderr naming the file and counted in ``skipped`` (one per
    file). With ``strict`` it is an error.

    ``files``: a list of paths, or a tensor of them (then give ``sizes``, a ``size_table``
    made outside any tf.data function)."""
    if isinstance(files, (list, tuple)):
        if sizes is None and not strict:
            sizes = size_table(files)
        files = tf.constant(list(files))
    elif sizes is None and not strict:
        raise ValueError("records(): a tensor of paths needs sizes=size_table(...)")

    def read(path):
        ds = (tf.data.TFRecordDataset(path, buffer_size=1 << 20).enumerate()
              .map(lambda i, r: (r, path, i)))
        if strict:
            return ds
        ds = ds.apply(tf.data.experimental.ignore_errors())
        expected = sizes.lookup(path)
        end = tf.data.Dataset.from_tensors((tf.constant(b""), path, tf.constant(-1, tf.int64)))

        def account(done, record):
            r, p, i = record
            done = done + tf.where(i < 0, tf.constant(0, tf.int64),
                                   tf.cast(tf.strings.length(r), tf.int64) + 16)
            return done, (r, p, i, tf.logical_and(i < 0, done != expected))

        def report(r, p, i, short):
            def say():
                tf.print("lars_tf: truncated or corrupt TFRecord file", p,
                         "- read up to the damage, skipped the rest", output_stream=sys.stderr)
                if skipped is not None:
                    skipped.assign_add(1)
                return tf.constant(False)

            return tf.cond(short, say, lambda: i >= 0)

        return ds.concatenate(end).scan(tf.constant(0, tf.int64), account).filter(report) \
            .map(lambda r, p, i, short: (r, p, i))

    return tf.data.Dataset.from_tensor_slices(files).interleave(
        read, cycle_length=min(cycle_length, int(files.shape[0])), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def checked(skipped: tf.Variable, strict: bool, num_classes: int):
    """Per-record checks, run inside the parallel parse map: returns the record plus an
    ``ok`` flag for a cheap ``filter`` after it.

    A corrupt JPEG (structural check) is reported on stderr with its file and index and
    counted in ``skipped`` (``ok`` False), or with ``strict`` fails naming them. A label
    outside ``[0, num_classes)`` always fails, naming the file and record."""
    def check(image_bytes, label, bbox, path, index):
        valid = preprocessing.is_valid_jpeg(image_bytes)
        in_range = tf.logical_and(label >= 0, label < num_classes)
        asserts = [tf.debugging.Assert(
            in_range, ["label out of range in", path, "record", index, "label", label])]
        if strict:
            asserts.append(tf.debugging.Assert(
                valid, ["corrupt JPEG in", path, "record", index, "(--strict_data)"]))
            ok = valid
        else:
            def report():
                tf.print("lars_tf: skipping corrupt JPEG in", path, "record", index,
                         output_stream=sys.stderr)
                skipped.assign_add(1)
                return tf.constant(False)

            ok = tf.cond(valid, lambda: tf.constant(True), report)
        with tf.control_dependencies(asserts):
            return tf.identity(image_bytes), label, bbox, path, index, ok

    return check


def drop_flag(*record):
    return record[:-1]


def is_ok(*record):
    return record[-1]


def log_sharding(rank: int, files: int, size: int, split: str) -> None:
    if rank == 0:
        how = "file level" if files >= size else "example level (fewer files than ranks)"
        logging.info("%s: %d files over %d ranks, sharded at the %s", split, files, size, how)
