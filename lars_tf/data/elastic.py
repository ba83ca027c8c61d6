"""Data for a job whose ranks come and go (``--elastic``): one order of the whole training
set per epoch, shared by every rank, cut into global batches; each rank reads its slice of
each global batch.

Epoch ``e``'s order is a pure function of ``(seed, e)``, not of the rank or of how many
ranks there are. Update ``u`` of the epoch reads positions ``[u * G, (u + 1) * G)`` of that
order (``G``: the global batch), and rank ``r`` of ``n`` takes the ``r``-th of ``n``
contiguous slices of it, of ``G // n`` or ``G // n + 1`` examples (``rank_slice``). So:

- every update averages exactly ``G`` examples, whatever ``n`` is (the ranks' gradients are
  weighted by their slice: ``batch_share``);
- after a membership change at update ``u``, the new ranks go on from position ``u * G``:
  within the epoch no example is read twice and none is skipped, and an epoch reads
  ``updates_per_epoch(N, G) * G`` examples whatever changes in it (the last ``N mod G``
  examples of each epoch's order wait for another epoch, as a non-elastic run's remainder).
"""

from __future__ import annotations

import tensorflow as tf


def updates_per_epoch(examples: int, global_batch: int) -> int:
    """Whole global batches in one epoch of ``examples``; an error when there is none."""
    updates = examples // global_batch
    if updates == 0:
        raise ValueError(f"--global_batch_size={global_batch} is larger than the {examples} "
                         "training examples: no full batch per epoch")
    return updates


def rank_slice(global_batch: int, rank: int, size: int) -> tuple[int, int]:
    """``(offset, count)`` of rank ``rank``'s part of a global batch split over ``size``
    ranks: the first ``global_batch % size`` ranks take one example more."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} of {size}")
    base, extra = divmod(global_batch, size)
    if base == 0:
        raise ValueError(f"--global_batch_size={global_batch} is smaller than the {size} "
                         "ranks: some would get no example")
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def batch_share(global_batch: int, rank: int, size: int) -> float:
    """The weight of this rank's mean gradient in the ranks' mean: ``count * size / G``, so
    that the mean over ranks of the weighted gradients is the mean over the global batch."""
    return rank_slice(global_batch, rank, size)[1] * size / global_batch


def epoch_order(examples: int, seed: int, epoch) -> tf.Tensor:
    """Epoch ``epoch``'s order of ``range(examples)``: the same on every rank."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(examples, dtype=tf.int64),
        seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)]))


def index_batches(examples: int, global_batch: int, seed: int, rank: int, size: int,
                  epoch: int, update: int, with_epoch: bool = False) -> tf.data.Dataset:
    """This rank's example indices, one vector per update, from update ``update`` of epoch
    ``epoch`` on, forever (with ``with_epoch``: ``(epoch, indices)`` pairs)."""
    updates = updates_per_epoch(examples, global_batch)
    if not 0 <= update < updates:
        raise ValueError(f"update {update} of an epoch of {updates}")
    offset, count = rank_slice(global_batch, rank, size)

    def rows(e):
        order = epoch_order(examples, seed, e)[: updates * global_batch]
        mine = tf.reshape(order, [updates, global_batch])[:, offset: offset + count]
        first = tf.where(tf.equal(e, epoch), tf.constant(update, tf.int64),
                         tf.constant(0, tf.int64))
        rows = tf.data.Dataset.from_tensor_slices(mine[first:])
        return rows.map(lambda idx: (e, idx)) if with_epoch else rows

    return tf.data.Dataset.range(epoch, 2 ** 62).flat_map(rows)
