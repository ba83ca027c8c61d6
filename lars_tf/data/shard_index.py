"""The index ``lars-convert`` writes next to each shard: proof that every record in it was
validated once, at conversion, so that training need not check each record every epoch.

``train-00000-of-00008`` gets ``train-00000-of-00008.index.json``::

    {"format": "lars_tf.shard_index/1", "records": 160, "bytes": 7340032,
     "sha256": "...", "label_min": 0, "label_max": 2,
     "validated": "every image decoded by lars-convert"}

A shard is *trusted* when its index exists, is of this format and records the shard's
current size in bytes (a stat; nothing is read). Then training takes its record count and
label range from the index (no pass over the data before training) and skips the per-record
JPEG structure check. ``sha256`` covers the whole shard for ``lars-convert --verify``
(after a copy to a cluster's disks), which reads every byte once. A shard without a
matching index (other ImageNet TFRecords, an interrupted conversion, a shard rewritten
since) gets the full checks.

The index is written after its shard is complete, to a temporary name renamed into place,
and an older index is removed before its shard is replaced: an index never describes a
shard other than the one beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

FORMAT = "lars_tf.shard_index/1"
SUFFIX = ".index.json"


@dataclass(frozen=True)
class ShardIndex:
    records: int
    bytes: int
    sha256: str
    label_min: int
    label_max: int
    validated: str = "every image decoded by lars-convert"
    format: str = FORMAT


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


def write(shard: str, records: int, labels: list[int]) -> ShardIndex:
    """Index the complete file ``shard`` (``records`` validated records with ``labels``)."""
    index = ShardIndex(records=records, bytes=os.path.getsize(shard),
                       sha256=sha256_of(shard),
                       label_min=min(labels, default=0), label_max=max(labels, default=-1))
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
        index = ShardIndex(**raw)
    except (OSError, ValueError, TypeError) as e:
        return None, f"unreadable index {path} ({e})"
    if index.format != FORMAT:
        return None, f"index {path} is of format {index.format!r}, not {FORMAT!r}"
    size = os.path.getsize(shard)
    if size != index.bytes:
        return None, (f"its index records {index.bytes} bytes, the file has {size} (changed "
                      "since lars-convert wrote it)")
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
