"""Any tensorflow-datasets image-classification dataset stored as JPEG (``--dataset
tfds:NAME``), e.g. ``imagenet2012``, read from ``--data_dir`` and never downloaded.

A dataset that is not prepared yet is prepared from ``--manual_dir`` when it is a
manual-download dataset (``imagenet2012``: ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in that folder); otherwise the error says how to prepare it.
"""

from __future__ import annotations

import tensorflow as tf

from lars_tf.data import pipeline
from lars_tf.data.source import Shard, Source

PREFIX = "tfds:"


def name_of(dataset: str) -> str:
    return dataset[len(PREFIX):]


def check(config) -> None:
    """``--data_dir`` given (the tfds data folder; tensorflow-datasets is not imported)."""
    if not config.data_dir:
        raise ValueError(f"--dataset={config.dataset} needs --data_dir (the tfds data folder)")


def get_builder(config):
    import tensorflow_datasets as tfds

    name = name_of(config.dataset)
    check(config)
    try:
        return tfds.builder(name, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"--dataset={config.dataset!r}: tensorflow-datasets has no dataset "
                         f"{name!r}") from None


def prepare(config) -> None:
    """Make sure the dataset is prepared in ``--data_dir``; run it on one rank only."""
    import tensorflow_datasets as tfds

    builder = get_builder(config)
    if builder.is_prepared():
        return
    name = name_of(config.dataset)
    manual = bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))
    if not manual:
        raise FileNotFoundError(
            f"--dataset={config.dataset}: not prepared in --data_dir={config.data_dir!r}, and "
            f"lars_tf never downloads. Run `tfds build {name} --data_dir=...` where there is "
            "internet, then copy that folder here")
    if not config.manual_dir:
        raise FileNotFoundError(
            f"--dataset={config.dataset}: not prepared in --data_dir={config.data_dir!r}. "
            f"Pass --manual_dir=<folder with its archives> to prepare it from them "
            f"({' '.join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())[:300]})")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=config.manual_dir))


def info(config, builder=None) -> tuple[str, str, int]:
    """``(image_key, label_key, num_classes)``; errors for datasets this source cannot read."""
    builder = builder or get_builder(config)
    if not builder.info.supervised_keys:
        raise ValueError(f"--dataset={config.dataset}: not a supervised (image, label) dataset")
    image_key, label_key = builder.info.supervised_keys[:2]
    image = builder.info.features[image_key]
    if getattr(image, "encoding_format", None) != "jpeg":
        raise ValueError(f"--dataset={config.dataset}: its images are stored as "
                         f"{getattr(image, 'encoding_format', None) or 'png'}; the tfds "
                         "source reads JPEG-encoded image datasets (e.g. imagenet2012)")
    return image_key, label_key, builder.info.features[label_key].num_classes


def records(config, split: str, rank: int, size: int, training: bool) -> tf.data.Dataset:
    """This rank's part of ``split`` (every example on exactly one rank) as
    ``(serialized-like tuple): (jpeg_bytes, label, bbox, origin, index)``."""
    import tensorflow_datasets as tfds

    builder = get_builder(config)
    image_key, label_key, _ = info(config, builder)
    part = tfds.even_splits(split, n=size)[rank]
    ds = builder.as_dataset(
        split=part, decoders={image_key: tfds.decode.SkipDecoding()}, shuffle_files=training,
        read_config=tfds.ReadConfig(shuffle_seed=pipeline.rank_seed(config.seed, rank),
                                    try_autocache=False))
    origin = tf.constant(f"tfds:{builder.name}/{split}")
    return pipeline.numbered(ds).map(
        lambda i, ex: (ex[image_key], tf.cast(ex[label_key], tf.int32),
                       tf.zeros([1, 0, 4], tf.float32), origin, i))


def build(config, shard: Shard) -> pipeline.Datasets:
    """Example-level shards (tfds.even_splits): every example on exactly one rank."""
    rank, size, dtype = shard.rank, shard.size, shard.dtype
    builder = get_builder(config)
    _, _, num_classes = info(config, builder)
    splits = builder.info.splits
    eval_split = "validation" if "validation" in splits else "test"
    examples = config.train_examples or splits["train"].num_examples
    steps = pipeline.steps_per_epoch(config, examples, size)
    skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_records")
    check = pipeline.jpeg_checked(skipped, config.strict_data)
    seed = pipeline.rank_seed(config.seed, rank)
    train = records(config, "train", rank, size, training=True).repeat().shuffle(
        config.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    # the augmentation seed of the k-th record this rank reads: (seed, rank, k)
    train = pipeline.numbered(train).map(
        lambda k, rec: (*rec, tf.stack([tf.constant(seed, tf.int64), k])))
    evaluation = None
    if eval_split in splits:
        evaluation = pipeline.eval_batches(
            records(config, eval_split, rank, size, training=False), config,
            shard.eval_batch_size,
            dtype, check=check)
    train = pipeline.train_batches(train, config, config.per_rank_batch_size(size), dtype,
                                   check=check)
    return pipeline.Datasets(train=train, eval=evaluation, steps_per_epoch=steps,
                             train_examples=examples, eval_examples=None,
                             input_shape=(config.image_size, config.image_size, 3),
                             num_classes=num_classes, skipped=skipped,
                             uint8_pixels=config.normalize_on_device)


SOURCE = Source(PREFIX, build, prepare=prepare, check=check, prefix=True)
