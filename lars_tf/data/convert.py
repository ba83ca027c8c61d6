"""Image folder (one subfolder per class) -> sharded TFRecords in the ImageNet schema.

Classes are the train split's subfolder names in sorted order (label 0, 1, ...), written
to ``labels.txt``; the validation split takes its labels from that file, so a class
missing from the validation folder shifts nothing (a folder that is not a train class is
an error). A JPEG that is whole is
stored as it is; another image format TensorFlow can decode (PNG, GIF, BMP) is re-encoded as
JPEG; a file that cannot be decoded is skipped and listed in the report. Shards are written
in parallel worker processes, each to a temporary name renamed when complete, and each
gets an index beside it (``shard_index``: record count, label range, sha256) that tells
training every image in it was decoded here, so training need not check them again.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
LABELS_FILE = "labels.txt"


@dataclass
class Report:
    split: str
    classes: list[str]
    written: int = 0
    shards: list[str] = field(default_factory=list)
    reencoded: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"file": ..., "error": ...}


def list_images(input_dir: str, classes: list[str] | None = None
                ) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(path, label), ...])`` of an image folder; errors name the folder.

    ``classes``: the label of each class name (from the train split's ``labels.txt``);
    without it, the subfolders in sorted order. A subfolder that is not in ``classes`` is
    an error naming it."""
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"--input_dir={input_dir!r} is not a directory")
    folders = sorted(d for d in os.listdir(input_dir)
                     if os.path.isdir(os.path.join(input_dir, d)))
    if not folders:
        raise ValueError(f"--input_dir={input_dir!r} has no class subfolders")
    if classes is None:
        classes = folders
    label_of = {name: i for i, name in enumerate(classes)}
    unknown = [d for d in folders if d not in label_of]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ValueError(
            f"--input_dir={input_dir!r}: class folder {unknown[0]!r}{more} is not a class of "
            f"the train split ({LABELS_FILE} lists {len(classes)} classes)")
    items = []
    for name in folders:
        folder = os.path.join(input_dir, name)
        for f in sorted(os.listdir(folder)):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                items.append((os.path.join(folder, f), label_of[name]))
    if not items:
        raise ValueError(f"--input_dir={input_dir!r} holds no images ({IMAGE_EXTENSIONS})")
    return list(classes), items


def read_labels(output_dir: str) -> list[str]:
    """The train split's class names, in label order, from ``output_dir/labels.txt``."""
    path = os.path.join(output_dir, LABELS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--output_dir={output_dir!r} has no {LABELS_FILE}: convert the train split "
            "first (--split=train); the validation split takes its labels from it")
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _write_shard(job) -> dict:
    """Worker: one shard file. Imports TensorFlow in the worker process."""
    path, items, classes = job
    import tensorflow as tf

    from lars_tf.data import shard_index
    from lars_tf.data.imagenet import clean_message
    from lars_tf.data.preprocessing import is_valid_jpeg

    def feature(value):
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    done = {"written": 0, "reencoded": [], "skipped": []}
    labels = []
    tmp = path + ".tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
        for file, label in items:
            try:
                with open(file, "rb") as f:
                    raw = f.read()
                image = tf.io.decode_image(raw, channels=3, expand_animations=False)
                if not bool(is_valid_jpeg(tf.constant(raw))):
                    raw = tf.io.encode_jpeg(image, quality=95).numpy()
                    done["reencoded"].append(file)
            except (OSError, tf.errors.OpError) as e:
                msg = clean_message(getattr(e, "message", None) or str(e))
                done["skipped"].append({"file": file, "error": msg.splitlines()[0][:300]})
                continue
            example = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": feature(raw),
                "image/format": feature(b"JPEG"),
                "image/class/label": feature(label),
                "image/class/text": feature(classes[label].encode()),
                "image/filename": feature(os.path.basename(file).encode()),
                "image/height": feature(int(image.shape[0])),
                "image/width": feature(int(image.shape[1])),
            }))
            writer.write(example.SerializeToString())
            done["written"] += 1
            labels.append(label)
    shard_index.remove(path)  # an old index must never describe the new shard
    os.replace(tmp, path)
    shard_index.write(path, done["written"], labels)
    return done


def convert(input_dir: str, output_dir: str, split: str = "train", num_shards: int = 8,
            workers: int | None = None, seed: int = 0,
            progress: Callable[[int, int], None] | None = None) -> Report:
    """Write ``output_dir/{split}-NNNNN-of-MMMMM`` shards and ``report-{split}.json``, and
    for the train split ``labels.txt`` (the validation split reads it: convert train
    first); ``progress(done_shards, num_shards)`` is called as shards end."""
    if split not in ("train", "validation"):
        raise ValueError(f"--split={split!r}: must be train or validation")
    if num_shards < 1:
        raise ValueError(f"--num_shards={num_shards}: must be >= 1")
    classes, items = list_images(
        input_dir, read_labels(output_dir) if split == "validation" else None)
    random.Random(seed).shuffle(items)  # shards mix the classes
    os.makedirs(output_dir, exist_ok=True)
    jobs = [(os.path.join(output_dir, f"{split}-{i:05d}-of-{num_shards:05d}"),
             items[i::num_shards], classes) for i in range(num_shards)]
    report = Report(split=split, classes=classes)
    workers = max(1, min(workers or os.cpu_count() or 1, num_shards))
    ctx = multiprocessing.get_context("spawn")  # TensorFlow is not fork-safe
    with ctx.Pool(workers) as pool:
        for n, (job, done) in enumerate(zip(jobs, pool.imap(_write_shard, jobs)), start=1):
            report.shards.append(job[0])
            report.written += done["written"]
            report.reencoded += done["reencoded"]
            report.skipped += done["skipped"]
            if progress:
                progress(n, num_shards)
    if split == "train":
        tmp = os.path.join(output_dir, LABELS_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write("\n".join(classes) + "\n")
        os.replace(tmp, os.path.join(output_dir, LABELS_FILE))
    with open(os.path.join(output_dir, f"report-{split}.json"), "w") as f:
        json.dump(report.__dict__, f, indent=1)
    return report


def verify(output_dir: str) -> list[tuple[str, str]]:
    """Check every shard in ``output_dir`` against its index (size and sha256; reads every
    byte once, e.g. after copying the shards to a cluster's disks): ``[(shard, problem)]``,
    empty when all match. A shard without an index is a problem too."""
    from lars_tf.data import imagenet, shard_index

    files = []
    for split in ("train", "validation"):
        try:
            files += imagenet.split_files(output_dir, split)
        except FileNotFoundError:
            pass
    if not files:
        raise FileNotFoundError(f"--output_dir={output_dir!r} has no train or validation "
                                "shards to verify")
    return [(f, why) for f in files if (why := shard_index.verify(f))]
