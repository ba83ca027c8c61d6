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

import glob
import json
import multiprocessing
import os
import random
import re
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
    stale_validation: list[str] = field(default_factory=list)  # of another class list


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
    shard_index.write(path, done["written"], labels, classes)
    return done


_SHARD_NAME = re.compile(r"^(train|validation)-(\d{5})-of-(\d{5})$")


def existing_shards(output_dir: str, split: str) -> list[str]:
    """The shard files of ``split`` already in ``output_dir`` (any shard count)."""
    return sorted(f for f in glob.glob(os.path.join(output_dir, f"{split}-*-of-*"))
                  if _SHARD_NAME.match(os.path.basename(f)))


def convert(input_dir: str, output_dir: str, split: str = "train", num_shards: int = 8,
            workers: int | None = None, seed: int = 0,
            progress: Callable[[int, int], None] | None = None,
            overwrite: bool = False) -> Report:
    """Write ``output_dir/{split}-NNNNN-of-MMMMM`` shards and ``report-{split}.json``, and
    for the train split ``labels.txt`` (the validation split reads it: convert train
    first); ``progress(done_shards, num_shards)`` is called as shards end.

    A folder that holds shards of ``split`` already (an earlier conversion, of any shard
    count) is refused, as training would read both sets; ``overwrite`` replaces them as
    one set (the old shards not overwritten by name are removed once the new set is
    complete). A train conversion whose class list differs from the validation shards'
    in the folder is done, and ``Report.stale_validation`` names them: training refuses
    them until the validation split is converted again."""
    if split not in ("train", "validation"):
        raise ValueError(f"--split={split!r}: must be train or validation")
    if num_shards < 1:
        raise ValueError(f"--num_shards={num_shards}: must be >= 1")
    classes, items = list_images(
        input_dir, read_labels(output_dir) if split == "validation" else None)
    old = existing_shards(output_dir, split) if os.path.isdir(output_dir) else []
    if old and not overwrite:
        raise ValueError(
            f"--output_dir={output_dir!r} holds {len(old)} {split} shards already (e.g. "
            f"{os.path.basename(old[0])}): training would read both sets. Pass --overwrite "
            "to replace them, or choose another --output_dir")
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
    from lars_tf.data import shard_index

    for f in set(old) - set(report.shards):  # the replaced set's other shards
        shard_index.remove(f)
        os.remove(f)
    if split == "train":
        digest = shard_index.classes_digest(classes)
        for f in existing_shards(output_dir, "validation"):
            index, _ = shard_index.read(f)
            if index is not None and index.classes_sha256 != digest:
                report.stale_validation.append(f)
        tmp = os.path.join(output_dir, LABELS_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write("\n".join(classes) + "\n")
        os.replace(tmp, os.path.join(output_dir, LABELS_FILE))
    with open(os.path.join(output_dir, f"report-{split}.json"), "w") as f:
        json.dump(report.__dict__, f, indent=1)
    return report


def verify(output_dir: str) -> list[tuple[str, str]]:
    """Check the shards in ``output_dir`` against their indexes, reading every byte once
    (e.g. after copying the shards to a cluster's disks): ``[(file, problem)]``, empty when
    all match. Problems: a shard without an index, or whose size, sha256, record count or
    label range is not its index's; a shard of a set (``-of-M``) that is missing; two sets
    of one split; an index whose shard is gone; shards of another class list than the
    others."""
    import tensorflow as tf

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
    problems = []
    digests = {}
    for f in files:
        why = shard_index.verify(f)
        if why:
            problems.append((f, why))
            continue
        index, _ = shard_index.read(f)
        labels = [int(tf.train.Example.FromString(r.numpy()).features
                      .feature["image/class/label"].int64_list.value[0])
                  for r in tf.data.TFRecordDataset(f)]
        if len(labels) != index.records:
            problems.append((f, f"holds {len(labels)} records, its index says "
                                f"{index.records}"))
        elif labels and (min(labels), max(labels)) != (index.label_min, index.label_max):
            problems.append((f, f"its labels run from {min(labels)} to {max(labels)}, its "
                                f"index says {index.label_min} to {index.label_max}"))
        digests.setdefault(index.classes_sha256, f)
    if len(digests) > 1:
        a, b = list(digests.values())[:2]
        problems.append((b, f"converted with another class list than {a}"))
    for split in ("train", "validation"):
        sets: dict[int, set[int]] = {}
        for f in existing_shards(output_dir, split):
            m = _SHARD_NAME.match(os.path.basename(f))
            sets.setdefault(int(m.group(3)), set()).add(int(m.group(2)))
        if len(sets) > 1:
            names = ", ".join(f"-of-{m:05d}" for m in sorted(sets))
            problems.append((os.path.join(output_dir, f"{split}-*"),
                             f"two or more shard sets of {split} ({names}): training reads "
                             "them all"))
        for total, have in sets.items():
            problems += [(os.path.join(output_dir, f"{split}-{i:05d}-of-{total:05d}"),
                          "missing (its set has the others)")
                         for i in range(total) if i not in have]
    for path in sorted(glob.glob(os.path.join(output_dir, "*" + shard_index.SUFFIX))):
        if not os.path.exists(path[:-len(shard_index.SUFFIX)]):
            problems.append((path, "an index whose shard is gone"))
    return problems
