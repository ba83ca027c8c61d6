"""Training input pipeline throughput on ImageNet-sized JPEGs, side by side in one process:
lars_tf's pipeline, plain tf.io.decode_jpeg of the same records (the decode-bound limit), and
TF Model Garden's ImageNet training preprocessing.

    python -m benchmarks.input_pipeline [--images 384] [--rounds 5] [--nowrite]

The images are real photographs (scikit-image's bundled ones), cut and resized to 500x375
at random and JPEG-encoded, written as TFRecords with lars-convert's code. All pipelines get
the same tf.data options (a private thread pool of all cores, autotune) and the same
record reader; they differ only in what each record goes through:

- decode-bound: parse the Example, ``tf.io.decode_jpeg`` the whole image, nothing else;
- lars_tf: ``lars_tf.data.build`` for ``--dataset=imagenet`` (structural JPEG check,
  fused decode-and-crop of a random-resized crop to 224x224, flip, normalise, shuffle);
- Model Garden: ``official.legacy.image_classification.preprocessing.preprocess_for_train``
  (tf-models-official 2.15.0: fused decode-crop-flip, resize to 224x224, mean subtraction
  and standardisation), on the same parsed records.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from lars_tf import TrainConfig, testing  # noqa: E402
from lars_tf import data as data_lib  # noqa: E402
from lars_tf.data import convert, imagenet  # noqa: E402

flags.DEFINE_integer("images", 384, "Distinct JPEGs (500x375).")
flags.DEFINE_integer("rounds", 5, "Timed rounds per pipeline.")
flags.DEFINE_integer("batches", 40, "Batches of 64 timed per round.")
flags.DEFINE_bool("write", True, "Write the table to benchmarks/RESULTS.md.")
FLAGS = flags.FLAGS
BATCH = 64


def make_images(folder: str, n: int) -> None:
    photos = [tf.io.decode_image(open(path, "rb").read(), channels=3, expand_animations=False)
              for path in testing.photos().values()]
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "all"), exist_ok=True)
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = int(p.shape[0]), int(p.shape[1])
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = tf.image.resize(p[y:y + ch, x:x + cw], [375, 500])
        if i % 2:
            img = img[:, ::-1]
        jpeg = tf.io.encode_jpeg(tf.cast(img, tf.uint8), quality=90).numpy()
        open(os.path.join(folder, "all", f"img{i:05d}.jpg"), "wb").write(jpeg)


def model_garden_preprocess():
    testing.model_garden_file()  # stops with how to install it when it is missing
    from official.legacy.image_classification import preprocessing

    return preprocessing.preprocess_for_train


def main(argv):
    del argv
    work = tempfile.mkdtemp(prefix="lars_tf_bench_")
    make_images(os.path.join(work, "images"), FLAGS.images)
    shards = os.path.join(work, "tfrecords")
    convert.convert(os.path.join(work, "images"), shards, "train", num_shards=8)
    convert.convert(os.path.join(work, "images"), shards, "validation", num_shards=1)
    files = imagenet.split_files(shards, "train")
    mean_kb = np.mean([os.path.getsize(f) for f in files]) * len(files) / FLAGS.images / 1024
    threads = len(os.sched_getaffinity(0))
    opts = data_lib.options(threads, deterministic=False)

    def raw():
        return imagenet.records(files, deterministic=False).repeat().map(
            lambda r, p, i: imagenet.parse(r)[0], num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False)

    preprocess_for_train = model_garden_preprocess()
    config = TrainConfig(dataset="imagenet", data_dir=shards, num_classes=1,
                         global_batch_size=BATCH, shuffle_buffer=256)
    pipelines = {
        "decode-bound (tf.io.decode_jpeg only)": raw().map(
            lambda b: tf.io.decode_jpeg(b, channels=3), num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False).batch(BATCH).prefetch(tf.data.AUTOTUNE).with_options(opts),
        "lars_tf (--dataset=imagenet)": data_lib.build(config, 0, 1, threads=threads).train,
        "Model Garden preprocess_for_train": raw().map(
            lambda b: preprocess_for_train(b, 224, mean_subtract=True, standardize=True),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .batch(BATCH).prefetch(tf.data.AUTOTUNE).with_options(opts),
    }
    rates = {name: [] for name in pipelines}
    names = list(pipelines)
    for r in range(FLAGS.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            # one pipeline at a time: a live iterator keeps prefetching in the background,
            # so each round starts a fresh one, warms it up, times it and shuts it down
            it = iter(pipelines[name])
            for _ in range(6):
                next(it)
            t0 = time.perf_counter()
            for _ in range(FLAGS.batches):
                next(it)
            rates[name].append(FLAGS.batches * BATCH / (time.perf_counter() - t0))
            del it
            gc.collect()

    med = {name: statistics.median(v) for name, v in rates.items()}
    ours, bound, mg = (med[names[1]], med[names[0]], med[names[2]])
    rows = ["| pipeline | images/sec (median) | best round | ratio to lars_tf |",
            "|---|---|---|---|"]
    for name in names:
        rows.append(f"| {name} | {med[name]:.0f} | {max(rates[name]):.0f} | "
                    f"{med[name] / ours:.2f}x |")
    common.report(
        "input_pipeline", "Input pipeline (`benchmarks/input_pipeline.py`)",
        f"{FLAGS.images} real photographs cut to 500x375 JPEG (mean {mean_kb:.0f} KB), 8 "
        f"TFRecord shards, batches of {BATCH} at 224x224, one process using all "
        f"{threads} cores; {FLAGS.rounds} rounds x {FLAGS.batches} batches, each pipeline "
        "alone in turn (a fresh iterator per round, warmed up on 6 batches).",
        rows,
        f"lars_tf's pipeline runs at {ours / mg:.2f}x Model Garden's preprocessing and at "
        f"{ours / bound:.0%} of the decode-bound limit (decoding whole images).",
        FLAGS.write)

if __name__ == "__main__":
    app.run(main)
