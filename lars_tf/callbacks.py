"""Keras callbacks of the lars_tf trainer, public for users of the Python API.

Each works on every rank of a Horovod job (the ones that all-reduce must run on all ranks)
and in a single process:

- ``BroadcastState``: rank 0's complete state (weights, optimizer, loss scale) on every rank
  when training starts.
- ``CheckReplicas``: every N steps, stop if the ranks' weights or optimizer state differ.
- ``AverageBatchNormStatistics``: at each epoch end, BatchNorm statistics become their mean
  over ranks.
- ``ExactEval``: evaluation over all ranks' shares of the eval set, exactly once each.
- ``StopOnNonFinite``, ``StopOnStuckLossScale``, ``Watchdog``: stop a run that cannot go on.
- ``EpochTimer``, ``LearningRateLogger``, ``SkippedRecords``, ``TimeToAccuracy``,
  ``EpochLog``: the per-epoch figures of the run summary; ``LogEpoch`` logs them.
- ``SaveCheckpoints``: atomic checkpoints (add it on rank 0 only).

- ``AverageMetrics``: the epoch's training metrics become their mean over ranks.
"""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import tensorflow as tf
from absl import logging

from lars_tf import checkpoint, distributed, keras_compat, precision

__all__ = ["BroadcastState", "AverageMetrics", "CheckReplicas", "AverageBatchNormStatistics",
           "ExactEval", "StopOnNonFinite", "StopOnStuckLossScale", "GradientNoiseScale",
           "Watchdog", "EpochTimer", "LearningRateLogger", "SkippedRecords", "TimeToAccuracy",
           "EpochLog", "ReseedLayers", "LogEpoch", "LogFirstUpdate", "SaveCheckpoints",
           "ReplicasDiverged"]


class ReplicasDiverged(RuntimeError):
    """The ranks no longer hold the same weights (``--check_replicas_every``)."""


class BroadcastState(tf.keras.callbacks.Callback):
    """Rank 0's complete state on every rank when training starts: every variable a
    checkpoint of the model and its optimizer holds (weights, BatchNorm statistics, the
    optimizer's slots and step counters, the loss scale), as ``lars_tf.distributed.
    broadcast_state``. Add it to every rank's ``fit`` (Horovod's
    ``BroadcastGlobalVariablesCallback`` works on Keras 2 only); ranks that started from
    different random weights, or where only rank 0 loaded a checkpoint, then train as one.

    It runs at the start of every ``fit``, so a model loaded on rank 0 between two ``fit``
    calls is broadcast too. A model that is not built when training starts (a subclassed
    model that was never called) gets its variables only in the first step: then the
    broadcast follows that step, as Horovod's callback does, and the ranks end identical
    all the same; build the model first (``model.build(shape)`` or one call) to broadcast
    before any update.
    """

    def on_train_begin(self, logs=None):
        self._pending = not self.model.built
        if not self._pending:
            distributed.broadcast_state(self.model, self.model.optimizer)

    def on_train_batch_end(self, batch, logs=None):
        if self._pending:
            self._pending = False
            distributed.broadcast_state(self.model, self.model.optimizer)


class ReseedLayers(tf.keras.callbacks.Callback):
    """At each epoch's start, the random draws of ``model``'s layers (dropout) are seeded
    from (``seed``, epoch): an epoch draws the same masks in a run that resumed before it as
    in one that went straight through (Keras 3; see ``keras_compat.reseed_layers``). Give
    each rank its own ``seed`` so that the ranks draw differently."""

    def __init__(self, model, seed: int):
        super().__init__()
        self.layers_of, self.seed = model, seed

    def on_epoch_begin(self, epoch, logs=None):
        keras_compat.reseed_layers(self.layers_of, self.seed, epoch)


class StopOnNonFinite(tf.keras.callbacks.Callback):
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


class Watchdog(tf.keras.callbacks.Callback):
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


class CheckReplicas(tf.keras.callbacks.Callback):
    """Every ``every`` steps, all ranks compare checksums of every trainable variable and
    of the optimizer's whole state (slots, step counter, loss scale) (sum and sum of squares,
    in float64, through one min and one max all-reduce); any difference stops every rank at
    once, naming the first variable that differs. BatchNorm's moving statistics are left
    out: each rank updates them from its own batches until the epoch end averages them; so
    are the local gradient sums of an accumulation window (``local_variables()`` of
    ``lars_tf.DistributedOptimizer``)."""

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
            # each rank's own gradient sums within an accumulation window differ by design
            local = getattr(self.optimizer, "local_variables", lambda: [])()
            known = {id(v) for v in [*variables, *local]}
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
                f"first differing variable {keras_compat.variable_path(v)!r} (checksum "
                f"{lo[differ[0]]!r} to "
                f"{hi[differ[0]]!r} over ranks; {len(set(differ // 2))} of {len(variables)} "
                "variables differ)")


class StopOnStuckLossScale(tf.keras.callbacks.Callback):
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
        scale, good_steps = precision.loss_scale_state(self.model.optimizer)
        at_min = scale <= 1.0 and good_steps == 0
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


class EpochTimer(tf.keras.callbacks.Callback):
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


class AverageMetrics(tf.keras.callbacks.Callback):
    """At each epoch end, the metrics in the logs so far (training loss, accuracy, ...:
    each rank's own, from its own batches) become their mean over ranks, in one
    all-reduce; put it before callbacks that add figures of their own."""

    def on_epoch_end(self, epoch, logs=None):
        if not logs:
            return
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float, np.number))
                      or (hasattr(v, "shape") and not v.shape))
        total = distributed.allreduce_sum([float(logs[k]) for k in keys],
                                          name="lars_tf.metrics")
        for k, v in zip(keys, total):
            logs[k] = float(v) / distributed.size()


class AverageBatchNormStatistics(tf.keras.callbacks.Callback):
    """At each epoch end, BatchNorm moving statistics (updated by each rank from its own
    batches) become their mean over ranks: the model evaluated and saved is the same on
    every rank."""

    def on_epoch_end(self, epoch, logs=None):
        distributed.average_variables(self.model.non_trainable_variables,
                                      name="lars_tf.non_trainable")


class ExactEval(tf.keras.callbacks.Callback):
    """Exact eval over all ranks: each rank sums loss, top-1 and top-5 hits and examples over
    its share of the eval set (which it counts as it goes), and the sums are all-reduced.
    Runs every ``every`` epochs and always after ``last_epoch`` (1-based), the last epoch of
    this run, so that a run's summary never reports a stale accuracy."""

    def __init__(self, dataset, every: int, last_epoch: int, num_classes: int):
        super().__init__()
        self.dataset, self.every, self.last_epoch = dataset, every, last_epoch
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
        if self.dataset is None or ((epoch + 1) % self.every and epoch + 1 != self.last_epoch):
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


class SkippedRecords(tf.keras.callbacks.Callback):
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


class TimeToAccuracy(tf.keras.callbacks.Callback):
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


class LearningRateLogger(tf.keras.callbacks.Callback):
    """The learning rate that the last update of the epoch used, into the logs; and, under
    loss scaling, the loss scale at the epoch's end."""

    def __init__(self, optimizer):
        super().__init__()
        self.stack = optimizer
        self.optimizer = precision.innermost_optimizer(optimizer)

    def on_epoch_end(self, epoch, logs=None):
        lr = self.optimizer._learning_rate
        if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
            lr = lr(self.optimizer.iterations - 1)
        logs["learning_rate"] = float(lr)
        if precision.find_loss_scale_optimizer(self.stack) is not None:
            logs["loss_scale"] = precision.loss_scale_state(self.stack)[0]


class GradientNoiseScale(tf.keras.callbacks.Callback):
    """Each epoch's gradient noise scale ``B_simple`` (McCandlish et al. 2018), into the
    logs (so the epoch log, TensorBoard and the run summary's history get it), from a
    ``lars_tf.DistributedOptimizer`` made with ``noise_scale_every=N``.

    ``pass_batch_size`` is ``b``, the examples of one backward pass on one rank (global
    batch / (ranks x backward_passes_per_step)). Logs ``noise_scale`` (``B_simple`` in
    examples: ``tr(S) / |G|^2``), ``grad_sq_norm`` (``|G|^2``) and ``grad_noise_trace``
    (``tr(S)``), each from the epoch's mean of the unbiased per-update estimates, numerator
    and denominator averaged apart and then divided, as the paper smooths them (it uses
    moving averages; an epoch is the window here). When the epoch's ``|G|^2`` estimate is
    not positive (noise dominates the mean gradient, late in training) ``noise_scale`` is
    left out. Every rank computes the same figures."""

    def __init__(self, optimizer, pass_batch_size: int):
        super().__init__()
        found = optimizer
        while found is not None and not getattr(found, "noise_scale_every", 0):
            found = getattr(found, "inner_optimizer", None)
        if found is None:
            raise ValueError("GradientNoiseScale: the optimizer measures no noise scale; "
                             "make it lars_tf.DistributedOptimizer(..., noise_scale_every=N)")
        self.optimizer, self.pass_batch_size = found, int(pass_batch_size)

    def on_epoch_begin(self, epoch, logs=None):
        self.optimizer.reset_noise_scale_stats()

    def on_epoch_end(self, epoch, logs=None):
        stats = self.optimizer.noise_scale_stats()
        if logs is None or not stats.get("count"):
            return
        g2 = stats["g2_sum"] / stats["count"]
        trace = self.pass_batch_size * stats["trace_per_pass_sum"] / stats["count"]
        logs["grad_sq_norm"] = g2
        logs["grad_noise_trace"] = trace
        if g2 > 0:
            logs["noise_scale"] = trace / g2


class EpochLog(tf.keras.callbacks.Callback):
    """Appends each epoch's figures (the logs of the callbacks before it) to ``history``."""

    def __init__(self, history: list):
        super().__init__()
        self.history = history

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        self.history.append(row)


class LogEpoch(tf.keras.callbacks.Callback):
    """One log line per epoch from the row ``EpochLog`` (before it) added to ``history``
    (add it on rank 0 only)."""

    def __init__(self, history: list):
        super().__init__()
        self.history = history

    def on_epoch_end(self, epoch, logs=None):
        row = self.history[-1]
        test = row.get("test_accuracy")
        logging.info(
            "epoch %3d  loss %.4f  train acc %.4f  test acc %s  lr %.4g  %.0f images/sec%s",
            row["epoch"], row.get("loss", math.nan), row.get("accuracy", math.nan),
            "  -   " if test is None else f"{test:.4f}", row.get("learning_rate", math.nan),
            row.get("images_per_sec", math.nan),
            f"  B_simple {row['noise_scale']:.0f}" if "noise_scale" in row else "")


class LogFirstUpdate(tf.keras.callbacks.Callback):
    """One log line when the first update of this process's run (or of an elastic job
    since its last reset) is done: the time a start, restart or reset cost is the time to
    this line (add it on rank 0 only; ``done`` is shared by the calls of one run)."""

    def __init__(self, done: list):
        super().__init__()
        self.done = done

    def on_train_batch_end(self, batch, logs=None):
        if not self.done:
            self.done.append(True)
            logging.info("first update done (update %d of the run)",
                         int(self.model.optimizer.iterations.numpy()))


class SaveCheckpoints(tf.keras.callbacks.Callback):
    """Rank 0: an atomic checkpoint every N epochs and at the last epoch of this run."""

    def __init__(self, model_dir: str, every: int, keep: int, model, optimizer, history: list,
                 tta, t_begin: float, end_epoch: int):
        """``model_dir``: where ``checkpoints/`` goes; a checkpoint every ``every`` epochs
        and at ``end_epoch``, the newest ``keep`` kept; ``history`` (the per-epoch
        figures), ``tta`` (a ``TimeToAccuracy``) and ``t_begin`` (the run's start, for the
        elapsed time) go into each checkpoint's ``meta.json``."""
        super().__init__()
        # the Trainer's model: Keras' self.model is what fit runs, which with
        # --normalize_on_device wraps it
        self.saved_model = model
        self.model_dir, self.every, self.keep = model_dir, every, keep
        self.optimizer, self.history = optimizer, history
        self.tta, self.t_begin, self.end_epoch = tta, t_begin, end_epoch

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every and done != self.end_epoch:
            return
        meta = {"history": list(self.history),  # EpochLog has added this epoch
                "elapsed_sec": time.time() - self.t_begin,
                "time_to_accuracy": self.tta.result,
                "step": int(self.optimizer.iterations.numpy())}
        path = checkpoint.save(self.model_dir, done, self.saved_model, self.optimizer, meta,
                               keep=self.keep)
        logging.info("checkpoint %s", path)
