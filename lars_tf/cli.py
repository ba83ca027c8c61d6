"""absl entry points. Flags are read here and nowhere else."""

from __future__ import annotations

import dataclasses
import sys

from absl import app, flags, logging

from lars_tf.config import (
    DATA_DIR_ENV,
    DEFAULT_FASHION_MNIST_DIR,
    OPTIMIZERS,
    PRECISIONS,
    TrainConfig,
    check_model_dir,
)
from lars_tf.presets import PRESETS

_D = TrainConfig()
FLAGS = flags.FLAGS

flags.DEFINE_enum(
    "preset", None, list(PRESETS),
    "Published hyperparameters for a model and global batch (docs/data.md, 'ResNet-50 "
    "on ImageNet'): sets the model, dataset, batch, epochs and every optimizer and schedule "
    "flag; a flag you give wins over the preset.")
flags.DEFINE_string("model", _D.model, "Registered model name (lars_tf.models.names()).")
flags.DEFINE_bool("zero_init_residual", _D.zero_init_residual,
                  "resnet50: start each residual block's last BatchNorm gamma at 0, so that "
                  "every block begins as the identity (the resnet50-* presets do).")
flags.DEFINE_string(
    "dataset", _D.dataset,
    "fashion_mnist (the idx files), imagenet (train-*-of-*/validation-*-of-* TFRecord shards "
    "in --data_dir), tfds:NAME (a tensorflow-datasets JPEG image dataset in --data_dir, "
    "e.g. tfds:imagenet2012), or synthetic (random images, for throughput).")
flags.DEFINE_string(
    "data_dir", None,
    f"Dataset folder. Fashion-MNIST default: ${DATA_DIR_ENV}, else "
    f"{DEFAULT_FASHION_MNIST_DIR}.")
flags.DEFINE_string("manual_dir", None,
                    "tfds: folder of the archives a manual dataset is prepared from "
                    "(imagenet2012: ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar).")
flags.DEFINE_integer("image_size", _D.image_size, "imagenet/synthetic: image side in pixels.")
flags.DEFINE_integer("num_classes", _D.num_classes, "imagenet/synthetic: number of classes.")
flags.DEFINE_integer("label_offset", _D.label_offset,
                     "imagenet: subtracted from stored labels (1 for 1-based files).")
flags.DEFINE_integer("train_examples", _D.train_examples,
                     "imagenet: training examples (0: count the records; 1281167 for "
                     "ImageNet-1k); synthetic: examples per epoch (0: 10 global batches); "
                     "fashion_mnist: train on the first N (0, or 60000 and more: all).")
flags.DEFINE_integer("shuffle_buffer", _D.shuffle_buffer,
                     "imagenet, tfds: shuffle buffer per rank, in records.")
flags.DEFINE_integer("shuffle_buffer_mb", _D.shuffle_buffer_mb,
                     "imagenet: the most the shuffle buffer holds per rank, in MiB (fewer "
                     "records than --shuffle_buffer when the shards' mean record is large).")
flags.DEFINE_bool("cache", _D.cache, "imagenet: keep this rank's parsed records in memory.")
flags.DEFINE_bool("normalize_on_device", _D.normalize_on_device,
                  "imagenet, tfds: the pipeline emits uint8 pixels (4x fewer bytes than "
                  "float32 to the accelerator) and the model's first layer normalises them "
                  "and casts them to the compute dtype.")
flags.DEFINE_bool("strict_data", _D.strict_data,
                  "A corrupt JPEG stops the run (default: skipped, counted and named).")
flags.DEFINE_integer("global_batch_size", _D.global_batch_size,
                     "Examples per weight update, summed over all ranks.")
flags.DEFINE_integer("epochs", _D.epochs, "Training epochs.")
flags.DEFINE_enum("optimizer", _D.optimizer, list(OPTIMIZERS),
                  "lars; sgd: momentum SGD with the same weight decay, no trust ratio; "
                  "nesterov: the same with Nesterov momentum; lamb: Keras 3's LAMB "
                  "(--momentum is its beta_1; decoupled weight decay).")
flags.DEFINE_float("learning_rate", _D.learning_rate,
                   "Peak learning rate for the global batch, reached after warmup.")
flags.DEFINE_float("warmup_epochs", _D.warmup_epochs,
                   "Epochs of linear warmup from --warmup_start_learning_rate.")
flags.DEFINE_float("warmup_start_learning_rate", _D.warmup_start_learning_rate,
                   "Learning rate at the first step of warmup.")
flags.DEFINE_float("poly_power", _D.poly_power, "Power of the polynomial decay after warmup.")
flags.DEFINE_float("end_learning_rate", _D.end_learning_rate, "Learning rate at the end.")
flags.DEFINE_float("momentum", _D.momentum, "Momentum.")
flags.DEFINE_float("weight_decay", _D.weight_decay,
                   "Weight decay inside the update (not on biases and BatchNorm).")
flags.DEFINE_float("trust_coefficient", _D.trust_coefficient, "LARS trust coefficient eta.")
flags.DEFINE_enum("precision", _D.precision, list(PRECISIONS),
                  "fp32, or mixed_float16 (with dynamic loss scaling) / mixed_bfloat16: 16-bit "
                  "compute, float32 master weights.")
flags.DEFINE_bool("fp16_allreduce", _D.fp16_allreduce,
                  "Send gradients as float16 in the all-reduce (Horovod compression).")
flags.DEFINE_integer("backward_passes_per_step", _D.backward_passes_per_step,
                     "Backward passes accumulated per weight update on each rank (reaches a "
                     "large global batch on few workers).")
flags.DEFINE_float("gradient_predivide_factor", _D.gradient_predivide_factor,
                   "Divide gradients by this before the all-reduce sum and by "
                   "ranks/factor after it.")
flags.DEFINE_bool("sparse_as_dense", _D.sparse_as_dense,
                  "All-reduce sparse gradients (Embedding layers) as dense tensors. Always on "
                  "with --backward_passes_per_step > 1 or --gradient_predivide_factor != 1, "
                  "which Horovod cannot apply to sparse gradients.")
flags.DEFINE_float("bucket_mb", _D.bucket_mb,
                   "All-reduce gradients in buckets of about this many MiB, the last layers' "
                   "first, each starting as soon as the backward pass has its gradients (0: "
                   "one all-reduce per gradient).")
flags.DEFINE_integer("max_skipped_updates", _D.max_skipped_updates,
                     "mixed_float16: stop (exit 4) when this many consecutive weight updates "
                     "were skipped for non-finite gradients at the minimum loss scale, "
                     "which no lower scale can cure (0: never).")
flags.DEFINE_integer("noise_scale_every", _D.noise_scale_every,
                     "Measure the gradient noise scale B_simple (McCandlish et al. 2018) on "
                     "every N-th update, from each backward pass's local gradient and the "
                     "all-reduced one, and log it per epoch (0: off). Needs 2+ ranks or "
                     "--backward_passes_per_step > 1.")
flags.DEFINE_boolean("elastic", _D.elastic,
                     "Elastic training (horovodrun --min-np/--max-np with a host discovery "
                     "script, Gloo): ranks may leave and join; the global batch, the "
                     "schedule and each epoch's examples stay exactly as configured "
                     "(--dataset fashion_mnist or synthetic).")
flags.DEFINE_integer("elastic_commit_every", _D.elastic_commit_every,
                     "--elastic: keep a copy of the training state in memory every N "
                     "updates (and at each epoch's end); a failure rolls back to it.")
flags.DEFINE_float("label_smoothing", _D.label_smoothing, "Label smoothing of the loss.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Evaluate every N epochs (and at the end).")
flags.DEFINE_float("target_accuracy", _D.target_accuracy,
                   "Report the epoch and wall time at which eval top-1 first reaches this "
                   "fraction (0: off).")
flags.DEFINE_string("model_dir", None,
                    "Where rank 0 writes checkpoints/, tensorboard/ and summary.json.")
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every,
                     "Checkpoint every N epochs and at the end (0: never).")
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "Checkpoints to keep.")
flags.DEFINE_bool("resume", _D.resume,
                  "Continue from the newest checkpoint in --model_dir (from scratch if none).")
flags.DEFINE_integer("stop_after_epoch", _D.stop_after_epoch,
                     "End this run after this epoch, as if preempted; the schedule still "
                     "spans --epochs. Continue later with --resume (0: off).")
flags.DEFINE_integer("seed", _D.seed, "Random seed (initialisation and shuffling).")
flags.DEFINE_bool("deterministic", _D.deterministic,
                  "Deterministic TensorFlow ops, one at a time on each rank "
                  "(--inter_op_threads=1 unless given): the same run twice gives the same "
                  "weights.")
flags.DEFINE_integer("intra_op_threads", _D.intra_op_threads,
                     "Threads per op on each rank (0: the node's cores / ranks on the node).")
flags.DEFINE_integer("inter_op_threads", _D.inter_op_threads,
                     "Ops run in parallel on each rank (0: max(2, intra_op_threads), "
                     "1 with --deterministic).")
flags.DEFINE_bool("progress_bar", _D.progress_bar, "Keras progress bar on rank 0.")
flags.DEFINE_integer("check_replicas_every", _D.check_replicas_every,
                     "Every N steps, check that all ranks hold identical weights (a checksum "
                     "all-reduce); stop naming the first differing variable (0: off).")
flags.DEFINE_integer("watchdog_sec", _D.watchdog_sec,
                     "End this rank (exit 6; the launcher then ends the job) when no training "
                     "step has finished for this many seconds: a frozen rank or a collective "
                     "that never completes. Longer than an epoch-end eval + checkpoint "
                     "(0: off).")


def config_from_flags() -> TrainConfig:
    """A TrainConfig with every field taken from the flag of the same name, or, for a flag
    not given on the command line, from ``--preset`` when it has that field."""
    preset = PRESETS[FLAGS.preset].values if FLAGS.preset else {}
    values = {f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in preset.items() if not FLAGS[k].present})
    values["preset"] = FLAGS.preset or ""
    return TrainConfig(**values)


def _train(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_from_flags()
        check_model_dir(config)
        from lars_tf import data, models

        models.check_options(config.model, zero_init_residual=config.zero_init_residual)
        data.check(config)  # flags, folders and files, before Horovod starts
    except (ValueError, FileNotFoundError) as e:
        logging.error("%s", e)
        sys.exit(2)
    from lars_tf.train import Trainer  # imports Horovod: only once the flags are good

    run_with_exit_codes(config, lambda: Trainer(config).fit())


def run_with_exit_codes(config, fit) -> None:
    """Run ``fit()`` (a training run of ``config``), turning its failures into a logged
    message and the exit codes of docs/failures.md: 2 bad flags or files, 3 bad data, 4 NaN loss
    or diverged replicas, 5 another rank was lost (the watchdog exits with 6 itself)."""
    import tensorflow as tf

    from lars_tf.callbacks import ReplicasDiverged

    try:
        fit()
    except (ValueError, FileNotFoundError) as e:
        logging.error("%s", e)
        sys.exit(2)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
        if lost_a_rank(e.message):
            _report_lost_rank(config)
        # --strict_data (a corrupt JPEG or truncated shard), or a label out of range
        logging.error("bad input data: %s", e.message.splitlines()[0][:2000])
        sys.exit(3)
    except (FloatingPointError, ReplicasDiverged) as e:
        logging.error("%s", e)
        sys.exit(4)
    except tf.errors.OpError as e:
        if lost_a_rank(e.message):
            _report_lost_rank(config)
        raise


def lost_a_rank(message: str) -> bool:
    """Whether a failed op's ``message`` says a peer rank is gone
    (``lars_tf.distributed.peer_lost``)."""
    from lars_tf.distributed import peer_lost

    return peer_lost(message)


def _report_lost_rank(config) -> None:
    """A collective failed because another rank died, raised, stalled past the launcher's
    HOROVOD_STALL_SHUTDOWN_TIME_SECONDS, or its host went away: say so, and how to continue."""
    from lars_tf import checkpoint

    latest = checkpoint.latest(config.model_dir) if config.model_dir else None
    logging.error(
        "another rank failed or stopped responding, so Horovod shut the job down (the "
        "launcher's output names the failed rank; a stalled one is named by Horovod's stall "
        "check above). %s", f"Continue from {latest[1]} (epoch {latest[0]}) with --resume "
        f"--model_dir={config.model_dir}" if latest else "No checkpoint was written yet.")
    sys.exit(5)


def train_main():
    """``lars-train``: train a registered model on a dataset with LARS under Horovod."""
    app.run(_train)
