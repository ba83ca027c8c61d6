"""The data-source protocol: a source is a module with ``build(config, shard) ->
Datasets`` and a ``SOURCE`` record that ``lars_tf.data`` registers.

A new source is one module::

    # lars_tf/data/my_source.py
    def build(config, shard: Shard) -> Datasets:
        ...  # this rank's train (and eval) datasets
    SOURCE = Source("my_source", build)

plus its name in the registration line of ``lars_tf/data/__init__.py`` (or, from your own
code, ``lars_tf.data.register(SOURCE)`` before the config is made).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from lars_tf.data.pipeline import Datasets


@dataclasses.dataclass(frozen=True)
class Shard:
    """What one rank reads of a source.

    ``rank`` of ``size`` ranks; training starts at epoch ``initial_epoch`` (and, for an
    elastic job, at update ``update`` of it); evaluation batches of ``eval_batch_size``;
    images in ``dtype`` (the model's compute dtype; Fashion-MNIST stays float32)."""

    rank: int = 0
    size: int = 1
    initial_epoch: int = 0
    eval_batch_size: int = 1000
    dtype: tf.DType = tf.float32
    update: int = 0


@dataclasses.dataclass(frozen=True)
class Source:
    """A data source: ``build(config, shard)`` for a job of fixed ranks; ``build_elastic``
    (the same signature) for ``--elastic``, whose epochs it can re-cut over any number of
    ranks from any update (``lars_tf.data.elastic``), or None; ``prepare(config)``: one-time
    work on one rank before any reads, or None; ``check(config)``: where the data should be
    (flags given, folders and files there), checked without reading it, raising
    ``ValueError`` or ``FileNotFoundError`` that names the flag; lars-train runs it before
    Horovod starts, or None. ``prefix``: ``name`` is a prefix (``tfds:`` takes
    ``tfds:NAME``)."""

    name: str
    build: Callable[..., Datasets]
    build_elastic: Callable[..., Datasets] | None = None
    prepare: Callable[..., None] | None = None
    check: Callable[..., None] | None = None
    prefix: bool = False

    def matches(self, dataset: str) -> bool:
        if self.prefix:
            return dataset.startswith(self.name) and len(dataset) > len(self.name)
        return dataset == self.name

    @property
    def label(self) -> str:
        """How ``--dataset`` spells it: ``tfds:NAME`` for a prefix."""
        return self.name + "NAME" if self.prefix else self.name
