"""ImageNet-format TFRecord shards: ``train-*`` and ``validation-*`` in one folder.

Each record is a ``tf.train.Example`` with ``image/encoded`` (JPEG bytes) and
``image/class/label`` (int64; 0-based, or 1-based as in the files of TF's
build_imagenet_data.py: give ``label_offset=1``), and optionally the bounding boxes
``image/object/bbox/{ymin,xmin,ymax,xmax}`` (fractions) that the training crop then covers.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re

import numpy as np
import tensorflow as tf
from absl import logging

from lars_tf.data import elastic, pipeline, record_table, shard_index
from lars_tf.data.source import Shard, Source
from lars_tf.data.tfrecords import (
    count_records,
    file_assignment,
    path_table,
    read_block,
    records,
    size_table,
)

SPLIT_PATTERNS = {"train": "train-*-of-*", "validation": "validation-*-of-*"}
_NOT_SHARDS = (".tmp", shard_index.SUFFIX)
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
    # not lars-convert's shards in the making (.tmp) nor their indexes (.index.json)
    files = sorted(f for f in glob.glob(pattern)
                   if os.path.isfile(f) and not f.endswith(_NOT_SHARDS))
    if not files:
        raise FileNotFoundError(
            f"--data_dir={data_dir!r} has no {split} shards ({SPLIT_PATTERNS[split]}): "
            "make them with lars-convert, or point --data_dir at ImageNet TFRecords")
    return files


def label_sample(files: list[str], per_file: int = 8) -> tf.data.Dataset:
    """``(path, index, label)`` of the first ``per_file`` records of every file, read in
    parallel (only the label is parsed)."""
    label_only = {"image/class/label": FEATURES["image/class/label"]}

    def head(path):
        return (pipeline.numbered(tf.data.TFRecordDataset(path).take(per_file))
                .map(lambda i, r: (path, i, tf.io.parse_single_example(
                    r, label_only)["image/class/label"])))

    return tf.data.Dataset.from_tensor_slices(list(files)).interleave(
        head, cycle_length=16, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def parse(record: tf.Tensor, label_offset: int = 0):
    """``(jpeg_bytes, label, bbox [1, N, 4])`` of one serialized Example."""
    f = tf.io.parse_single_example(record, FEATURES)
    box = tf.stack([tf.sparse.to_dense(f[f"image/object/bbox/{k}"]) for k in _BOX], axis=-1)
    return f["image/encoded"], tf.cast(f["image/class/label"] - label_offset, tf.int32), \
        box[None]


def check_labels(files: list[str], num_classes: int, label_offset: int, per_file: int = 8,
                 strict: bool = False):
    """Look at the first ``per_file`` records of every shard before training (cheap: the
    labels only): a label outside ``[0, num_classes)`` after ``label_offset`` means a wrong
    ``--label_offset`` or ``--num_classes``, so fail now, naming the file and record, rather
    than mid-epoch (the pipeline checks every record as well). A shard that is not readable
    there fails now with ``strict`` (``--strict_data``); otherwise the pipeline skips and
    reports it."""
    if not files:
        return
    it = label_sample(files, per_file).as_numpy_iterator()
    while True:
        try:
            path, i, label = next(it)
        except StopIteration:
            return
        except tf.errors.DataLossError:
            if not strict:
                return
            for path in files:  # the error path only: find the file, one at a time
                try:
                    for _ in label_sample([path], per_file):
                        pass
                except tf.errors.DataLossError as e:
                    why = clean_message(e.message).split("(")[0].strip()
                    raise tf.errors.DataLossError(
                        None, None, f"{path}: cannot be read ({why}): not a TFRecord file, "
                        "or a damaged one (--strict_data)") from e
            raise
        if not 0 <= label - label_offset < num_classes:
            raise ValueError(
                f"{path.decode()}: record {i} has label {label}, which with --label_offset="
                f"{label_offset} is outside [0, --num_classes={num_classes})")


def read_indexes(files: list[str]) -> tuple[dict, dict[str, str]]:
    """``({shard: ShardIndex}, {shard: why not trusted})``: which shards lars-convert
    validated (an index beside them that matches their size; see ``shard_index``)."""
    trusted, untrusted = {}, {}
    for f in files:
        index, why = shard_index.read(f)
        if index is None:
            untrusted[f] = why
        else:
            trusted[f] = index
    return trusted, untrusted


def log_untrusted(rank: int, untrusted: dict[str, str], total: int) -> None:
    if rank == 0 and untrusted:
        first, why = next(iter(untrusted.items()))
        logging.info("%d of %d shards are not validated by lars-convert (e.g. %s: %s): their "
                     "records are counted before training and each JPEG is checked as read",
                     len(untrusted), total, first, why)


def check_index_labels(trusted: dict, num_classes: int, label_offset: int) -> None:
    """Every label of every validated shard, from the range its index records: one outside
    ``[0, num_classes)`` after ``label_offset`` fails now, naming the shard."""
    for path, index in trusted.items():
        if index.records and not (0 <= index.label_min - label_offset
                                  and index.label_max - label_offset < num_classes):
            raise ValueError(
                f"{path}: its labels run from {index.label_min} to {index.label_max} (per "
                f"its lars-convert index), which with --label_offset={label_offset} is not "
                f"within [0, --num_classes={num_classes})")


def clean_message(message: str) -> str:
    """An op error's message without TensorFlow's internal prefix
    (``{{function_node __wrapped__DecodeImage...}}``) and op suffix (`` [Op:...]``)."""
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message)
    return re.sub(r"\s*\[Op:\w+\].*$", "", message.strip(), flags=re.S).strip()


def check_index_classes(train: list[str], validation: list[str], trusted: dict) -> None:
    """Train and validation shards indexed against different class lists (train converted
    again with other classes, over old validation shards) would score the model against
    labels that mean other classes: refused, naming a shard of each."""
    def first_by_digest(files):
        found = {}
        for f in files:
            if f in trusted:
                found.setdefault(trusted[f].classes_sha256, f)
        return found

    train_lists, eval_lists = first_by_digest(train), first_by_digest(validation)
    for split, lists in (("train", train_lists), ("validation", eval_lists)):
        if len(lists) > 1:
            a, b = list(lists.values())[:2]
            raise ValueError(f"the {split} shards {a} and {b} were converted with different "
                             "class lists: convert the split again, as one set")
    if train_lists and eval_lists and train_lists.keys() != eval_lists.keys():
        raise ValueError(
            f"{next(iter(eval_lists.values()))} was converted with another class list than "
            f"{next(iter(train_lists.values()))} (labels.txt changed since): convert the "
            "validation split again with lars-convert --split=validation")


def shuffle_buffer(config, record_bytes: float, rank: int = 0) -> int:
    """The shuffle buffer in records: ``--shuffle_buffer``, or fewer when that many records
    of ``record_bytes`` (the shards' mean) exceed ``--shuffle_buffer_mb``."""
    fits = int(config.shuffle_buffer_mb * 2 ** 20 // max(1.0, record_bytes))
    if fits >= config.shuffle_buffer:
        return config.shuffle_buffer
    if rank == 0:
        logging.info("shuffle buffer: %d records (--shuffle_buffer=%d records of %.0f KB "
                     "would exceed --shuffle_buffer_mb=%d)", max(1, fits),
                     config.shuffle_buffer, record_bytes / 1024, config.shuffle_buffer_mb)
    return max(1, fits)


def log_sharding(rank: int, files: int, size: int, split: str) -> None:
    if rank == 0:
        left = files % size
        how = ("file level" if not left else
               f"file level, {left} files split by record" if files >= size else
               "record level (fewer files than ranks)")
        logging.info("%s: %d files over %d ranks, sharded at the %s", split, files, size, how)


def check(config) -> tuple[list[str], list[str]]:
    """``(train files, validation files)`` of ``config.data_dir``: the flag given, and shards
    of both splits there (nothing read yet)."""
    if not config.data_dir:
        raise ValueError("--dataset=imagenet needs --data_dir (a folder of train-* and "
                         "validation-* TFRecord shards)")
    return split_files(config.data_dir, "train"), split_files(config.data_dir, "validation")


def open_shards(config, rank: int) -> tuple[list[str], list[str], dict, dict[str, str]]:
    """``(train files, validation files, trusted, untrusted)`` of ``config.data_dir``, every
    check that can run before training done (indexes, label ranges, class lists)."""
    files, eval_files = check(config)
    trusted, untrusted = read_indexes(files + eval_files)
    log_untrusted(rank, untrusted, len(files + eval_files))
    check_index_labels(trusted, config.num_classes, config.label_offset)
    check_index_classes(files, eval_files, trusted)
    check_labels([f for f in files + eval_files if f in untrusted], config.num_classes,
                 config.label_offset, strict=config.strict_data)
    return files, eval_files, trusted, untrusted


def evaluation(config, eval_files, trusted, untrusted, rank, size, eval_batch_size, dtype,
               skipped: tf.Variable, block: int) -> tf.data.Dataset:
    """This rank's part of the validation shards (``file_assignment``), in central crops,
    read ``block`` records at a time."""
    check = (pipeline.jpeg_checked(skipped, config.strict_data)
             if any(f in untrusted for f in eval_files) else None)
    promised = [f for f in eval_files if f in trusted]
    assignment = file_assignment(len(eval_files), rank, size)
    positions, strides, offsets = (list(c) for c in zip(*assignment)) if assignment \
        else ([], [], [])
    mine = records(
        tf.gather(tf.constant(eval_files), tf.constant(positions, tf.int64)), True,
        strict=config.strict_data, skipped=skipped, sizes=size_table(eval_files),
        strides=strides, offsets=offsets, block=block,
        counts=path_table(promised, [trusted[f].records for f in promised]) if promised
        else None)
    return pipeline.eval_batches(mine, config, eval_batch_size, dtype,
                                 parse=lambda r, p, i: (*parse(r, config.label_offset), p, i),
                                 check=check)


def build(config, shard: Shard) -> pipeline.Datasets:
    """This rank's train and eval datasets of the shards in ``config.data_dir``."""
    rank, size, dtype = shard.rank, shard.size, shard.dtype
    files, eval_files, trusted, untrusted = open_shards(config, rank)
    examples = config.train_examples or (
        sum(trusted[f].records for f in files if f in trusted)
        + count_records([f for f in files if f in untrusted], config.strict_data))
    record_bytes = sum(os.path.getsize(f) for f in files) / max(1, examples)
    buffer = shuffle_buffer(config, record_bytes, rank)
    block = read_block(record_bytes)
    steps = pipeline.steps_per_epoch(config, examples, size)
    batch, det = config.per_rank_batch_size(size), config.deterministic
    skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_records")
    # a split whose shards were all validated by lars-convert skips the per-record check
    check = pipeline.jpeg_checked(skipped, config.strict_data) \
        if any(f in untrusted for f in files) else None
    sizes = size_table(files)
    promised = [f for f in files if f in trusted]
    counts = path_table(promised, [trusted[f].records for f in promised]) if promised else None

    def mine_of(paths, assignment, deterministic):
        """This rank's serialized records of ``paths`` (a tensor, in the epoch's order)."""
        positions, strides, offsets = (list(c) for c in zip(*assignment)) if assignment \
            else ([], [], [])
        return records(tf.gather(paths, tf.constant(positions, tf.int64)), deterministic,
                       strict=config.strict_data, skipped=skipped, sizes=sizes,
                       strides=strides, offsets=offsets, block=block, counts=counts)

    def parse_train(place, record):
        r, p, i = record
        return (*parse(r, config.label_offset), p, i,
                tf.stack([tf.constant(seed, tf.int64), place]))

    # Every epoch, all ranks order the files alike (seeded by (seed, epoch)) and split them
    # with file_assignment, so each record is read by exactly one rank per epoch. Each rank
    # shuffles its records within the epoch from (seed, rank, epoch) and takes exactly
    # `steps` batches of them, so epoch e's stream depends only on (seed, rank, e): a
    # resumed run reads what an uninterrupted one would.
    mine = file_assignment(len(files), rank, size)
    log_sharding(rank, len(files), size, "train")
    files_t = tf.constant(files)
    seed = pipeline.rank_seed(config.seed, rank)
    if config.cache:  # read once; this rank's records (a fixed split) stay in memory
        cached = mine_of(files_t, mine, det).cache()

        def epoch_records(e):
            return cached
    else:
        def epoch_records(e):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(len(files), dtype=tf.int64),
                seed=tf.stack([tf.constant(config.seed, tf.int64), e]))
            return mine_of(tf.gather(files_t, order), mine, det)

    def epoch(e):
        # tf.data would mix the global seed (the same on every rank, and a tensor seed
        # cannot be combined with a global seed of 0) into the shuffle's seeds; clearing it
        # in this function's graph leaves the shuffle to (seed, rank, epoch) alone
        tf.compat.v1.get_default_graph().seed = None
        records = epoch_records(e).shuffle(buffer, seed=seed * 7919 + e,
                                           reshuffle_each_iteration=False)
        # steps come from the indexes (or --train_examples): should this rank's records
        # fall short (a shard damaged since lars-convert indexed it), the epoch is filled
        # with its own records again rather than with the next epoch's, so every epoch
        # still starts where a resumed run starts it
        # each record's augmentation seed: (seed, rank) and its place e * 2**32 + k
        return pipeline.numbered(records.repeat().take(steps * batch), start=e * 2 ** 32)

    train = pipeline.train_batches(
        tf.data.Dataset.range(shard.initial_epoch, 2 ** 62).flat_map(epoch), config, batch,
        dtype,
        parse=parse_train, check=check)
    return pipeline.Datasets(train=train, eval=evaluation(
                                 config, eval_files, trusted, untrusted, rank, size,
                                 shard.eval_batch_size, dtype, skipped, block),
                             steps_per_epoch=steps,
                             train_examples=examples, eval_examples=None,
                             input_shape=(config.image_size, config.image_size, 3),
                             num_classes=config.num_classes, skipped=skipped,
                             uint8_pixels=config.normalize_on_device)


@functools.lru_cache(maxsize=2)
def _table(files: tuple[str, ...], promised: tuple[int, ...]) -> record_table.RecordTable:
    return record_table.RecordTable(list(files), list(promised))  # walked once per process


def build_elastic(config, shard: Shard) -> pipeline.Datasets:
    """For ``--elastic``: this rank's slice of every global batch of an order of all the
    training records that every rank shares (``lars_tf.data.elastic``), from update
    ``shard.update`` of epoch ``shard.initial_epoch`` on, read by position
    (``record_table``). A record's crop and flip are seeded by ``(seed, epoch, record)``,
    so they do not depend on the ranks either: 3 ranks read and augment what one process
    would."""
    rank, size, dtype = shard.rank, shard.size, shard.dtype
    files, eval_files, trusted, untrusted = open_shards(config, rank)
    for f in files:
        if f in untrusted:
            raise ValueError(
                f"--elastic reads the training shards by record position and needs each one "
                f"validated and indexed by lars-convert; {f} is not ({untrusted[f]}). "
                "Convert the images with lars-convert (or drop --elastic)")
    table = _table(tuple(files), tuple(trusted[f].records for f in files))
    examples = len(table)
    if 0 < config.train_examples < examples:
        examples = config.train_examples  # the first records, in file order
    steps = elastic.updates_per_epoch(examples, config.global_batch_size)
    count = elastic.rank_slice(config.global_batch_size, rank, size)[1]
    skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_records")

    def read(e, numbers):
        serialized, path, index = table.records(numbers)
        seeds = tf.stack([tf.fill(tf.shape(numbers), tf.constant(config.seed, tf.int64)),
                          e * 2 ** 32 + numbers], axis=1)
        return serialized, path, index, seeds

    def parse_train(serialized, path, index, seed):
        return (*parse(serialized, config.label_offset), path, index, seed)

    records = (elastic.index_batches(examples, config.global_batch_size, config.seed, rank,
                                     size, shard.initial_epoch, shard.update,
                                     with_epoch=True)
               .map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .unbatch())
    # in order: a record that a parallel map let overtake another could cross into the
    # next update, and a reset between the two would lose it
    ordered = dataclasses.replace(config, deterministic=True)
    train = pipeline.train_batches(records, ordered, count, dtype, parse=parse_train)
    block = read_block(float(np.mean(table.lengths)) + 16 if len(table) else 1.0)
    return pipeline.Datasets(train=train, eval=evaluation(
                                 config, eval_files, trusted, untrusted, rank, size,
                                 shard.eval_batch_size, dtype, skipped, block),
                             steps_per_epoch=steps, train_examples=examples,
                             eval_examples=None,
                             input_shape=(config.image_size, config.image_size, 3),
                             num_classes=config.num_classes, skipped=skipped,
                             uint8_pixels=config.normalize_on_device)


SOURCE = Source("imagenet", build, build_elastic=build_elastic, check=check)
