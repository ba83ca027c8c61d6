"""Training input pipeline throughput, side by side in one process, on two image sets:
ImageNet-like photos (500x375) and large photos (3000x4000, 12 megapixels).

    python -m benchmarks.input_pipeline [--images 384] [--copies 4] [--large_images 12]
        [--rounds 5] [--nowrite]

The images are real photographs (scikit-image's bundled ones): cut and resized to 500x375
at random, or upscaled whole to 3000x4000, JPEG-encoded (quality 90) and converted by
``lars-convert``'s code (so the shards are validated and indexed). Each image is stored
``--copies`` times so that a shard holds as many records as ImageNet's (1,251 per shard of
1,024) more nearly: a tf.data pipeline pays a per-file and per-epoch set-up that tiny
shards would exaggerate. All pipelines get the same tf.data options (a private thread pool
of all cores, autotune) and the same batch size; they differ in what each record goes
through:

- lars_tf: ``lars_tf.data.build`` for ``--dataset=imagenet`` as training uses it
  (byte-accounted reading that names damaged shards, per-epoch file order and sharding,
  shuffle, per-record seeds, the random-resized crop decoded from the JPEG with DCT scaling,
  flip, normalise, label check per batch) with a shuffle buffer of 1,024 records, float32
  out; the same without the record shuffle (``--shuffle_buffer=1``: what the shuffle
  costs); with ``--normalize_on_device`` (uint8 out, normalised in the model); and with
  tf.data's autotune off (parallelism pinned to the cores instead of tuned); and as an
  ``--elastic`` job reads it (each global batch's records read by position from an order
  of all records, ``lars_tf.data.record_table``, instead of whole shards in turn);
- Model Garden: ``official.legacy.image_classification.preprocessing.preprocess_for_train``
  (fused decode-crop, flip, resize, mean and std normalisation) on a bare interleaved
  reader: no shuffle, no sharding, no checks;
- full decode: the same bare reader and ``tf.io.decode_jpeg`` of the whole image, nothing
  else (what decoding every pixel costs).

Reported per set: images/sec (median over rounds, each pipeline timed alone in turn with
a fresh iterator), CPU time per image (process CPU time / images: all threads), the
profiler's breakdown of lars_tf's host time by op, the bytes a batch carries to the
accelerator, and the process' peak memory.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import shutil
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

flags.DEFINE_integer("images", 384, "Distinct ImageNet-like JPEGs (500x375).")
flags.DEFINE_integer("large_images", 12, "Distinct large JPEGs (3000x4000).")
flags.DEFINE_integer("copies", 4, "Records per image (see the module's docstring).")
flags.DEFINE_integer("rounds", 5, "Timed rounds per pipeline.")
flags.DEFINE_bool("write", True, "Write the table to benchmarks/RESULTS.md.")
FLAGS = flags.FLAGS
SIZE = 224
# (name, batch size, batches timed per round, batches of warm-up)
SETS = {"imagenet_like": (64, 24, 4), "large": (16, 4, 1)}


def make_images(folder: str, n: int, copies: int = 1) -> None:
    """``n`` 500x375 JPEGs cut at random from the real photographs, each written
    ``copies`` times, in ``folder/all``."""
    photos = _photos()
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
        _write(folder, i, tf.io.encode_jpeg(tf.cast(img, tf.uint8), quality=90).numpy(),
               copies)


def make_large_images(folder: str, n: int, copies: int = 1) -> None:
    """``n`` 3000x4000 JPEGs: the real photographs upscaled whole (alternately mirrored)."""
    photos = _photos()
    os.makedirs(os.path.join(folder, "all"), exist_ok=True)
    for i in range(n):
        img = tf.image.resize(photos[i % len(photos)], [3000, 4000])
        if (i // len(photos)) % 2:
            img = img[:, ::-1]
        big = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
        _write(folder, i, tf.io.encode_jpeg(big, quality=90).numpy(), copies)


def _photos() -> list[tf.Tensor]:
    """The real photographs the tests use, decoded to RGB."""
    return [tf.io.decode_image(open(path, "rb").read(), channels=3, expand_animations=False)
            for path in testing.photos().values()]


def _write(folder: str, i: int, jpeg: bytes, copies: int) -> None:
    for c in range(copies):
        with open(os.path.join(folder, "all", f"img{i:05d}_{c}.jpg"), "wb") as f:
            f.write(jpeg)


def model_garden_preprocess():
    testing.model_garden_file()  # stops with how to install it when it is missing
    from official.legacy.image_classification import preprocessing

    return preprocessing.preprocess_for_train


def pipelines(shards: str, batch: int, threads: int) -> dict[str, tf.data.Dataset]:
    files = imagenet.split_files(shards, "train")
    opts = data_lib.options(threads, deterministic=False)

    def bare(fn):
        return (tf.data.Dataset.from_tensor_slices(files)
                .interleave(lambda p: tf.data.TFRecordDataset(p, buffer_size=1 << 20),
                            cycle_length=len(files), num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=False)
                .repeat().map(lambda r: fn(imagenet.parse(r)[0]),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
                .batch(batch).prefetch(tf.data.AUTOTUNE).with_options(opts))

    preprocess_for_train = model_garden_preprocess()
    # parallelism pinned instead of tuned: with autotune off, tf.data runs each AUTOTUNE
    # map and interleave on as many threads as the pipeline's pool has (its cores)
    pinned = tf.data.Options()
    pinned.autotune.enabled = False
    config = TrainConfig(dataset="imagenet", data_dir=shards, num_classes=1,
                         global_batch_size=batch, shuffle_buffer=1024, image_size=SIZE)
    ours = data_lib.build(config, 0, 1, threads=threads).train
    return {
        "lars_tf": ours,
        "lars_tf --shuffle_buffer=1": data_lib.build(
            config.replace(shuffle_buffer=1), 0, 1, threads=threads).train,
        "lars_tf --normalize_on_device": data_lib.build(
            config.replace(normalize_on_device=True), 0, 1, threads=threads).train,
        "lars_tf, autotune off": ours.with_options(pinned),
        "lars_tf --elastic (records by position)": data_lib.build_elastic(
            config.replace(elastic=True), 0, 1, 0, 0, threads=threads).train,
        "Model Garden preprocess_for_train": bare(
            lambda b: preprocess_for_train(b, SIZE, mean_subtract=True, standardize=True)),
        "full decode (tf.io.decode_jpeg)": bare(lambda b: tf.io.decode_jpeg(b, channels=3)),
    }


def measure(datasets: dict, batches: int, warmup: int, rounds: int) -> dict:
    """{name: [(images/sec, CPU ms/image), ...]} over ``rounds``, each pipeline alone in
    turn (a live iterator keeps prefetching in the background, so each round starts a
    fresh one, warms it up, times it and shuts it down), the order rotated per round."""
    out = {name: [] for name in datasets}
    names = list(datasets)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            it = iter(datasets[name])
            for _ in range(warmup):
                batch = next(it)
            images = batch[0] if isinstance(batch, tuple) else batch
            n = int(images.shape[0]) * batches
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(batches):
                next(it)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            out[name].append((n / wall, cpu / n * 1e3))
            del it
            gc.collect()
    return out


def op_profile(dataset: tf.data.Dataset, batches: int, top: int = 5) -> list[tuple[str, float]]:
    """[(op type, share of the ops' host self time)] of ``batches`` batches, from
    TensorFlow's profiler (its framework op stats); [] where this TensorFlow lacks them."""
    try:
        from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin
    except ImportError:
        return []
    logdir = tempfile.mkdtemp(prefix="lars_tf_profile_")
    it = iter(dataset)
    next(it)
    tf.profiler.experimental.start(logdir)
    for _ in range(batches):
        next(it)
    tf.profiler.experimental.stop()
    del it
    raw, ok = plugin.xspace_to_tools_data(
        glob.glob(os.path.join(logdir, "plugins/profile/*/*.xplane.pb")),
        "framework_op_stats", {})
    shutil.rmtree(logdir, ignore_errors=True)
    if not ok:
        return []
    table = json.loads(raw)
    table = table[0] if isinstance(table, list) else table
    cols = [c["id"] for c in table["cols"]]
    by_type: dict[str, float] = {}
    for row in table["rows"]:
        v = dict(zip(cols, (c.get("v") for c in row["c"])))
        if v["type"] in ("IDLE", "Dataset"):  # idle time and iterators' waiting
            continue
        by_type[v["type"]] = by_type.get(v["type"], 0.0) + float(v["total_self_time"])
    total = sum(by_type.values()) or 1.0
    ranked = sorted(by_type.items(), key=lambda kv: -kv[1])
    return [(t, s / total) for t, s in ranked[:top]]


def main(argv):
    del argv
    work = tempfile.mkdtemp(prefix="lars_tf_bench_")
    threads = len(os.sched_getaffinity(0))
    makers = {"imagenet_like": (make_images, FLAGS.images),
              "large": (make_large_images, FLAGS.large_images)}
    rows = ["| image set | pipeline | images/sec (median) | CPU ms per image | vs Model Garden "
            "| vs full decode | bytes per batch |", "|---|---|---|---|---|---|---|"]
    notes, summary = [], {}
    for set_name, (batch, batches, warmup) in SETS.items():
        make, n = makers[set_name]
        images, shards = os.path.join(work, set_name), os.path.join(work, set_name + "_tf")
        make(images, n, FLAGS.copies)
        convert.convert(images, shards, "train", num_shards=8)
        convert.convert(images, shards, "validation", num_shards=1)
        files = imagenet.split_files(shards, "train")
        kb = sum(os.path.getsize(f) for f in files) / (n * FLAGS.copies) / 1024
        datasets = pipelines(shards, batch, threads)
        rates = measure(datasets, batches, warmup, FLAGS.rounds)
        med = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
               for k, v in rates.items()}
        mg, full = med["Model Garden preprocess_for_train"][0], \
            med["full decode (tf.io.decode_jpeg)"][0]
        for name, (rate, cpu) in med.items():
            spec = datasets[name].element_spec
            spec = spec[0] if isinstance(spec, tuple) else spec
            nbytes = (f"{batch * int(np.prod(spec.shape[1:])) * spec.dtype.size / 2**20:.1f} MiB"
                      if spec.shape[1:].is_fully_defined() else "varies")
            rows.append(f"| {set_name} ({kb:.0f} KB/JPEG) | {name} | {rate:.0f} | {cpu:.2f} | "
                        f"{rate / mg:.2f}x | {rate / full:.2f}x | {nbytes} |")
            print(f"{set_name:14s} {name:36s} {rate:7.1f} img/s  {cpu:6.2f} CPU ms/img  "
                  f"{rate / mg:.2f}x MG  {rate / full:.2f}x full decode", flush=True)
        profile = op_profile(datasets["lars_tf"], batches)
        if profile:
            notes.append(f"{set_name}: lars_tf's host op time by op: " + ", ".join(
                f"{t} {s:.0%}" for t, s in profile) + ".")
            print(notes[-1], flush=True)
        summary[set_name] = (med["lars_tf"][0] / mg, med["lars_tf"][0] / full,
                             med["lars_tf --elastic (records by position)"][0]
                             / med["lars_tf"][0])
        del datasets
        gc.collect()
    shutil.rmtree(work, ignore_errors=True)
    common.report(
        "input_pipeline", "Input pipeline (`benchmarks/input_pipeline.py`)",
        f"{FLAGS.images} ImageNet-like 500x375 JPEGs and {FLAGS.large_images} 3000x4000 ones "
        f"(real photographs, each stored {FLAGS.copies} times), 8 TFRecord shards each, "
        f"{SIZE}x{SIZE} output; batches of {SETS['imagenet_like'][0]} (ImageNet-like) and "
        f"{SETS['large'][0]} (large); one process using all {threads} cores; "
        f"{FLAGS.rounds} rounds, each pipeline alone in turn (a fresh iterator per round, "
        "warmed up first).",
        rows,
        " ".join(notes + [
            f"lars_tf runs at {summary['imagenet_like'][0]:.2f}x Model Garden and "
            f"{summary['imagenet_like'][1]:.2f}x the full decode on ImageNet-like photos, at "
            f"{summary['large'][0]:.2f}x and {summary['large'][1]:.2f}x on large ones. "
            f"Read by position (--elastic), it runs at {summary['imagenet_like'][2]:.2f}x "
            f"and {summary['large'][2]:.2f}x lars_tf's sequential reader."]),
        FLAGS.write)


if __name__ == "__main__":
    app.run(main)
