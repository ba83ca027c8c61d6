"""TrainConfig: every setting of a run, validated once; errors name the flag at fault."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from lars_tf import optimizer_builders
from lars_tf.presets import preset
from lars_tf.validation import check_number

# Gradients are all-reduced in buckets of about this many MiB, the last layers' first
# (lars_tf.DistributedOptimizer's default; see its ``allreduce``).
BUCKET_MB = 4.0

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "LARS_TF_DATA_DIR"

OPTIMIZERS = optimizer_builders.names()  # the built-in ones (lars_tf.optimizer_builders)
PRECISIONS = ("fp32", "mixed_float16", "mixed_bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Field names are the ``lars-train`` flag names.

    Batch sizes: ``global_batch_size`` examples contribute to each weight update, split over
    ``world_size`` ranks and ``backward_passes_per_step`` accumulated backward passes, so
    each backward pass on a rank sees
    ``global_batch_size / (world_size * backward_passes_per_step)`` examples.
    ``learning_rate`` is the peak rate for the global batch (scale it from a reference with
    ``lars_tf.scale_learning_rate``). ``preset`` names the published preset the values
    started from (``TrainConfig.from_preset``, ``lars-train --preset``); it is recorded,
    the other fields are what runs.
    """

    model: str = "small_cnn"
    zero_init_residual: bool = False
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    manual_dir: str | None = None
    image_size: int = 224
    num_classes: int = 1000
    label_offset: int = 0
    train_examples: int = 0
    shuffle_buffer: int = 10000
    shuffle_buffer_mb: int = 2048
    cache: bool = False
    strict_data: bool = False
    normalize_on_device: bool = False
    global_batch_size: int = 4096
    epochs: int = 30
    optimizer: str = "lars"
    learning_rate: float = 3.0
    warmup_epochs: float = 3.0
    warmup_start_learning_rate: float = 0.0
    poly_power: float = 2.0
    end_learning_rate: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    trust_coefficient: float = 0.001
    precision: str = "fp32"
    fp16_allreduce: bool = False
    backward_passes_per_step: int = 1
    gradient_predivide_factor: float = 1.0
    sparse_as_dense: bool = False
    bucket_mb: float = BUCKET_MB
    max_skipped_updates: int = 100
    noise_scale_every: int = 0
    elastic: bool = False
    elastic_commit_every: int = 10
    label_smoothing: float = 0.0
    eval_every: int = 1
    target_accuracy: float = 0.0
    model_dir: str | None = None
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    resume: bool = False
    stop_after_epoch: int = 0
    seed: int = 0
    deterministic: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    progress_bar: bool = True
    check_replicas_every: int = 0
    watchdog_sec: int = 0
    preset: str = ""

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TrainConfig:
        """The published preset ``name`` (``lars_tf.presets.PRESETS``), with ``overrides``
        on top: ``TrainConfig.from_preset("resnet50-32k", data_dir="/data/imagenet")``."""
        return cls(**{**preset(name).values, **overrides, "preset": name})

    def __post_init__(self):
        check_number("--global_batch_size", self.global_batch_size, lo=1, integer=True)
        for flag in ("image_size", "num_classes", "shuffle_buffer", "shuffle_buffer_mb"):
            check_number(f"--{flag}", getattr(self, flag), lo=1, integer=True)
        for flag in ("label_offset", "train_examples"):
            check_number(f"--{flag}", getattr(self, flag), lo=0, integer=True)
        check_number("--epochs", self.epochs, lo=1, integer=True)
        check_number("--eval_every", self.eval_every, lo=1, integer=True)
        check_number("--keep_checkpoints", self.keep_checkpoints, lo=1, integer=True)
        for flag in ("checkpoint_every", "stop_after_epoch", "intra_op_threads",
                     "inter_op_threads", "check_replicas_every", "watchdog_sec",
                     "max_skipped_updates"):
            check_number(f"--{flag}", getattr(self, flag), lo=0, integer=True)
        if self.stop_after_epoch > self.epochs:
            raise ValueError(f"--stop_after_epoch={self.stop_after_epoch} exceeds "
                             f"--epochs={self.epochs}")
        check_number("--label_smoothing", self.label_smoothing, lo=0.0, hi=1.0, hi_open=True)
        check_number("--target_accuracy", self.target_accuracy, lo=0.0)
        if self.target_accuracy > 1.0:
            raise ValueError(f"--target_accuracy={self.target_accuracy}: must be in [0, 1] "
                             "(a fraction, e.g. 0.9)")
        if self.normalize_on_device and self.dataset in ("fashion_mnist", "synthetic"):
            raise ValueError(f"--normalize_on_device: --dataset={self.dataset} is not decoded "
                             "from JPEGs (it applies to imagenet and tfds:NAME)")
        if self.resume and not self.model_dir:
            raise ValueError("--resume needs --model_dir (where the checkpoints are)")
        optimizer_builders.check(self.optimizer)
        check_number("--learning_rate", self.learning_rate, lo=0.0, lo_open=True)
        check_number("--warmup_epochs", self.warmup_epochs, lo=0.0)
        check_number("--warmup_start_learning_rate", self.warmup_start_learning_rate, lo=0.0)
        if self.warmup_start_learning_rate > self.learning_rate:
            raise ValueError(f"--warmup_start_learning_rate={self.warmup_start_learning_rate} "
                             f"exceeds --learning_rate={self.learning_rate}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup_epochs={self.warmup_epochs} exceeds "
                             f"--epochs={self.epochs}")
        check_number("--poly_power", self.poly_power, lo=0.0, lo_open=True)
        check_number("--end_learning_rate", self.end_learning_rate, lo=0.0)
        if self.end_learning_rate > self.learning_rate:
            raise ValueError(f"--end_learning_rate={self.end_learning_rate} exceeds "
                             f"--learning_rate={self.learning_rate}")
        check_number("--momentum", self.momentum, lo=0.0, hi=1.0, hi_open=True)
        check_number("--weight_decay", self.weight_decay, lo=0.0)
        check_number("--trust_coefficient", self.trust_coefficient, lo=0.0, lo_open=True)
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision={self.precision!r}: must be one of {PRECISIONS}")
        check_number("--backward_passes_per_step", self.backward_passes_per_step, lo=1,
                     integer=True)
        check_number("--gradient_predivide_factor", self.gradient_predivide_factor, lo=0.0,
                     lo_open=True)
        check_number("--noise_scale_every", self.noise_scale_every, lo=0, integer=True)
        check_number("--bucket_mb", self.bucket_mb, lo=0.0)
        check_number("--elastic_commit_every", self.elastic_commit_every, lo=1, integer=True)
        if self.elastic:
            from lars_tf import data

            if data.source(self.dataset).build_elastic is None:
                raise ValueError(f"--elastic: --dataset={self.dataset} cannot yet be re-cut "
                                 "over a new number of ranks mid-epoch; --elastic takes "
                                 f"{data.names(elastic=True)} (imagenet: shards from "
                                 "lars-convert)")
            if self.cache:
                raise ValueError("--elastic with --cache: an elastic job reads each update's "
                                 "records by position, not a fixed share of the shards to "
                                 "keep in memory (the page cache keeps the shards)")
            for flag, ok in (("backward_passes_per_step", self.backward_passes_per_step == 1),
                             ("noise_scale_every", self.noise_scale_every == 0)):
                if not ok:
                    raise ValueError(
                        f"--elastic with --{flag}={getattr(self, flag)}: an elastic job "
                        "gives ranks unequal batches (the global batch stays whole), which "
                        f"--{flag} does not take yet")
        if self.preset:
            preset(self.preset)  # raises naming --preset if unknown
        if self.model_dir is not None and os.path.exists(self.model_dir) \
                and not os.path.isdir(self.model_dir):
            raise ValueError(f"--model_dir={self.model_dir!r} exists and is not a directory")

    def resolved_data_dir(self) -> str:
        """``data_dir``, else ``$LARS_TF_DATA_DIR``, else the Debian package's folder."""
        return self.data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_FASHION_MNIST_DIR

    def per_rank_batch_size(self, world_size: int, rank: int = 0) -> int:
        """Examples in one backward pass on one rank; raises if the split is not even
        (``--elastic``: rank ``rank``'s slice, which may be one more than another's)."""
        if self.elastic:
            from lars_tf.data.elastic import rank_slice

            return rank_slice(self.global_batch_size, rank, world_size)[1]
        parts = world_size * self.backward_passes_per_step
        if self.global_batch_size % parts:
            raise ValueError(
                f"--global_batch_size={self.global_batch_size} is not divisible by the "
                f"{world_size} ranks x --backward_passes_per_step="
                f"{self.backward_passes_per_step}: every backward pass must get the same batch")
        return self.global_batch_size // parts

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def check_model_dir(config: TrainConfig) -> None:
    """Before any worker starts: ``--model_dir`` must be writable, and must not hold
    checkpoints that this run would mix with its own unless ``--resume`` is given."""
    if not config.model_dir:
        return
    path = os.path.abspath(config.model_dir)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--model_dir={config.model_dir!r} cannot be written ({probe} is not "
                         "a writable directory)")
    ckpts = os.path.join(path, "checkpoints")
    if config.elastic and joins_elastic_job(path):
        return  # a rank that joins the running job whose checkpoints these are
    if not config.resume and os.path.isdir(ckpts) and any(
            name.startswith("epoch-") for name in os.listdir(ckpts)):
        raise ValueError(
            f"--model_dir={config.model_dir!r} already holds checkpoints: pass --resume to "
            "continue that run, or choose another --model_dir (nothing was overwritten)")


ELASTIC_JOB_FILE = "elastic_job.json"


def elastic_job_id() -> str:
    """What tells one elastic job from another: the address of its driver's rendezvous,
    which horovodrun gives every worker it starts ('' outside an elastic job)."""
    addr = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR", "")
    port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT", "")
    return f"{addr}:{port}" if addr and port and os.environ.get("HOROVOD_ELASTIC") == "1" \
        else ""


def joins_elastic_job(model_dir: str) -> bool:
    """Whether this process is a rank that an elastic job started after its start (a host
    that joined): ``model_dir`` names this job as the one writing it."""
    import json

    job = elastic_job_id()
    try:
        with open(os.path.join(model_dir, ELASTIC_JOB_FILE)) as f:
            return bool(job) and json.load(f).get("job") == job
    except (OSError, ValueError):
        return False
