"""Input pipelines: a source, sharded by rank, shuffled, batched and prefetched.

One module per source (``fashion_mnist``, ``imagenet``, ``tfds_source``, ``synthetic``),
each with ``build(config, shard)`` and a ``SOURCE`` record (``lars_tf.data.source``),
registered below; the pieces they share in ``pipeline``. ``build`` picks the source of
``config.dataset``.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf

from lars_tf.data import fashion_mnist, imagenet, synthetic, tfds_source
from lars_tf.data.pipeline import Datasets, compute_dtype, options, rank_seed
from lars_tf.data.source import Shard, Source

__all__ = ["DATASETS", "Datasets", "Shard", "Source", "build", "build_elastic", "check",
           "names", "options", "prepare", "rank_seed", "register", "source"]

_SOURCES: dict[str, Source] = {}


def register(new: Source) -> Source:
    """Make ``new`` a ``--dataset`` (before the config that names it is made)."""
    if new.name in _SOURCES:
        raise ValueError(f"a data source named {new.name!r} is already registered")
    _SOURCES[new.name] = new
    return new


# The registration line: a new source is a module with a SOURCE, named here.
for _module in (fashion_mnist, imagenet, synthetic, tfds_source):
    register(_module.SOURCE)


def names(elastic: bool = False) -> tuple[str, ...]:
    """``--dataset`` values (``tfds:NAME`` for a prefix); with ``elastic``, those an
    elastic job can read."""
    return tuple(s.label for s in _SOURCES.values() if not elastic or s.build_elastic)


DATASETS = names()  # the built-in ones


def source(dataset: str) -> Source:
    """The source ``--dataset=dataset`` names; a ``ValueError`` naming the flag if none."""
    for s in _SOURCES.values():
        if s.matches(dataset):
            return s
    raise ValueError(f"--dataset={dataset!r}: must be one of {names()}")


def check(config) -> None:
    """What can be checked of ``config``'s data before any rank starts: the source's name,
    then where its data should be (``Source.check``). Raises ``ValueError`` or
    ``FileNotFoundError`` naming the flag."""
    s = source(config.dataset)
    if s.check is not None:
        s.check(config)


def prepare(config) -> None:
    """One-time preparation before any rank reads (tfds datasets from --manual_dir); run it
    on one rank."""
    s = source(config.dataset)
    if s.prepare is not None:
        s.prepare(config)


def _with_options(d: Datasets, threads: int | None, deterministic: bool) -> Datasets:
    opts = options(threads or len(os.sched_getaffinity(0)), deterministic)
    return dataclasses.replace(
        d, train=d.train.with_options(opts),
        eval=d.eval.with_options(options(threads or 1, True)) if d.eval is not None else None)


def build(config, rank: int, size: int, eval_batch_size: int = 1000,
          initial_epoch: int = 0, threads: int | None = None,
          dtype: tf.DType | None = None) -> Datasets:
    """The datasets of ``config.dataset`` for one rank of ``size``.

    ``train`` starts at ``initial_epoch``. For ``fashion_mnist`` and ``imagenet`` epoch
    ``e``'s records, their order and their crops and flips depend only on
    ``(config.seed, rank, e)``, so a resumed run sees exactly the batches an uninterrupted
    run would, and every record is read by exactly one rank per epoch (up to the
    remainder that does not fill a batch). ``threads``: the CPU cores this rank may use
    for input processing. ``dtype``: of the JPEG sources' and synthetic images (the
    model's compute dtype; default: that of Keras' global precision policy); Fashion-MNIST
    stays float32.
    """
    dtype = tf.as_dtype(dtype) if dtype is not None else compute_dtype()
    shard = Shard(rank=rank, size=size, initial_epoch=initial_epoch,
                  eval_batch_size=eval_batch_size, dtype=dtype)
    return _with_options(source(config.dataset).build(config, shard), threads,
                         config.deterministic)


def build_elastic(config, rank: int, size: int, epoch: int, update: int,
                  eval_batch_size: int = 1000, threads: int | None = None,
                  dtype: tf.DType | None = None) -> Datasets:
    """For ``--elastic``: this rank's datasets in a world of ``size``, whose training
    batches go on from update ``update`` of epoch ``epoch`` (``lars_tf.data.elastic``: one
    order per epoch shared by every rank, each rank reading its slice of every global
    batch). Sources: ``names(elastic=True)``."""
    dtype = tf.as_dtype(dtype) if dtype is not None else compute_dtype()
    s = source(config.dataset)
    if s.build_elastic is None:
        raise ValueError(f"--dataset={config.dataset!r} with --elastic: the sources whose "
                         f"epochs can be re-cut over a new number of ranks are "
                         f"{names(elastic=True)}")
    shard = Shard(rank=rank, size=size, initial_epoch=epoch, update=update,
                  eval_batch_size=eval_batch_size, dtype=dtype)
    return _with_options(s.build_elastic(config, shard), threads, True)
