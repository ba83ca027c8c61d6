"""Input pipelines: a source, sharded by rank, shuffled, batched and prefetched.

One module per source (``fashion_mnist``, ``imagenet``, ``tfds_source``, ``synthetic``),
each with its own ``build()``; the pieces they share in ``pipeline``; this module picks the
source of ``config.dataset``.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf

from lars_tf.data import elastic, fashion_mnist, imagenet, synthetic, tfds_source
from lars_tf.data.pipeline import Datasets, compute_dtype, options, rank_seed

__all__ = ["DATASETS", "Datasets", "build", "build_elastic", "check_name", "options", "prepare",
           "rank_seed"]

DATASETS = ("fashion_mnist", "imagenet", "synthetic", "tfds:NAME")
# the sources build_elastic can re-cut (imagenet: shards indexed by lars-convert)
ELASTIC_DATASETS = ("fashion_mnist", "imagenet", "synthetic")


def check_name(dataset: str) -> None:
    if dataset not in DATASETS[:-1] and not (
            dataset.startswith(tfds_source.PREFIX) and len(dataset) > len(tfds_source.PREFIX)):
        raise ValueError(f"--dataset={dataset!r}: must be one of {DATASETS}")


def prepare(config) -> None:
    """One-time preparation before any rank reads (tfds datasets from --manual_dir); run it
    on one rank."""
    if config.dataset.startswith(tfds_source.PREFIX):
        tfds_source.prepare(config)


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
    if config.dataset == "fashion_mnist":
        d = fashion_mnist.build(config, rank, size, eval_batch_size, initial_epoch)
    elif config.dataset == "imagenet":
        d = imagenet.build(config, rank, size, eval_batch_size, initial_epoch, dtype)
    elif config.dataset == "synthetic":
        d = synthetic.build(config, size, dtype)
    elif config.dataset.startswith(tfds_source.PREFIX):
        d = tfds_source.build(config, rank, size, eval_batch_size, dtype)
    else:
        raise ValueError(f"--dataset={config.dataset!r}: must be one of {DATASETS}")
    opts = options(threads or len(os.sched_getaffinity(0)), config.deterministic)
    return dataclasses.replace(
        d, train=d.train.with_options(opts),
        eval=d.eval.with_options(options(threads or 1, True)) if d.eval is not None else None)


def build_elastic(config, rank: int, size: int, epoch: int, update: int,
                  eval_batch_size: int = 1000, threads: int | None = None,
                  dtype: tf.DType | None = None) -> Datasets:
    """For ``--elastic``: this rank's datasets in a world of ``size``, whose training
    batches go on from update ``update`` of epoch ``epoch`` (``lars_tf.data.elastic``: one
    order per epoch shared by every rank, each rank reading its slice of every global
    batch). Sources: ``ELASTIC_DATASETS``."""
    dtype = tf.as_dtype(dtype) if dtype is not None else compute_dtype()
    if config.dataset == "fashion_mnist":
        d = fashion_mnist.build_elastic(config, rank, size, eval_batch_size, epoch, update)
    elif config.dataset == "imagenet":
        d = imagenet.build_elastic(config, rank, size, eval_batch_size, epoch, update, dtype)
    elif config.dataset == "synthetic":
        d = synthetic.build(config, size, dtype,
                            batch=elastic.rank_slice(config.global_batch_size, rank, size)[1])
    else:
        raise ValueError(f"--dataset={config.dataset!r} with --elastic: the sources whose "
                         f"epochs can be re-cut over a new number of ranks are "
                         f"{ELASTIC_DATASETS}")
    opts = options(threads or len(os.sched_getaffinity(0)), True)
    return dataclasses.replace(
        d, train=d.train.with_options(opts),
        eval=d.eval.with_options(options(threads or 1, True)) if d.eval is not None else None)
