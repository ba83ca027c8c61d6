"""Fashion-MNIST from the idx files (Debian's dataset-fashion-mnist, or any copy of them)."""

from __future__ import annotations

import functools
import gzip
import os

import numpy as np
import tensorflow as tf

from lars_tf.data import elastic
from lars_tf.data.pipeline import Datasets, epoch_permutations, steps_per_epoch
from lars_tf.data.source import Shard, Source

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
# Per-pixel mean and std of the 60,000 training images, on the [0, 1] scale.
MEAN, STD = 0.2860, 0.3530


def _require_folder(data_dir: str) -> None:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"--data_dir={data_dir!r} is not a directory. Install Fashion-MNIST with "
            "`apt-get install dataset-fashion-mnist` or point --data_dir (or "
            "$LARS_TF_DATA_DIR) at a folder with its four idx files")


def _path(data_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"--data_dir={data_dir!r} has no {stem}.gz (or {stem}): Fashion-MNIST comes from "
        "Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist) or the "
        "four idx files of the Fashion-MNIST release")


def check(config) -> None:
    """The folder of ``config.resolved_data_dir()`` holds the four idx files (not read)."""
    data_dir = config.resolved_data_dir()
    _require_folder(data_dir)
    for stems in FILES.values():
        for stem in stems:
            _path(data_dir, stem)


def _read_idx(data_dir: str, stem: str, magic: int, ndim: int) -> np.ndarray:
    path = _path(data_dir, stem)
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        try:
            raw = f.read()
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: cannot be read ({e})") from None
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes)")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: not an idx file of this kind (magic {got:#x}, want {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} values (truncated?)")
    return body.reshape(dims)


def load(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28, 1], labels int32 [N])`` of ``split`` ('train' or 'test')."""
    _require_folder(data_dir)
    image_stem, label_stem = FILES[split]
    images = _read_idx(data_dir, image_stem, 0x803, 3)
    labels = _read_idx(data_dir, label_stem, 0x801, 1)
    if len(images) != len(labels):
        raise ValueError(f"{data_dir}: {split} has {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise ValueError(f"{data_dir}/{label_stem}: record {bad} has label {labels[bad]}, "
                         f"outside [0, {NUM_CLASSES})")
    return images[..., None], labels.astype(np.int32)


def _normalize(images: tf.Tensor) -> tf.Tensor:
    return (tf.cast(images, tf.float32) / 255.0 - MEAN) / STD


def normalize(images: tf.Tensor) -> tf.Tensor:
    """uint8 pixels -> float32 ``(x / 255 - MEAN) / STD`` (the model casts to its compute
    dtype: these images are small)."""
    return (tf.cast(images, tf.float32) / 255.0 - MEAN) / STD


def build(config, shard: Shard) -> Datasets:
    """Example-level shards of the idx files in ``config.resolved_data_dir()``; each
    epoch's order is a pure function of (seed, rank, epoch)."""
    rank, size = shard.rank, shard.size
    data_dir = config.resolved_data_dir()
    batch = config.per_rank_batch_size(size)
    images, labels = load(data_dir, "train")
    test_images, test_labels = load(data_dir, "test")
    # a subset for quick runs: the first N, before the shards (N of 60000 or more, as an
    # ImageNet preset's epoch size, is the whole set)
    if 0 < config.train_examples < len(labels):
        images, labels = images[:config.train_examples], labels[:config.train_examples]

    # Example-level shard (one in-memory source): rank r takes examples r, r+size, ...
    # Every rank runs the same number of steps, set by the smallest shard.
    steps = steps_per_epoch(config, len(labels), size)
    shard_x = tf.constant(images[rank::size])
    shard_y = tf.constant(labels[rank::size])
    n = int(shard_y.shape[0])

    # Shuffle indices, not images: a seeded permutation per epoch, cut into `steps` batches,
    # then one vectorised gather + normalise per batch.
    train = (
        epoch_permutations(n, config.seed, rank, shard.initial_epoch)
        .flat_map(lambda perm: tf.data.Dataset.from_tensor_slices(
            tf.reshape(perm[: steps * batch], [steps, batch])))
        # in order: out of order, a batch of the next epoch could overtake one of this
        # epoch, and an epoch of `steps` batches would see some examples twice
        .map(lambda idx: (normalize(tf.gather(shard_x, idx)), tf.gather(shard_y, idx)),
             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return _datasets(train, test_images, test_labels, shard, steps, len(labels))


def build_elastic(config, shard: Shard) -> Datasets:
    """For ``--elastic``: each rank's slice of every global batch of an order that every
    rank shares (``lars_tf.data.elastic``), from update ``shard.update`` of epoch
    ``shard.initial_epoch`` on."""
    # built again at every epoch and reset: the files are read, and their tensors made,
    # once per process (a tensor made per epoch cost 47 MB of memory an epoch)
    x, y = _train_tensors(config.resolved_data_dir(), config.train_examples)
    test_images, test_labels = _load_once(config.resolved_data_dir(), "test")
    examples = int(y.shape[0])
    steps = elastic.updates_per_epoch(examples, config.global_batch_size)
    train = (
        elastic.index_batches(examples, config.global_batch_size, config.seed, shard.rank,
                              shard.size, shard.initial_epoch, shard.update)
        .map(lambda idx: (normalize(tf.gather(x, idx)), tf.gather(y, idx)),
             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return _datasets(train, test_images, test_labels, shard, steps, examples)


@functools.lru_cache(maxsize=1)
def _train_tensors(data_dir: str, limit: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The training images and labels (the first ``limit``, if 0 < limit < 60000) as
    tensors, made once per process for every elastic epoch."""
    images, labels = _load_once(data_dir, "train")
    if 0 < limit < len(labels):
        images, labels = images[:limit], labels[:limit]
    return tf.constant(images), tf.constant(labels)


@functools.lru_cache(maxsize=2)
def _load_once(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load(data_dir, split)
    images.flags.writeable = labels.flags.writeable = False  # shared by every call
    return images, labels


def _datasets(train, test_images, test_labels, shard: Shard, steps, train_examples) -> Datasets:
    eval_x, eval_y = test_images[shard.rank::shard.size], test_labels[shard.rank::shard.size]
    evaluation = (
        tf.data.Dataset.from_tensor_slices((eval_x, eval_y))
        .batch(shard.eval_batch_size)
        .map(lambda x, y: (normalize(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    return Datasets(
        train=train,
        eval=evaluation,
        steps_per_epoch=steps,
        train_examples=train_examples,
        eval_examples=len(eval_y),
        input_shape=IMAGE_SHAPE,
        num_classes=NUM_CLASSES,
    )


SOURCE = Source("fashion_mnist", build, build_elastic=build_elastic, check=check)
