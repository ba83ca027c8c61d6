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


def build(config, rank: int, size: int, eval_batch_size: int = 1000,
          initial_epoch: int = 0) -> Datasets:
    """The datasets of ``config.dataset`` for one rank of ``size``.

    ``train`` starts at ``initial_epoch``: epoch ``e``'s order depends only on
    ``(config.seed, rank, e)``, so a resumed run sees the batches an uninterrupted run would.
    """
    if config.dataset == "fashion_mnist":
        return _fashion_mnist(config, rank, size, eval_batch_size, initial_epoch)
    raise ValueError(f"--dataset={config.dataset!r}: must be one of {DATASETS}")


def _normalize(images: tf.Tensor) -> tf.Tensor:
    return (tf.cast(images, tf.float32) / 255.0 - fashion_mnist.MEAN) / fashion_mnist.STD


def epoch_permutations(n: int, seed: int, rank: int, initial_epoch: int) -> tf.data.Dataset:
    """One permutation of ``range(n)`` per epoch from ``initial_epoch`` on, forever; epoch
    ``e``'s is a pure function of ``(seed, rank, e)`` (stateless random ops)."""
    return tf.data.Dataset.range(initial_epoch, 2 ** 62).map(
        lambda e: tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64),
            seed=tf.stack([tf.constant(seed * 1000003 + rank, tf.int64), e])))


def _fashion_mnist(config, rank: int, size: int, eval_batch_size: int,
                   initial_epoch: int) -> Datasets:
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

    # Shuffle indices, not images: a seeded permutation per epoch, cut into `steps` batches,
    # then one vectorised gather + normalise per batch.
    train = (
        epoch_permutations(n, config.seed, rank, initial_epoch)
        .flat_map(lambda perm: tf.data.Dataset.from_tensor_slices(
            tf.reshape(perm[: steps * batch], [steps, batch])))
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
