"""The index ``lars-convert`` writes next to each shard: proof that every record in it was
validated once, at conversion, so that training need not check each record every epoch.

``train-00000-of-00008`` gets ``train-00000-of-00008.index.json``::

    {"format": "lars_tf.shard_index/2", "records": 160, "bytes": 7340032,
     "sha256": "...", "head_sha256": "...", "tail_sha256": "...",
     "label_min": 0, "label_max": 2, "classes_sha256": "...",
     "validated": "every image decoded by lars-convert"}

A shard is *trusted* when its index exists, is of this format, and records the shard's
current size and the sha256 of its first and last 64 KiB (a stat and two small reads: a
fingerprint that a shard rewritten at the same size fails). Then training takes its record
count and label range from the index (no pass over the data before training) and skips the
per-record JPEG structure check; the reader still counts the records it meets in the file
and stops the run, naming the shard, when they are not the index's count (an index edited
or meant for another shard). ``sha256`` covers the whole shard for ``lars-convert
--verify`` (after a copy to a cluster's disks), which reads every byte once.
``classes_sha256`` is the hash of the class list the labels index (``labels.txt``): train
and validation shards of different class lists are refused together. A shard without a
matching index (other ImageNet TFRecords, an interrupted conversion, a shard rewritten
since, an index of an older format) gets the full checks.

The index is written after its shard is complete, to a temporary name renamed into place,
and an older index is removed before its shard is replaced: an index never describes a
shard other than the one beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

FORMAT = "lars_tf.shard_index/2"
SUFFIX = ".index.json"
END_BLOCK = 1 << 16  # the fingerprint: sha256 of the first and of the last 64 KiB


@dataclass(frozen=True)
class ShardIndex:
    records: int
    bytes: int
    sha256: str
    head_sha256: str
    tail_sha256: str
    label_min: int
    label_max: int
    classes_sha256: str
    validated: str = "every image decoded by lars-convert"
    format: str = FORMAT


def classes_digest(classes: list[str]) -> str:
    """The hash of a class list (label order), as indexes record it."""
    return hashlib.sha256("\n".join(classes).encode()).hexdigest()


def fingerprint(path: str) -> tuple[str, str]:
    """sha256 of the first and of the last ``END_BLOCK`` bytes of ``path``."""
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(END_BLOCK)).hexdigest()
        f.seek(max(0, os.fstat(f.fileno()).st_size - END_BLOCK))
        tail = hashlib.sha256(f.read(END_BLOCK)).hexdigest()
    return head, tail


def path_of(shard: str) -> str:
    return shard + SUFFIX


def sha256_of(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove(shard: str) -> None:
    """Drop ``shard``'s index (before the shard is replaced)."""
    try:
        os.remove(path_of(shard))
    except FileNotFoundError:
        pass


def write(shard: str, records: int, labels: list[int], classes: list[str]) -> ShardIndex:
    """Index the complete file ``shard`` (``records`` validated records with ``labels``,
    which index ``classes``)."""
    head, tail = fingerprint(shard)
    index = ShardIndex(records=records, bytes=os.path.getsize(shard),
                       sha256=sha256_of(shard), head_sha256=head, tail_sha256=tail,
                       label_min=min(labels, default=0), label_max=max(labels, default=-1),
                       classes_sha256=classes_digest(classes))
    tmp = path_of(shard) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(index), f, indent=1)
    os.replace(tmp, path_of(shard))
    return index


def read(shard: str) -> tuple[ShardIndex | None, str]:
    """``(index, "")`` when ``shard`` is trusted, else ``(None, why not)``."""
    path = path_of(shard)
    if not os.path.exists(path):
        return None, "no index (not written by lars-convert)"
    try:
        with open(path) as f:
            raw = json.load(f)
        if raw.get("format") != FORMAT:
            return None, (f"index {path} is of format {raw.get('format')!r}, not {FORMAT!r} "
                          "(convert again to index it)")
        index = ShardIndex(**raw)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return None, f"unreadable index {path} ({e})"
    size = os.path.getsize(shard)
    if size != index.bytes:
        return None, (f"its index records {index.bytes} bytes, the file has {size} (changed "
                      "since lars-convert wrote it)")
    if fingerprint(shard) != (index.head_sha256, index.tail_sha256):
        return None, ("its first or last 64 KiB differ from what its index records (the "
                      "file was rewritten since lars-convert wrote it)")
    return index, ""


def verify(shard: str) -> str:
    """Read ``shard`` whole: ``""`` when its size and sha256 match its index, else what
    does not."""
    index, why = read(shard)
    if index is None:
        return why
    digest = sha256_of(shard)
    if digest != index.sha256:
        return f"sha256 {digest} differs from its index's {index.sha256} (damaged since written)"
    return ""
