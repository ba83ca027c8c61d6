"""Input pipelines: a source, sharded by rank, shuffled, batched and prefetched."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import tensorflow as tf

from lars_tf.data import fashion_mnist, imagenet, preprocessing, tfds_source

DATASETS = ("fashion_mnist", "imagenet", "synthetic", "tfds:NAME")


def check_name(dataset: str) -> None:
    if dataset not in DATASETS[:-1] and not (
            dataset.startswith(tfds_source.PREFIX) and len(dataset) > len(tfds_source.PREFIX)):
        raise ValueError(f"--dataset={dataset!r}: must be one of {DATASETS}")


def prepare(config) -> None:
    """One-time preparation before any rank reads (tfds datasets from --manual_dir); run it
    on one rank."""
    if config.dataset.startswith(tfds_source.PREFIX):
        tfds_source.prepare(config)


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


def build(config, rank: int, size: int, eval_batch_size: int = 1000,
          initial_epoch: int = 0, threads: int | None = None) -> Datasets:
    """The datasets of ``config.dataset`` for one rank of ``size``.

    ``train`` starts at ``initial_epoch``. For ``fashion_mnist`` and ``imagenet`` epoch
    ``e``'s records, their order and their crops and flips depend only on
    ``(config.seed, rank, e)``, so a resumed run sees exactly the batches an uninterrupted
    run would, and every record is read by exactly one rank per epoch (up to the
    remainder that does not fill a batch). ``threads``: the CPU cores this rank may use
    for input processing.
    """
    if config.dataset == "fashion_mnist":
        d = _fashion_mnist(config, rank, size, eval_batch_size, initial_epoch)
    elif config.dataset == "imagenet":
        d = _imagenet(config, rank, size, eval_batch_size, initial_epoch)
    elif config.dataset == "synthetic":
        d = _synthetic(config, size)
    elif config.dataset.startswith(tfds_source.PREFIX):
        d = _tfds(config, rank, size, eval_batch_size)
    else:
        raise ValueError(f"--dataset={config.dataset!r}: must be one of {DATASETS}")
    opts = options(threads or len(os.sched_getaffinity(0)), config.deterministic)
    return dataclasses.replace(
        d, train=d.train.with_options(opts),
        eval=d.eval.with_options(options(threads or 1, True)) if d.eval is not None else None)


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
    return tf.as_dtype(tf.keras.mixed_precision.global_policy().compute_dtype)


def _normalize(images: tf.Tensor) -> tf.Tensor:
    return (tf.cast(images, tf.float32) / 255.0 - fashion_mnist.MEAN) / fashion_mnist.STD


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


def _steps(config, examples: int, size: int) -> int:
    batch = config.per_rank_batch_size(size)
    k = config.backward_passes_per_step
    steps = (examples // size) // batch // k * k
    if steps == 0:
        raise ValueError(
            f"--global_batch_size={config.global_batch_size} is larger than the "
            f"{examples} training examples: no full batch per epoch")
    return steps


def _imagenet(config, rank: int, size: int, eval_batch_size: int,
              initial_epoch: int) -> Datasets:
    data_dir = config.data_dir
    if not data_dir:
        raise ValueError("--dataset=imagenet needs --data_dir (a folder of train-* and "
                         "validation-* TFRecord shards)")
    files = imagenet.split_files(data_dir, "train")
    eval_files = imagenet.split_files(data_dir, "validation")
    imagenet.check_labels(files + eval_files, config.num_classes, config.label_offset,
                          strict=config.strict_data)
    examples = config.train_examples or imagenet.count_records(files, config.strict_data)
    steps = _steps(config, examples, size)
    batch, det = config.per_rank_batch_size(size), config.deterministic
    skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_records")
    check = imagenet.checked(skipped, config.strict_data)
    sizes = imagenet.size_table(files + eval_files)

    def parsed(paths, assignment, deterministic):
        """This rank's records of ``paths`` (a tensor, in the epoch's order), parsed and
        checked in parallel; the filter after the check only reads a flag."""
        positions, strides, offsets = (list(c) for c in zip(*assignment)) if assignment \
            else ([], [], [])
        return (imagenet.records(tf.gather(paths, tf.constant(positions, tf.int64)),
                                 deterministic, strict=config.strict_data, skipped=skipped,
                                 sizes=sizes, strides=strides, offsets=offsets)
                .map(lambda r, p, i: check(*imagenet.parse(r, config.label_offset), p, i),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
                .filter(imagenet.is_ok).map(imagenet.drop_flag))

    # Every epoch, all ranks order the files alike (seeded by (seed, epoch)) and split them
    # with file_assignment, so each record is read by exactly one rank per epoch. Each rank
    # shuffles its records within the epoch from (seed, rank, epoch) and takes exactly
    # `steps` batches of them, so epoch e's stream depends only on (seed, rank, e): a
    # resumed run reads what an uninterrupted one would.
    mine = imagenet.file_assignment(len(files), rank, size)
    imagenet.log_sharding(rank, len(files), size, "train")
    files_t = tf.constant(files)
    seed = rank_seed(config.seed, rank)
    if config.cache:  # parse once; this rank's records (a fixed split) stay in memory
        cached = parsed(files_t, mine, det).cache()

        def epoch_records(e):
            return cached
    else:
        def epoch_records(e):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(len(files), dtype=tf.int64),
                seed=tf.stack([tf.constant(config.seed, tf.int64), e]))
            return parsed(tf.gather(files_t, order), mine, det)

    def epoch(e):
        # tf.data would mix the global seed (the same on every rank, and a tensor seed
        # cannot be combined with a global seed of 0) into the shuffle's seeds; clearing it
        # in this function's graph leaves the shuffle to (seed, rank, epoch) alone
        tf.compat.v1.get_default_graph().seed = None
        records = epoch_records(e).shuffle(config.shuffle_buffer, seed=seed * 7919 + e,
                                           reshuffle_each_iteration=False)
        return records.take(steps * batch).enumerate().map(
            lambda k, rec: (*rec, tf.stack([tf.constant(seed, tf.int64), e * 2 ** 32 + k])))

    train = _train_images(tf.data.Dataset.range(initial_epoch, 2 ** 62).flat_map(epoch),
                          config, batch)
    evaluation = _eval_images(
        parsed(tf.constant(eval_files), imagenet.file_assignment(len(eval_files), rank, size),
               True), config, eval_batch_size)
    return Datasets(train=train, eval=evaluation, steps_per_epoch=steps,
                    train_examples=examples, eval_examples=None,
                    input_shape=(config.image_size, config.image_size, 3),
                    num_classes=config.num_classes, skipped=skipped)


def _eval_images(records, config, eval_batch_size):
    dtype = compute_dtype()
    return (records
            .map(lambda b, label, box, p, i: (
                preprocessing.eval_image(b, config.image_size, dtype), label, p, i),
                num_parallel_calls=tf.data.AUTOTUNE)
            .map(imagenet.label_checked(config.num_classes))
            .batch(eval_batch_size).prefetch(tf.data.AUTOTUNE))


def _train_images(records, config, batch):
    """``(jpeg, label, bbox, path, index, seed)`` records -> batches of augmented images.
    Without ``--strict_data`` an image that fails to decode is skipped; the label check
    comes after that skip, so a bad label always stops the run."""
    dtype, det = compute_dtype(), config.deterministic
    ds = records.map(
        lambda b, label, box, p, i, seed: (
            preprocessing.train_image(b, config.image_size, dtype, box, seed), label, p, i),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=det)
    if not config.strict_data:
        ds = ds.apply(tf.data.experimental.ignore_errors(log_warning=True))
    return (ds.map(imagenet.label_checked(config.num_classes))
            .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def _tfds(config, rank: int, size: int, eval_batch_size: int) -> Datasets:
    """Example-level shards (tfds.even_splits): every example on exactly one rank."""
    builder = tfds_source.get_builder(config)
    _, _, num_classes = tfds_source.info(config, builder)
    splits = builder.info.splits
    eval_split = "validation" if "validation" in splits else "test"
    examples = config.train_examples or splits["train"].num_examples
    steps = _steps(config, examples, size)
    skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_records")
    check = imagenet.checked(skipped, config.strict_data)

    def checked(records):
        return (records.map(check, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=config.deterministic)
                .filter(imagenet.is_ok).map(imagenet.drop_flag))

    seed = rank_seed(config.seed, rank)
    train = checked(tfds_source.records(config, "train", rank, size, training=True).repeat()
                    ).shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    # the augmentation seed of the k-th record this rank reads: (seed, rank, k)
    train = train.enumerate().map(
        lambda k, rec: (*rec, tf.stack([tf.constant(seed, tf.int64), k])))
    evaluation = None
    if eval_split in splits:
        evaluation = _eval_images(
            checked(tfds_source.records(config, eval_split, rank, size, training=False)),
            config, eval_batch_size)
    return Datasets(train=_train_images(train, config, config.per_rank_batch_size(size)),
                    eval=evaluation, steps_per_epoch=steps, train_examples=examples,
                    eval_examples=None,
                    input_shape=(config.image_size, config.image_size, 3),
                    num_classes=num_classes, skipped=skipped)


def _synthetic(config, size: int) -> Datasets:
    """Random images of the model's input shape, made once and repeated: input costs
    nothing, so throughput measures the model and the all-reduce alone."""
    batch = config.per_rank_batch_size(size)
    shape = (config.image_size, config.image_size, 3)
    images = tf.random.uniform((batch, *shape), dtype=tf.float32, seed=config.seed)
    labels = tf.random.uniform((batch,), maxval=config.num_classes, dtype=tf.int32,
                               seed=config.seed)
    train = tf.data.Dataset.from_tensors(
        (tf.cast(images, compute_dtype()), labels)).repeat()
    examples = config.train_examples or 10 * config.global_batch_size
    return Datasets(train=train, eval=None, steps_per_epoch=_steps(config, examples, size),
                    train_examples=examples, eval_examples=0, input_shape=shape,
                    num_classes=config.num_classes)
