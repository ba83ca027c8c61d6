"""Input pipelines: a source, sharded by rank, shuffled, batched and prefetched."""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from lars_tf.data import fashion_mnist

DATASETS = ("fashion_mnist",)


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
    eval_examples: int
    input_shape: tuple[int, ...]
    num_classes: int


def build(config, rank: int, size: int, eval_batch_size: int = 1000) -> Datasets:
    """The datasets of ``config.dataset`` for one rank of ``size``."""
    if config.dataset == "fashion_mnist":
        return _fashion_mnist(config, rank, size, eval_batch_size)
    raise ValueError(f"--dataset={config.dataset!r}: must be one of {DATASETS}")


def _normalize(images: tf.Tensor) -> tf.Tensor:
    return (tf.cast(images, tf.float32) / 255.0 - fashion_mnist.MEAN) / fashion_mnist.STD


def _fashion_mnist(config, rank: int, size: int, eval_batch_size: int) -> Datasets:
    data_dir = config.resolved_data_dir()
    batch = config.per_rank_batch_size(size)
    images, labels = fashion_mnist.load(data_dir, "train")
    test_images, test_labels = fashion_mnist.load(data_dir, "test")

    # Example-level shard (one in-memory source): rank r takes examples r, r+size, ...
    # Every rank runs the same number of steps, set by the smallest shard.
    k = config.backward_passes_per_step
    steps = (len(labels) // size) // batch // k * k
    if steps == 0:
        raise ValueError(
            f"--global_batch_size={config.global_batch_size} is larger than the "
            f"{len(labels)} training examples: no full batch per epoch")
    shard_x = tf.constant(images[rank::size])
    shard_y = tf.constant(labels[rank::size])
    n = int(shard_y.shape[0])

    # Shuffle indices, not images: a per-epoch permutation (reshuffled every pass, seeded so
    # runs repeat), batched, then one vectorised gather + normalise per batch.
    train = (
        tf.data.Dataset.range(n)
        .shuffle(n, seed=config.seed + rank, reshuffle_each_iteration=True)
        .batch(batch, drop_remainder=True)
        .take(steps)
        .repeat()
        .map(lambda idx: (_normalize(tf.gather(shard_x, idx)), tf.gather(shard_y, idx)),
             num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    eval_x, eval_y = test_images[rank::size], test_labels[rank::size]
    evaluation = (
        tf.data.Dataset.from_tensor_slices((eval_x, eval_y))
        .batch(eval_batch_size)
        .map(lambda x, y: (_normalize(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    return Datasets(
        train=train,
        eval=evaluation,
        steps_per_epoch=steps,
        train_examples=len(labels),
        eval_examples=len(eval_y),
        input_shape=fashion_mnist.IMAGE_SHAPE,
        num_classes=fashion_mnist.NUM_CLASSES,
    )
