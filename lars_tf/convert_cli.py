"""``lars-convert``: an image folder (one subfolder per class) -> ImageNet-style TFRecords."""

from __future__ import annotations

import sys

from absl import app, flags, logging

flags.DEFINE_string("input_dir", None, "Folder with one subfolder of images per class.")
flags.DEFINE_string("output_dir", None, "Where the shards, labels.txt and the report go.")
flags.DEFINE_enum("split", "train", ["train", "validation"], "Which split the shards are.")
flags.DEFINE_integer("num_shards", 8, "Shard files to write.")
flags.DEFINE_integer("workers", 0, "Worker processes (0: one per core).")
flags.DEFINE_integer("seed", 0, "Seed of the shuffle that spreads classes over shards.")
flags.DEFINE_bool("overwrite", False,
                  "Replace the --split shards already in --output_dir, as one set (without "
                  "it, a folder that holds some is refused: training would read both).")
flags.DEFINE_bool("verify", False,
                  "Convert nothing: check every shard in --output_dir against the index "
                  "lars-convert wrote beside it (size, sha256, record count and label range, "
                  "reading every byte), e.g. after copying shards to a cluster; also name "
                  "missing shards of a set, two sets of a split, shards of another class "
                  "list and indexes without their shard. Exit status 1 names each problem.")
FLAGS = flags.FLAGS


def _bar(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} shards")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.verify:
        _verify()
        return
    for name in ("input_dir", "output_dir"):
        if not getattr(FLAGS, name):
            logging.error("--%s is required", name)
            sys.exit(2)
    from lars_tf.data.convert import convert

    try:
        report = convert(FLAGS.input_dir, FLAGS.output_dir, FLAGS.split, FLAGS.num_shards,
                         FLAGS.workers or None, FLAGS.seed, progress=_bar,
                         overwrite=FLAGS.overwrite)
    except (ValueError, FileNotFoundError) as e:
        logging.error("%s", e)
        sys.exit(2)
    logging.info("%d images in %d classes -> %d shards in %s (%d re-encoded as JPEG)",
                 report.written, len(report.classes), len(report.shards), FLAGS.output_dir,
                 len(report.reencoded))
    for bad in report.skipped:
        logging.warning("skipped unreadable image %s: %s", bad["file"], bad["error"])
    if report.skipped:
        logging.warning("%d unreadable images skipped; listed in %s/report-%s.json",
                        len(report.skipped), FLAGS.output_dir, FLAGS.split)
    if report.stale_validation:
        logging.warning("the %d validation shards in %s were converted with another class "
                        "list than this train split's: training refuses them until you "
                        "convert the validation split again (--split=validation --overwrite)",
                        len(report.stale_validation), FLAGS.output_dir)


def _verify():
    if not FLAGS.output_dir:
        logging.error("--verify needs --output_dir (the folder of shards to check)")
        sys.exit(2)
    from lars_tf.data.convert import verify

    try:
        problems = verify(FLAGS.output_dir)
    except FileNotFoundError as e:
        logging.error("%s", e)
        sys.exit(2)
    for shard, why in problems:
        logging.error("%s: %s", shard, why)
    if problems:
        logging.error("%d problems: convert the shards again, or copy them again from the "
                      "originals", len(problems))
        sys.exit(1)
    logging.info("every shard in %s matches its index", FLAGS.output_dir)


def main():
    app.run(_main)
