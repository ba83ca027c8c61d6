"""Records of TFRecord shards read by position, for ``--elastic``: every record of a split
gets a number ``0..N-1`` (shard by shard, in the shards' sorted order), and a batch of
numbers is read with one positional read (``os.pread``) per record.

A TFRecord file is a sequence of ``length (8 bytes, little-endian) | CRC of the length (4)
| data (length) | CRC of the data (4)``. ``RecordTable`` walks the length fields once per
process (one 8-byte read per record: 200,000 records in 0.22 s here, so about 1.4 s for
ImageNet's 1.28 million in the page cache), so a shard is never read from its start to
reach a record. That is what lets an elastic job cut any global batch of one epoch-wide
order over any number of ranks (``lars_tf.data.elastic``), where the sequential reader of
``tfrecords.records`` gives each rank whole files.

The walk stops with an error naming the shard and byte offset when a length runs past the
end of the file, and when the records found are not the count its lars-convert index
promises; the records' CRCs are not checked here (an elastic job reads only shards that
lars-convert validated and indexed, and whose fingerprint still matches).
"""

from __future__ import annotations

import functools
import os
import struct
import threading

import numpy as np
import tensorflow as tf

_HEADER = 12  # length + its CRC
_FOOTER = 4  # the data's CRC


@functools.lru_cache(maxsize=4096)
def record_offsets(path: str, size: int, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, lengths)`` of the data of every record of ``path`` (``size`` and
    ``mtime_ns``: the file's, so that a rewritten file is walked again)."""
    offsets, lengths = [], []
    with open(path, "rb", buffering=0) as f:
        fd, at = f.fileno(), 0
        while at < size:
            header = os.pread(fd, 8, at)
            if len(header) < 8:
                raise ValueError(f"{path}: a record header is cut at byte offset {at} of "
                                 f"{size} (the shard is truncated)")
            (length,) = struct.unpack("<Q", header)
            end = at + _HEADER + length + _FOOTER
            if end > size:
                raise ValueError(f"{path}: the record at byte offset {at} claims {length} "
                                 f"bytes, past the end of the file ({size} bytes): the shard "
                                 "is damaged or truncated")
            offsets.append(at + _HEADER)
            lengths.append(length)
            at = end
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


class RecordTable:
    """Every record of ``files``, numbered ``0..N-1`` in file order. ``promised``: each
    file's record count as its index records it (checked against the walk)."""

    def __init__(self, files: list[str], promised: list[int] | None = None):
        self.files = list(files)
        offsets, lengths, counts = [], [], []
        for k, path in enumerate(self.files):
            st = os.stat(path)
            o, n = record_offsets(path, st.st_size, st.st_mtime_ns)
            if promised is not None and len(o) != promised[k]:
                raise ValueError(f"{path}: its lars-convert index promises {promised[k]} "
                                 f"records, the file holds {len(o)} (run lars-convert "
                                 "--verify, or convert it again)")
            offsets.append(o)
            lengths.append(n)
            counts.append(len(o))
        self.offsets = np.concatenate(offsets) if offsets else np.zeros([0], np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros([0], np.int64)
        self.file_of = np.repeat(np.arange(len(self.files), dtype=np.int64), counts)
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._fds: dict[int, int] = {}
        self._opening = threading.Lock()  # the parallel map's threads read at once
        # made once, captured by every tf.data function that reads through this table
        self._tensors = (tf.constant(self.file_of), tf.constant(self.first),
                         tf.constant(self.files or [""]))

    def __len__(self) -> int:
        return len(self.offsets)

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:  # opened once per process and kept: resets build the pipeline again
            with self._opening:
                fd = self._fds.get(k)
                if fd is None:
                    fd = self._fds[k] = os.open(self.files[k], os.O_RDONLY)
        return fd

    def read(self, numbers: np.ndarray) -> np.ndarray:
        """The serialized records ``numbers`` (an object array of bytes)."""
        out = np.empty(len(numbers), dtype=object)
        for j, i in enumerate(numbers):
            k = int(self.file_of[i])
            out[j] = os.pread(self._fd(k), int(self.lengths[i]), int(self.offsets[i]))
        return out

    def records(self, numbers: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """In a tf.data function: ``(serialized, path, index_in_file)`` of the records
        ``numbers`` (int64 vector), read in Python (``os.pread`` releases the GIL while it
        waits on the disk)."""
        file_of_t, first_t, files_t = self._tensors
        serialized = tf.py_function(lambda n: self.read(n.numpy()), [numbers], tf.string)
        serialized.set_shape(numbers.shape)
        file_of = tf.gather(file_of_t, numbers)
        return serialized, tf.gather(files_t, file_of), numbers - tf.gather(first_t, file_of)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
