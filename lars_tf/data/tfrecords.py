"""The generic reader of TFRecord shards: records read in parallel, a few MB at a time,
each file's byte count checked (a truncated or damaged shard is named, counted and read up
to the damage, or fatal), and which records of which files each rank reads
(``file_assignment``). Any TFRecord format; ``imagenet`` builds on it."""

from __future__ import annotations

import os
import sys

import tensorflow as tf

from lars_tf.data import pipeline


def count_records(files: list[str], strict: bool = False) -> int:
    """Records in ``files`` (reads them, decodes nothing), counted file by file in parallel.

    A file whose records end before its last byte (truncated, or a record whose CRC fails:
    bit rot, an interrupted copy) counts the records before the damage and is named on
    stderr with the byte offset of the damage; with ``strict`` (``--strict_data``) it is a
    ``DataLossError`` naming the file and offset."""
    def per_file(path):
        n_bytes = tf.data.TFRecordDataset(path, buffer_size=1 << 20).apply(
            tf.data.experimental.ignore_errors()).reduce(
            (tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
            lambda acc, r: (acc[0] + 1, acc[1] + tf.cast(tf.strings.length(r), tf.int64) + 16))
        return path, n_bytes[0], n_bytes[1]

    total = 0
    if not files:
        return 0
    counts = tf.data.Dataset.from_tensor_slices(list(files)).map(
        per_file, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for path, n, read in counts.as_numpy_iterator():
        path = path.decode()
        total += int(n)
        if read != os.path.getsize(path):
            message = (f"{path}: damaged or truncated TFRecord file, readable up to byte "
                       f"offset {read} of {os.path.getsize(path)} ({n} records before it)")
            if strict:
                raise tf.errors.DataLossError(None, None, message + " (--strict_data)")
            print(f"lars_tf: {message}; counting and reading only those",
                  file=sys.stderr, flush=True)
    return total

def size_table(files: list[str]) -> tf.lookup.StaticHashTable:
    """File path -> size in bytes, for ``records`` to tell a complete file from a cut one."""
    return path_table(files, [os.path.getsize(f) for f in files])


def path_table(files: list[str], values: list[int]) -> tf.lookup.StaticHashTable:
    """File path -> an int64 per file (-1 for a path not in ``files``)."""
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(list(files), tf.string),
                                            tf.constant(list(values), tf.int64)),
        default_value=-1)

def read_block(record_bytes: float, target: int = 4 << 20, most: int = 64) -> int:
    """Records that ``records`` reads of a file at a time: about ``target`` bytes of records
    of ``record_bytes`` (1 to ``most``), so that the open files hold a few MB each."""
    return int(max(1, min(most, target // max(1.0, record_bytes))))

def file_assignment(num_files: int, rank: int, size: int) -> list[tuple[int, int, int]]:
    """What rank ``rank`` of ``size`` reads of an epoch's list of ``num_files`` files: a list
    of ``(position, stride, offset)``, meaning the records ``i`` of the file at ``position``
    with ``i % stride == offset``. Over all ranks every record of every file is read by
    exactly one rank, whatever the two numbers are.

    The first ``num_files // size * size`` files go whole, one rank each (file-level
    sharding: every byte read once). The ``L = num_files % size`` files left over are split
    by record: when ``size`` is a multiple of ``L`` each is read by ``size / L`` ranks,
    each keeping every ``size / L``-th record (the papers' 2048 workers on 1024 ImageNet
    shards read 2 ranks per file); otherwise every rank reads all ``L`` and keeps every
    ``size``-th record of each, which costs each rank up to ``L`` extra file reads (make
    the file count a multiple or a divisor of the ranks to avoid it)."""
    whole = num_files // size * size
    out = [(p, 1, 0) for p in range(rank, whole, size)]
    left = num_files - whole
    if left and size % left == 0:
        out.append((whole + rank % left, size // left, rank // left))
    elif left:
        # file j keeps the records i = rank - j (mod size): the remainders spread over ranks
        out += [(whole + j, size, (rank - j) % size) for j in range(left)]
    return out


def records(files, deterministic: bool, cycle_length: int = 16, strict: bool = False,
            skipped: tf.Variable | None = None,
            sizes: tf.lookup.StaticHashTable | None = None,
            strides=None, offsets=None, block: int = 64,
            counts: tf.lookup.StaticHashTable | None = None) -> tf.data.Dataset:
    """``(serialized, file, index_in_file)`` from ``files``, interleaved in parallel; of
    file ``k`` only the records ``i`` with ``i % strides[k] == offsets[k]`` (all of them by
    default; see ``file_assignment``). Each file is read ``block`` records at a time
    (``read_block``: a few MB in flight per file).

    A truncated shard, or one with a damaged record (its CRC fails), ends that file at the
    damage instead of ending the run: the bytes read (each record plus its 16 framing bytes)
    are compared with the file's size, and a shortfall is reported on stderr naming the
    file and the byte offset of the damage, and counted in ``skipped`` (one per file). With
    ``strict`` it is an ``InvalidArgumentError`` naming the file and offset.

    ``counts`` (a ``path_table``): the records a file's lars-convert index promises. A
    whole file that holds another number ends the run with an ``InvalidArgumentError``
    naming it (the index does not describe the file; the epoch's steps were counted from
    it).

    ``files``: a list of paths, or a tensor of them (then give ``sizes``, a ``size_table``
    made outside any tf.data function)."""
    if isinstance(files, (list, tuple)):
        if sizes is None:
            sizes = size_table(files)
        files = tf.constant(list(files))
    elif sizes is None:
        raise ValueError("records(): a tensor of paths needs sizes=size_table(...)")
    n = tf.shape(files, out_type=tf.int64)[0]
    strides = tf.ones([n], tf.int64) if strides is None else tf.cast(strides, tf.int64)
    offsets = tf.zeros([n], tf.int64) if offsets is None else tf.cast(offsets, tf.int64)

    def read(path, stride, offset):
        expected = sizes.lookup(path)
        # the readable records in blocks (each tf.data function costs tens of microseconds
        # per call: one per block, not per record), then the end of the file: an empty block
        ds = (tf.data.TFRecordDataset(path, buffer_size=1 << 20).ignore_errors()
              .batch(block)
              .concatenate(tf.data.Dataset.from_tensors(tf.zeros([0], tf.string))))

        def account(state, chunk):
            """Bytes and records read so far (each record plus its 16 framing bytes); at
            the end of the file, a shortfall is reported (or fatal). Of the block
            ``chunk``, this rank's records (``index % stride == offset``) and indexes."""
            done, count = state
            n = tf.size(chunk, out_type=tf.int64)
            read_to = done + tf.reduce_sum(
                tf.cast(tf.strings.length(chunk), tf.int64) + 16)
            short = tf.logical_and(tf.equal(n, 0), read_to != expected)
            checks = []
            if counts is not None:
                promised = counts.lookup(path)
                miscounted = tf.logical_and(
                    tf.logical_and(tf.equal(n, 0), tf.logical_not(short)),
                    tf.logical_and(promised >= 0, tf.not_equal(count, promised)))
                checks.append(pipeline.fail_unless(
                    tf.logical_not(miscounted), lambda: tf.strings.join([
                        path, ": its lars-convert index promises ",
                        tf.strings.as_string(promised), " records, the file holds ",
                        tf.strings.as_string(count), " (the index does not describe this "
                        "file: run lars-convert --verify, or convert it again)"])))
            if strict:
                ok = pipeline.fail_unless(tf.logical_not(short), lambda: tf.strings.join([
                    "damaged or truncated TFRecord file ", path, " at byte offset ",
                    tf.strings.as_string(read_to), " of ", tf.strings.as_string(expected),
                    " (--strict_data)"]))
            else:
                def say():
                    tf.print("lars_tf: damaged or truncated TFRecord file", path,
                             "at byte offset", read_to, "of", expected,
                             "- read up to the damage, skipped the rest",
                             output_stream=sys.stderr)
                    if skipped is not None:
                        skipped.assign_add(1)
                    return tf.constant(False)

                ok = tf.cond(short, say, lambda: tf.constant(True))
            index = count + tf.range(n)
            with tf.control_dependencies([ok, *checks]):
                index = tf.identity(index)

            def strided():  # copies the records kept: only for a file split by record
                keep = tf.equal(index % stride, offset)
                return tf.boolean_mask(chunk, keep), tf.boolean_mask(index, keep)

            mine, kept = tf.cond(tf.equal(stride, 1), lambda: (chunk, index), strided)
            return (read_to, count + n), (mine, tf.fill(tf.shape(kept), path), kept)

        zero = tf.constant(0, tf.int64)
        return ds.scan((zero, zero), account).unbatch()

    return tf.data.Dataset.from_tensor_slices((files, strides, offsets)).interleave(
        read, cycle_length=min(cycle_length, int(files.shape[0])), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
