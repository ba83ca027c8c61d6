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


def checked(skipped: tf.Variable, strict: bool):
    """The per-record JPEG check, run inside the parallel parse map: returns the record
    plus an ``ok`` flag for a cheap ``filter`` after it. A corrupt JPEG (structural check)
    is reported on stderr with its file and index and counted in ``skipped`` (``ok``
    False), or with ``strict`` fails naming them. Labels are checked by ``label_checked``,
    after any error skipping, so that no skip can swallow a bad label."""
    def check(image_bytes, label, bbox, path, index):
        valid = preprocessing.is_valid_jpeg(image_bytes)
        if strict:
            with tf.control_dependencies([tf.debugging.Assert(valid, [tf.strings.join([
                    "corrupt JPEG in ", path, " record ", tf.strings.as_string(index),
                    " (--strict_data)"])])]):
                return tf.identity(image_bytes), label, bbox, path, index, valid

        def report():
            tf.print("lars_tf: skipping corrupt JPEG in", path, "record", index,
                     output_stream=sys.stderr)
            skipped.assign_add(1)
            return tf.constant(False)

        ok = tf.cond(valid, lambda: tf.constant(True), report)
        return image_bytes, label, bbox, path, index, ok

    return check


def label_checked(num_classes: int):
    """``(image, label, path, index) -> (image, label)``, failing with an
    ``InvalidArgumentError`` that names the file and record when the label is outside
    ``[0, num_classes)``: a wrong ``--label_offset`` or ``--num_classes`` always stops the
    run. Place it after any ``ignore_errors``."""
    def check(image, label, path, index):
        in_range = tf.logical_and(label >= 0, label < num_classes)
        with tf.control_dependencies([tf.debugging.Assert(in_range, [tf.strings.join([
                "label out of range in ", path, " record ", tf.strings.as_string(index),
                " label ", tf.strings.as_string(label),
                f" (not in [0, --num_classes={num_classes}); check --label_offset)"])])]):
            return tf.identity(image), label

    return check


def drop_flag(*record):
    return record[:-1]


def is_ok(*record):
    return record[-1]


def train_batches(records, config, batch: int, dtype: tf.DType) -> tf.data.Dataset:
    """``(jpeg, label, bbox, path, index, seed)`` records -> batches of augmented images.
    Without ``--strict_data`` an image that fails to decode is skipped; the label check
    comes after that skip, so a bad label always stops the run."""
    det = config.deterministic
    ds = records.map(
        lambda b, label, box, p, i, seed: (
            preprocessing.train_image(b, config.image_size, dtype, box, seed), label, p, i),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=det)
    if not config.strict_data:
        ds = ds.apply(tf.data.experimental.ignore_errors(log_warning=True))
    return (ds.map(label_checked(config.num_classes))
            .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def eval_batches(records, config, eval_batch_size: int, dtype: tf.DType) -> tf.data.Dataset:
    """``(jpeg, label, bbox, path, index)`` records -> batches of central crops in ``dtype``,
    every label checked."""
    return (records
            .map(lambda b, label, box, p, i: (
                preprocessing.eval_image(b, config.image_size, dtype), label, p, i),
                num_parallel_calls=tf.data.AUTOTUNE)
            .map(label_checked(config.num_classes))
            .batch(eval_batch_size).prefetch(tf.data.AUTOTUNE))
