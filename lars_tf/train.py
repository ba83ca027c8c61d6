"""The trainer: optimizer stack + Keras fit + callbacks + checkpoints + run summary."""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import threading
import time

import numpy as np
import tensorflow as tf
from absl import logging

from lars_tf import checkpoint, distributed, models, schedules
from lars_tf import data as data_lib
from lars_tf import precision as precision_lib
from lars_tf.config import TrainConfig
from lars_tf.optimizers import LARS
from lars_tf.schedules import WarmupPolynomialDecay

SUMMARY_FILE = "summary.json"


class ReplicasDiverged(RuntimeError):
    """The ranks no longer hold the same weights (``--check_replicas_every``)."""


def build_schedule(config: TrainConfig, steps_per_epoch: int) -> WarmupPolynomialDecay:
    """Warmup + polynomial decay over the run, in weight updates.

    ``steps_per_epoch`` counts backward passes (what ``model.fit`` runs); with gradient
    accumulation an epoch has ``steps_per_epoch / backward_passes_per_step`` updates.
    """
    k = config.backward_passes_per_step
    updates_per_epoch = max(1, steps_per_epoch // k)
    total = config.epochs * updates_per_epoch
    return WarmupPolynomialDecay(
        peak_learning_rate=config.learning_rate,
        warmup_steps=min(total, int(round(config.warmup_epochs * updates_per_epoch))),
        total_steps=total,
        end_learning_rate=config.end_learning_rate,
        power=config.poly_power,
        backward_passes_per_step=k,
        warmup_start_learning_rate=config.warmup_start_learning_rate,
    )


def build_local_optimizer(config: TrainConfig, steps_per_epoch: int) -> LARS:
    """The single-process optimizer of ``config`` (no Horovod): LARS, or the SGD baseline.

    ``--optimizer=sgd`` is momentum SGD with the same weight-decay rule and exclusions as
    LARS, only without the trust ratio, so that the two differ in exactly one thing.
    """
    kwargs = dict(
        learning_rate=build_schedule(config, steps_per_epoch),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        trust_coefficient=config.trust_coefficient,
    )
    if config.optimizer == "sgd":
        return LARS(exclude_from_layer_adaptation=(".*",), name="SGD", **kwargs)
    return LARS(**kwargs)


def build_optimizer(config: TrainConfig, steps_per_epoch: int) -> tf.keras.optimizers.Optimizer:
    """The full stack for a Horovod run: LARS (or the SGD baseline) inside
    ``hvd.DistributedOptimizer``, inside dynamic loss scaling for ``mixed_float16``
    (see ``lars_tf.distributed.wrap_optimizer``). Call after ``lars_tf.init()``.

    ``steps_per_epoch`` counts backward passes per epoch on one rank."""
    return distributed.wrap_optimizer(
        build_local_optimizer(config, steps_per_epoch),
        precision=config.precision,
        fp16_allreduce=config.fp16_allreduce,
        backward_passes_per_step=config.backward_passes_per_step,
        gradient_predivide_factor=config.gradient_predivide_factor,
        sparse_as_dense=True if config.sparse_as_dense else None,
    )


def build_model(config: TrainConfig, input_shape, num_classes: int) -> tf.keras.Model:
    """The registered model ``config.model`` with the builder options the config asks for
    (``zero_init_residual``); an option the model does not take is a ``ValueError``."""
    options = {"zero_init_residual": config.zero_init_residual}
    models.check_options(config.model, **options)
    return models.get(config.model, input_shape, num_classes,
                      **{k: v for k, v in options.items() if v})


def build_loss(num_classes: int, label_smoothing: float = 0.0):
    """Cross-entropy on logits and integer labels, with optional label smoothing."""
    if not label_smoothing:
        return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    smoothed = tf.keras.losses.CategoricalCrossentropy(from_logits=True,
                                                       label_smoothing=label_smoothing)

    def loss(labels, logits):
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        return smoothed(tf.one_hot(labels, num_classes), logits)

    return loss


class Trainer:
    """Train any Keras model with the lars_tf stack on every Horovod rank.

    >>> trainer = Trainer(TrainConfig(epochs=2, model_dir="runs/x"), model=my_model)
    >>> summary = trainer.fit()          # under: horovodrun -np 2 python script.py

    ``model`` defaults to ``config.model`` from the registry (built for
    ``config.num_classes`` classes when you pass your own datasets). ``fit()`` reads
    ``config.dataset``; or pass ``fit(train_ds, eval_ds, steps_per_epoch=N)`` with this
    rank's batched ``tf.data`` datasets (the same N on every rank; ``eval_ds`` holds this
    rank's share of the eval examples). ``callbacks`` (Keras callbacks) run on every rank
    after the trainer's own. Rank 0 alone logs and writes ``model_dir``:
    checkpoints, TensorBoard logs and ``summary.json``.
    """

    def __init__(self, config: TrainConfig, model: tf.keras.Model | None = None):
        if model is not None and config.zero_init_residual:
            raise ValueError("--zero_init_residual applies to registered models (--model); "
                             "build your own model with its residual BatchNorms started at 0")
        self.config = config
        self.world = distributed.init(config.intra_op_threads or None,
                                      config.inter_op_threads or None)
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
        precision_lib.set_policy(config.precision)
        tf.keras.utils.set_random_seed(config.seed)
        self.model = model
        self.history: list[dict] = []

    def fit(self, train: tf.data.Dataset | data_lib.Datasets | None = None,
            eval: tf.data.Dataset | None = None, steps_per_epoch: int | None = None,
            callbacks: list[tf.keras.callbacks.Callback] | None = None) -> dict:
        config, world = self.config, self.world
        t_start = time.time()
        resume = self._find_checkpoint()
        start_epoch = resume[0] if resume else 0
        datasets = self._datasets(train, eval, steps_per_epoch, start_epoch)
        if self.model is None:
            self.model = build_model(config, datasets.input_shape, datasets.num_classes)
        model = self.model
        num_classes = _num_classes(model, datasets.input_shape)
        optimizer = build_optimizer(config, datasets.steps_per_epoch)
        model.compile(
            optimizer=optimizer,
            loss=build_loss(num_classes, config.label_smoothing),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                     tf.keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")],
        )
        optimizer.build(model.trainable_variables)
        meta = {}
        if resume and world.is_chief:
            meta = checkpoint.restore(resume[1], model, optimizer)
            logging.info("resumed from %s (epoch %d, step %d)", resume[1], resume[0],
                         int(optimizer.iterations.numpy()))
        meta = distributed.broadcast_object(meta, name="lars_tf.resume_meta")
        self.history = list(meta.get("history", []))
        distributed.broadcast_state(model, optimizer)
        # The initial weights came from --seed (and now from rank 0); what is drawn from
        # here on (dropout masks) comes from (seed, rank), so ranks draw differently.
        tf.keras.utils.set_random_seed(data_lib.rank_seed(config.seed, world.rank))
        self.rank_settings = distributed.gather_object(distributed.rank_settings(),
                                                       name="lars_tf.rank_settings")
        if world.is_chief:
            _log_rank_settings(self.rank_settings)
            if config.preset:
                _log_preset(config)

        end_epoch = config.stop_after_epoch or config.epochs
        if world.is_chief:
            logging.info(
                "training %s on %s: %d ranks x %d passes x %d = global batch %d, "
                "%d updates/epoch, epochs %d-%d of %d, %s lr %.4g, %s", model.name,
                config.dataset, world.size, config.backward_passes_per_step,
                config.per_rank_batch_size(world.size), config.global_batch_size,
                datasets.steps_per_epoch // config.backward_passes_per_step, start_epoch + 1,
                end_epoch, config.epochs, config.optimizer, config.learning_rate,
                config.precision)

        elapsed_before = float(meta.get("elapsed_sec", 0.0))
        tta = _TimeToAccuracy(config.target_accuracy, t_start - elapsed_before,
                              meta.get("time_to_accuracy"))
        callbacks = [
            *([_StopOnNonFinite(world.rank, datasets.steps_per_epoch)]
              if config.precision != "mixed_float16" else []),
            *([_StopOnStuckLossScale(config.max_skipped_updates,
                                     config.backward_passes_per_step, datasets.steps_per_epoch)]
              if config.precision == "mixed_float16" and config.max_skipped_updates else []),
            *([_CheckReplicas(config.check_replicas_every, optimizer)]
              if config.check_replicas_every else []),
            *([_Watchdog(config.watchdog_sec, world.rank)] if config.watchdog_sec else []),
            distributed.metric_average_callback(),
            _EpochTimer(config.global_batch_size * datasets.steps_per_epoch
                        // config.backward_passes_per_step),
            _AverageNonTrainable(),
            _GlobalEval(datasets.eval, config.eval_every, end_epoch, num_classes),
            _SkippedRecords(datasets.skipped),
            tta,
            _LearningRate(optimizer),
            _Record(self.history, world.is_chief),
            *(callbacks or []),
        ]
        if world.is_chief and config.model_dir:
            if config.checkpoint_every:
                callbacks.append(_Checkpoint(config, optimizer, self.history, tta,
                                             t_start - elapsed_before, end_epoch))
            callbacks.append(tf.keras.callbacks.TensorBoard(
                os.path.join(config.model_dir, "tensorboard"), update_freq="epoch",
                profile_batch=0, write_graph=False))
        if start_epoch < end_epoch:
            model.fit(
                datasets.train,
                initial_epoch=start_epoch,
                epochs=end_epoch,
                steps_per_epoch=datasets.steps_per_epoch,
                callbacks=callbacks,
                verbose=1 if (world.is_chief and config.progress_bar) else 0,
            )
        summary = self._summary(datasets, elapsed_before + time.time() - t_start, tta,
                                start_epoch, end_epoch)
        if world.is_chief and config.model_dir:
            _write_json(os.path.join(config.model_dir, SUMMARY_FILE), summary)
            logging.info("summary written to %s", os.path.join(config.model_dir, SUMMARY_FILE))
        return summary

    def _find_checkpoint(self) -> tuple[int, str] | None:
        config = self.config
        found = None
        if config.resume and self.world.is_chief:
            found = checkpoint.latest(config.model_dir)
            if found is None:
                logging.warning("--resume: no checkpoint in %s yet, starting at epoch 1",
                                config.model_dir)
        return distributed.broadcast_object(found, name="lars_tf.resume_from")

    def _datasets(self, train, eval, steps_per_epoch, start_epoch) -> data_lib.Datasets:
        config, world = self.config, self.world
        if train is None:
            # one rank prepares (tfds from --manual_dir); its error, if any, stops every rank
            error = None
            if world.is_chief:
                try:
                    data_lib.prepare(config)
                except (ValueError, FileNotFoundError) as e:
                    error = str(e)
            error = distributed.broadcast_object(error, name="lars_tf.prepare")
            if error:
                raise ValueError(error)
            return data_lib.build(config, world.rank, world.size, initial_epoch=start_epoch,
                                  threads=distributed.threads_per_rank(world.local_size))
        if isinstance(train, data_lib.Datasets):
            return train
        if not steps_per_epoch:
            raise ValueError("Trainer.fit(train_ds): give steps_per_epoch (the same on every "
                             "rank), the number of batches of train_ds in one epoch")
        k = config.backward_passes_per_step
        if int(steps_per_epoch) % k:
            raise ValueError(
                f"Trainer.fit(steps_per_epoch={steps_per_epoch}): must be a multiple of "
                f"--backward_passes_per_step={k}, so that every epoch ends on a weight update "
                "(the schedule and the checkpoints count whole updates)")
        spec = train.element_spec[0]
        # a registered model (--model) built for these datasets gets --num_classes outputs
        return data_lib.Datasets(
            train=train.repeat(), eval=eval, steps_per_epoch=int(steps_per_epoch),
            train_examples=0, eval_examples=None,
            input_shape=tuple(spec.shape[1:]), num_classes=config.num_classes)

    def _summary(self, datasets, wall: float, tta, start_epoch: int, end_epoch: int) -> dict:
        config, world = self.config, self.world
        peak_mb = np.zeros(world.size)
        peak_mb[world.rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        peak_mb = distributed.allreduce_sum(peak_mb, name="lars_tf.peak_rss")
        evals = [h for h in self.history if "test_accuracy" in h]
        # The first epoch of a process includes graph tracing: throughput is the mean of the
        # others when there are any.
        timed = [h["images_per_sec"] for h in self.history if "images_per_sec" in h]
        speeds = timed[1:] if len(timed) > 1 else timed
        return {
            "final_test_accuracy": evals[-1]["test_accuracy"] if evals else None,
            "final_test_top5": evals[-1].get("test_top5") if evals else None,
            "best_test_accuracy": max(h["test_accuracy"] for h in evals) if evals else None,
            "time_to_accuracy": tta.result,
            "images_per_sec": float(np.mean(speeds)) if speeds else None,
            "epochs": config.epochs,
            "epochs_done": end_epoch,
            "resumed_from_epoch": start_epoch or None,
            "global_batch_size": config.global_batch_size,
            "per_rank_batch_size": config.per_rank_batch_size(world.size),
            "world_size": world.size,
            "steps_per_epoch": datasets.steps_per_epoch,
            "backward_passes_per_step": config.backward_passes_per_step,
            "updates_per_epoch": datasets.steps_per_epoch // config.backward_passes_per_step,
            "precision": config.precision,
            "wall_time_sec": wall,
            "peak_rss_mb_per_rank": [round(float(x), 1) for x in peak_mb],
            "history": self.history,
            "ranks": self.rank_settings,
            "config": dict(vars(config)),
            "versions": distributed.versions(),
        }


def _num_classes(model: tf.keras.Model, input_shape) -> int:
    """Width of the model's logits; a subclassed model has no symbolic outputs, so it is
    asked once on a zero image."""
    if getattr(model, "outputs", None):
        return int(model.outputs[0].shape[-1])
    return int(model(tf.zeros((1, *input_shape)), training=False).shape[-1])


# Set by horovodrun/mpirun for each rank (who it is, where to meet): not tuning.
_IDENTITY_VARS = ("HOROVOD_GLOO_", "HOROVOD_HOSTNAME", "HOROVOD_RANK", "HOROVOD_SIZE",
                  "HOROVOD_LOCAL_", "HOROVOD_CROSS_", "HOROVOD_CONTROLLER",
                  "HOROVOD_CPU_OPERATIONS")


def _log_preset(config: TrainConfig) -> None:
    """Say which published preset the run started from and where it departs from it."""
    preset = schedules.preset(config.preset)
    changed = {k: (getattr(config, k), v) for k, v in preset.values.items()
               if getattr(config, k) != v}
    logging.info("preset %s (its source: lars_tf.schedules.PRESETS[%r].source); changed "
                 "from it: %s", preset.name, preset.name,
                 ", ".join(f"{k}={now!r} (preset {was!r})" for k, (now, was)
                           in changed.items()) or "nothing")
    tuned_for = {"dataset", "global_batch_size", "epochs", "train_examples"} & changed.keys()
    if tuned_for:
        logging.warning(
            "preset %s was tuned for %s: with %s changed, its learning rate and warmup are "
            "only a starting point", preset.name,
            ", ".join(f"{k}={preset.values[k]}" for k in sorted(tuned_for)),
            ", ".join(sorted(tuned_for)))


def _log_rank_settings(ranks: list[dict]) -> None:
    """One line with the settings rank 0 runs with; a warning for any that differ by rank."""
    first = ranks[0]
    tuning = {k: v for k, v in first["env"].items() if not k.startswith(_IDENTITY_VARS)}
    logging.info("rank 0 on %s: %d intra-op / %d inter-op threads, oneDNN %s, cores %s, %s",
                 first["host"], first["intra_op_threads"], first["inter_op_threads"],
                 "on" if first["onednn"] else "off", first["cpu_affinity"],
                 " ".join(f"{k}={v}" for k, v in tuning.items()) or "no HOROVOD_* settings")
    if len({r["onednn"] for r in ranks}) > 1:
        logging.warning("oneDNN is on for some ranks only: %s",
                        [r["onednn"] for r in ranks])
    keys = set().union(*(r["env"] for r in ranks))
    for key in sorted(k for k in keys if not k.startswith(_IDENTITY_VARS)):
        values = [r["env"].get(key) for r in ranks]
        if len(set(values)) > 1:
            logging.warning("ranks run with different %s: %s", key, values)


class _StopOnNonFinite(tf.keras.callbacks.Callback):
    """fp32 / bfloat16: a NaN or Inf loss stops the run at that step, naming it.

    A non-finite gradient reaches every rank through the all-reduce, so every rank sees a
    non-finite loss at the same step or the next and stops; a rank that is still waiting in
    a collective is released when the stopping ranks exit (Horovod shuts down). Checkpoints
    are only written at epoch ends, so none holds the broken weights. (mixed_float16 is not
    checked here: its loss scaling skips steps whose gradients overflow.)
    """

    def __init__(self, rank: int, steps_per_epoch: int):
        super().__init__()
        self.rank, self.steps_per_epoch = rank, steps_per_epoch
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        step = self.epoch * self.steps_per_epoch + batch + 1
        raise FloatingPointError(
            f"the training loss is {float(loss)} at step {step} (epoch {self.epoch + 1}, "
            f"batch {batch + 1}) on rank {self.rank}: training stopped, no checkpoint holds "
            "these weights. Lower --learning_rate or raise --warmup_epochs, then resume from "
            "the last checkpoint with --resume")


class _Watchdog(tf.keras.callbacks.Callback):
    """Ends this rank when no training step has finished for ``seconds``.

    A rank that freezes (stopped, stuck in the kernel) takes Horovod's background thread
    with it, so Horovod's own stall check, which needs every rank's thread, never fires and
    the others wait forever (and under Gloo it does not fire at all). Here a thread on every
    rank watches the steps; on timeout it logs the step it waited for and exits the process
    (code 6), and the launcher (horovodrun, mpirun, srun --kill-on-bad-exit) ends the job.
    The time of epoch-end work (evaluation, checkpoint) counts against ``seconds``.
    """

    EXIT_CODE = 6

    def __init__(self, seconds: int, rank: int):
        super().__init__()
        self.seconds, self.rank = seconds, rank
        self._last, self._steps = time.monotonic(), 0
        self._done = threading.Event()

    def on_train_begin(self, logs=None):
        self._last = time.monotonic()
        threading.Thread(target=self._watch, name="lars_tf-watchdog", daemon=True).start()

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.monotonic()
        self._steps += 1

    def on_train_end(self, logs=None):
        self._done.set()

    def _watch(self):
        while not self._done.wait(min(5.0, self.seconds / 4)):
            idle = time.monotonic() - self._last
            if idle > self.seconds:
                logging.error(
                    "rank %d: no training step has finished for %.0f s (--watchdog_sec=%d; "
                    "waiting for step %d of this run): a rank froze or a collective never "
                    "completes. Ending this rank so that the launcher ends the job; resume "
                    "with --resume.", self.rank, idle, self.seconds, self._steps + 1)
                logging.flush()
                os._exit(self.EXIT_CODE)


class _CheckReplicas(tf.keras.callbacks.Callback):
    """Every ``every`` steps, all ranks compare checksums of every trainable variable and
    of the optimizer's whole state (slots, step counter, loss scale) (sum and sum of squares,
    in float64, through one min and one max all-reduce); any difference stops every rank at
    once, naming the first variable that differs. BatchNorm's moving statistics are left
    out: each rank updates them from its own batches until the epoch end averages them."""

    def __init__(self, every: int, optimizer):
        super().__init__()
        self.every, self.optimizer = every, optimizer
        self._steps, self._checksums = 0, None  # steps (backward passes) of this run

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self._steps % self.every:
            return
        if self._checksums is None:
            variables = list(self.model.trainable_variables)
            known = {id(v) for v in variables}
            variables += [v for v in checkpoint.state_variables(optimizer=self.optimizer)
                          if id(v) not in known]
            self._variables = variables

            def checksums():
                return tf.stack([s for v in variables for s in (
                    tf.reduce_sum(tf.cast(v, tf.float64)),
                    tf.reduce_sum(tf.square(tf.cast(v, tf.float64))))])
            self._checksums = tf.function(checksums)
        variables = self._variables
        lo, hi = distributed.allreduce_min_max(self._checksums().numpy(),
                                               name="lars_tf.check_replicas")
        differ = np.nonzero(lo != hi)[0]
        if len(differ):
            v = variables[differ[0] // 2]
            raise ReplicasDiverged(
                f"ranks hold different weights or optimizer state after step {self._steps}: "
                f"first differing variable {v.name!r} (checksum {lo[differ[0]]!r} to "
                f"{hi[differ[0]]!r} over ranks; {len(set(differ // 2))} of {len(variables)} "
                "variables differ)")


class _StopOnStuckLossScale(tf.keras.callbacks.Callback):
    """mixed_float16: stop when ``limit`` consecutive weight updates were skipped at the
    minimum loss scale (1). Dynamic loss scaling halves the scale on every overflow; at 1 it
    cannot go lower, so gradients that are still non-finite there come from the model
    (a NaN, a diverged run), and every further step would be skipped too: training nothing
    forever. Raises ``FloatingPointError`` (``lars-train`` exits 4) naming the step."""

    def __init__(self, limit: int, passes_per_update: int, steps_per_epoch: int):
        super().__init__()
        self.limit, self.k, self.steps_per_epoch = limit, passes_per_update, steps_per_epoch
        self.epoch, self.skipped = 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.k:
            return  # not the end of an accumulation window: no update was decided
        opt = self.model.optimizer
        at_min = float(opt.loss_scale) <= 1.0 and int(opt.dynamic_counter) == 0
        self.skipped = self.skipped + 1 if at_min else 0
        if self.skipped >= self.limit:
            step = self.epoch * self.steps_per_epoch + batch + 1
            raise FloatingPointError(
                f"the last {self.skipped} weight updates up to step {step} (epoch "
                f"{self.epoch + 1}, batch {batch + 1}) were all skipped for non-finite "
                "gradients at the minimum loss scale (1): the model itself produces Inf/NaN, "
                "which no loss scale cures, so training stopped (--max_skipped_updates="
                f"{self.limit}). Lower --learning_rate or raise --warmup_epochs, then resume "
                "from the last checkpoint with --resume")


class _EpochTimer(tf.keras.callbacks.Callback):
    """Global training images/sec of each epoch (before evaluation runs)."""

    def __init__(self, images_per_epoch: int):
        super().__init__()
        self.images_per_epoch = images_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        dt = time.perf_counter() - self._t0
        logs["epoch_time_sec"] = dt
        logs["images_per_sec"] = self.images_per_epoch / dt


class _AverageNonTrainable(tf.keras.callbacks.Callback):
    """At each epoch end, BatchNorm moving statistics (updated by each rank from its own
    batches) become their mean over ranks: the model evaluated and saved is the same on
    every rank."""

    def on_epoch_end(self, epoch, logs=None):
        distributed.average_variables(self.model.non_trainable_variables,
                                      name="lars_tf.non_trainable")


class _GlobalEval(tf.keras.callbacks.Callback):
    """Exact eval over all ranks: each rank sums loss, top-1 and top-5 hits and examples over
    its share of the eval set (which it counts as it goes), and the sums are all-reduced."""

    def __init__(self, dataset, every: int, epochs: int, num_classes: int):
        super().__init__()
        self.dataset, self.every, self.epochs = dataset, every, epochs
        self.top_k = min(5, max(1, num_classes))
        self._step = None

    def _sums(self, images, labels):
        logits = tf.cast(self.model(images, training=False), tf.float32)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        loss = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)

        def hits(k):
            return tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, k), tf.float64))

        return tf.stack([tf.reduce_sum(tf.cast(loss, tf.float64)), hits(1), hits(self.top_k),
                         tf.cast(tf.shape(labels)[0], tf.float64)])

    def on_epoch_end(self, epoch, logs=None):
        if self.dataset is None or ((epoch + 1) % self.every and epoch + 1 != self.epochs):
            return
        if self._step is None:
            self._step = tf.function(self._sums)
        local = np.zeros(4)
        for images, labels in self.dataset:
            local += self._step(images, labels).numpy()
        total = distributed.allreduce_sum(local, name="lars_tf.eval")
        n = max(total[3], 1.0)
        logs["test_loss"] = float(total[0] / n)
        logs["test_accuracy"] = float(total[1] / n)
        logs["test_top5"] = float(total[2] / n)
        logs["test_examples"] = int(total[3])


class _SkippedRecords(tf.keras.callbacks.Callback):
    """Corrupt records skipped so far, summed over ranks (each was named on stderr)."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def on_epoch_end(self, epoch, logs=None):
        if self.counter is None:
            return
        total = int(distributed.allreduce_sum([float(self.counter.numpy())],
                                              name="lars_tf.skipped")[0])
        logs["skipped_records"] = total
        if total:
            logging.warning("%d corrupt records skipped so far (named above)", total)


class _TimeToAccuracy(tf.keras.callbacks.Callback):
    """The first epoch, and the wall time since the run began, at which the eval top-1
    accuracy reached ``target`` (nothing when the target is 0)."""

    def __init__(self, target: float, t_begin: float, result: dict | None):
        super().__init__()
        self.target, self.t_begin, self.result = target, t_begin, result

    def on_epoch_end(self, epoch, logs=None):
        acc = logs.get("test_accuracy")
        if not self.target or self.result or acc is None or acc < self.target:
            return
        self.result = {"target": self.target, "epoch": epoch + 1, "test_accuracy": acc,
                       "seconds": time.time() - self.t_begin}
        logs["time_to_accuracy_sec"] = self.result["seconds"]


class _LearningRate(tf.keras.callbacks.Callback):
    """The learning rate that the last update of the epoch used, into the logs."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer = getattr(optimizer, "inner_optimizer", optimizer)

    def on_epoch_end(self, epoch, logs=None):
        lr = self.optimizer._learning_rate
        if callable(lr):
            lr = lr(self.optimizer.iterations - 1)
        logs["learning_rate"] = float(lr)


class _Record(tf.keras.callbacks.Callback):
    """Keeps the per-epoch history; rank 0 logs one line per epoch."""

    def __init__(self, history: list, chief: bool):
        super().__init__()
        self.history, self.chief = history, chief

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        self.history.append(row)
        if self.chief:
            test = row.get("test_accuracy")
            logging.info(
                "epoch %3d  loss %.4f  train acc %.4f  test acc %s  lr %.4g  "
                "%.0f images/sec", row["epoch"], row.get("loss", math.nan),
                row.get("accuracy", math.nan),
                "  -   " if test is None else f"{test:.4f}", row["learning_rate"],
                row["images_per_sec"])


class _Checkpoint(tf.keras.callbacks.Callback):
    """Rank 0: an atomic checkpoint every N epochs and at the last epoch of this run."""

    def __init__(self, config: TrainConfig, optimizer, history: list, tta, t_begin: float,
                 end_epoch: int):
        super().__init__()
        self.config, self.optimizer, self.history = config, optimizer, history
        self.tta, self.t_begin, self.end_epoch = tta, t_begin, end_epoch

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.config.checkpoint_every and done != self.end_epoch:
            return
        meta = {"history": list(self.history),  # _Record has added this epoch
                "elapsed_sec": time.time() - self.t_begin,
                "time_to_accuracy": self.tta.result,
                "step": int(self.optimizer.iterations.numpy())}
        path = checkpoint.save(self.config.model_dir, done, self.model, self.optimizer, meta,
                               keep=self.config.keep_checkpoints)
        logging.info("checkpoint %s", path)


def _write_json(path: str, obj) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
