"""Random images of the model's input shape: input costs nothing."""

from __future__ import annotations

import tensorflow as tf

from lars_tf.data import elastic
from lars_tf.data.pipeline import Datasets, steps_per_epoch
from lars_tf.data.source import Shard, Source


def build(config, shard: Shard) -> Datasets:
    """Random images of the model's input shape, made once and repeated: input costs
    nothing, so throughput measures the model and the all-reduce alone. Each rank's batch
    is its share of the global batch (for ``--elastic``, its slice of it)."""
    size, dtype = shard.size, shard.dtype
    batch = config.per_rank_batch_size(size, shard.rank)
    shape = (config.image_size, config.image_size, 3)
    images = tf.random.uniform((batch, *shape), dtype=tf.float32, seed=config.seed)
    labels = tf.random.uniform((batch,), maxval=config.num_classes, dtype=tf.int32,
                               seed=config.seed)
    train = tf.data.Dataset.from_tensors(
        (tf.cast(images, dtype), labels)).repeat()
    examples = config.train_examples or 10 * config.global_batch_size
    steps = (elastic.updates_per_epoch(examples, config.global_batch_size) if config.elastic
             else steps_per_epoch(config, examples, size))
    return Datasets(train=train, eval=None, steps_per_epoch=steps,
                    train_examples=examples, eval_examples=0, input_shape=shape,
                    num_classes=config.num_classes)


SOURCE = Source("synthetic", build, build_elastic=build)  # every batch alike: any split
