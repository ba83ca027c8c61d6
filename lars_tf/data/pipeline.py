"""The pieces every source's pipeline shares: what a rank gets (``Datasets``), tf.data
options, steps per epoch, per-rank seeds, the per-record checks, and the batch tails that
turn checked JPEG records into training and eval batches."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import tensorflow as tf

from lars_tf.data import preprocessing


@dataclass(frozen=True)
class Datasets:
    """What a rank trains and evaluates on.

    ``train`` repeats forever and yields ``steps_per_epoch`` per-rank batches (backward passes)
    per epoch, the same number on every rank (a rank that ran out early would hang the
    all-reduce), and a multiple of ``backward_passes_per_step`` so that epochs end on a weight
    update. ``eval`` is this rank's part of the eval split: over all ranks, every example
    exactly once.
    """

    train: tf.data.Dataset
    eval: tf.data.Dataset | None
    steps_per_epoch: int
    train_examples: int
    eval_examples: int | None  # None: not known in advance (eval counts as it goes)
    input_shape: tuple[int, ...]
    num_classes: int
    skipped: tf.Variable | None = None  # corrupt records dropped so far on this rank
    # images are uint8 pixels (--normalize_on_device): the Trainer puts the normalisation
    # in front of the model
    uint8_pixels: bool = False


def options(threads: int, deterministic: bool) -> tf.data.Options:
    """tf.data settings for one rank: its own thread pool sized to its cores (ranks on a node
    do not fight over one pool), autotuned parallelism and prefetch, and element order kept
    only when asked (a slow element then does not hold up the others)."""
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = max(1, threads)
    opts.threading.max_intra_op_parallelism = 1
    opts.autotune.enabled = True
    opts.deterministic = deterministic
    return opts


def compute_dtype() -> tf.DType:
    """The compute dtype of Keras' global precision policy."""
    return tf.as_dtype(tf.keras.mixed_precision.global_policy().compute_dtype)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of what rank ``rank`` draws from ``--seed``: shuffles, crops, flips and
    dropout differ across ranks and repeat with the seed."""
    return seed * 1000003 + rank


def epoch_permutations(n: int, seed: int, rank: int, initial_epoch: int) -> tf.data.Dataset:
    """One permutation of ``range(n)`` per epoch from ``initial_epoch`` on, forever; epoch
    ``e``'s is a pure function of ``(seed, rank, e)`` (stateless random ops)."""
    return tf.data.Dataset.range(initial_epoch, 2 ** 62).map(
        lambda e: tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64),
            seed=tf.stack([tf.constant(rank_seed(seed, rank), tf.int64), e])))


def numbered(ds: tf.data.Dataset, start=0) -> tf.data.Dataset:
    """``(k, element)`` with ``k`` counting from ``start``: ``Dataset.enumerate`` without
    its graph rewrite (``replicate_on_split``, for tf.data service splits), which costs
    milliseconds each time the dataset is made, and is made per file per epoch here."""
    return tf.data.Dataset.zip((tf.data.Dataset.range(start, 2 ** 63 - 1), ds))


def steps_per_epoch(config, examples: int, size: int) -> int:
    """Backward passes per epoch on every rank: this rank's share of ``examples`` in whole
    batches, rounded down to whole accumulation windows; an error when there is none."""
    batch = config.per_rank_batch_size(size)
    k = config.backward_passes_per_step
    steps = (examples // size) // batch // k * k
    if steps == 0:
        raise ValueError(
            f"--global_batch_size={config.global_batch_size} is larger than the "
            f"{examples} training examples: no full batch per epoch")
    return steps


def fail_unless(ok: tf.Tensor, message) -> tf.Tensor:
    """``ok``, after an assertion that fails with ``message()`` when it is False; the
    message (string formatting) is only built then, not for every record."""
    def fail():
        with tf.control_dependencies([tf.debugging.Assert(ok, [message()])]):
            return tf.identity(ok)

    return tf.cond(ok, lambda: ok, fail)


def jpeg_checked(skipped: tf.Variable, strict: bool):
    """The per-record JPEG check, for records that were not validated at conversion:
    ``(jpeg, path, index) -> jpeg``, run inside the decode map (no stage of its own). A
    corrupt JPEG (structural check: SOI at the start, EOI at the end) is reported on stderr
    with its file and index, counted in ``skipped`` and fails, for the ``ignore_errors``
    after the map to drop; with ``strict`` it fails naming them, and the run stops."""
    def check(image_bytes, path, index):
        valid = preprocessing.is_valid_jpeg(image_bytes)

        def message():
            return tf.strings.join(["corrupt JPEG in ", path, " record ",
                                    tf.strings.as_string(index),
                                    " (--strict_data)" if strict else " (skipped)"])

        if not strict:
            def report():
                tf.print("lars_tf: skipping corrupt JPEG in", path, "record", index,
                         output_stream=sys.stderr)
                skipped.assign_add(1)
                return tf.constant(False)

            valid = tf.cond(valid, lambda: valid, report)
        with tf.control_dependencies([fail_unless(valid, message)]):
            return tf.identity(image_bytes)

    return check


def labels_checked(num_classes: int):
    """``(images, labels, paths, indices) -> (images, labels)`` of a batch, failing with an
    ``InvalidArgumentError`` that names the file and record of the first label outside
    ``[0, num_classes)``: a wrong ``--label_offset`` or ``--num_classes`` always stops the
    run. One check per batch, after any ``ignore_errors``."""
    def check(images, labels, paths, indices):
        in_range = tf.logical_and(labels >= 0, labels < num_classes)

        def message():
            k = tf.argmin(tf.cast(in_range, tf.int32))
            return tf.strings.join([
                "label out of range in ", paths[k], " record ",
                tf.strings.as_string(indices[k]), " label ", tf.strings.as_string(labels[k]),
                f" (not in [0, --num_classes={num_classes}); check --label_offset)"])

        with tf.control_dependencies([fail_unless(tf.reduce_all(in_range), message)]):
            return tf.identity(images), labels

    return check


def _as_is(*record):
    return record


def train_batches(records, config, batch: int, dtype: tf.DType, parse=_as_is,
                  check=None) -> tf.data.Dataset:
    """Records -> batches of augmented images, in one parallel map per record: ``parse``
    turns a record into ``(jpeg, label, bbox, path, index, seed)`` (records are that
    already by default), ``check`` (a ``jpeg_checked``, or None for validated shards)
    vets the JPEG, then the random-resized crop and flip. Without ``--strict_data`` a record
    that fails there is skipped; the label check comes after that skip, so a bad label
    always stops the run.

    Images come out in ``dtype`` normalised, or as uint8 pixels with
    ``--normalize_on_device`` (the model's first layer normalises them)."""
    out = tf.uint8 if config.normalize_on_device else dtype

    def augment(*record):
        image_bytes, label, box, path, index, seed = parse(*record)
        if check is not None:
            image_bytes = check(image_bytes, path, index)
        return (preprocessing.train_image(image_bytes, config.image_size, out, box, seed),
                label, path, index)

    ds = records.map(augment, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=config.deterministic)
    if check is not None and not config.strict_data:
        ds = ds.ignore_errors(log_warning=True)
    return (ds.batch(batch, drop_remainder=True).map(labels_checked(config.num_classes))
            .prefetch(tf.data.AUTOTUNE))


def eval_batches(records, config, eval_batch_size: int, dtype: tf.DType, parse=_as_is,
                 check=None) -> tf.data.Dataset:
    """Records (``parse``: to ``(jpeg, label, bbox, path, index)``) -> batches of central
    crops (in ``dtype``, or uint8 as in ``train_batches``), every label checked; a record
    that fails to decode is skipped as in ``train_batches``."""
    out = tf.uint8 if config.normalize_on_device else dtype

    def center(*record):
        image_bytes, label, _, path, index = parse(*record)
        if check is not None:
            image_bytes = check(image_bytes, path, index)
        return preprocessing.eval_image(image_bytes, config.image_size, out), label, path, index

    ds = records.map(center, num_parallel_calls=tf.data.AUTOTUNE)
    if check is not None and not config.strict_data:
        ds = ds.ignore_errors(log_warning=True)
    return (ds.batch(eval_batch_size).map(labels_checked(config.num_classes))
            .prefetch(tf.data.AUTOTUNE))
