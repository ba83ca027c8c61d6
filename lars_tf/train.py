"""The trainer: optimizer stack + Keras fit + callbacks + run summary."""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import logging

from lars_tf import data as data_lib
from lars_tf import distributed, models
from lars_tf import precision as precision_lib
from lars_tf.config import TrainConfig
from lars_tf.optimizers import LARS
from lars_tf.schedules import WarmupPolynomialDecay

SUMMARY_FILE = "summary.json"


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
    )


class Trainer:
    """Train any Keras model with the lars_tf stack on every Horovod rank.

    >>> trainer = Trainer(TrainConfig(epochs=2, model_dir="runs/x"))
    >>> summary = trainer.fit()          # under: horovodrun -np 2 python script.py

    ``model`` defaults to ``config.model`` from the registry; ``datasets`` to
    ``config.dataset``. Rank 0 alone logs and writes ``model_dir``.
    """

    def __init__(self, config: TrainConfig, model: tf.keras.Model | None = None):
        self.config = config
        self.world = distributed.init()
        precision_lib.set_policy(config.precision)
        tf.keras.utils.set_random_seed(config.seed)
        self.model = model
        self.history: list[dict] = []

    def fit(self, datasets: data_lib.Datasets | None = None) -> dict:
        config, world = self.config, self.world
        t_start = time.time()
        datasets = datasets or data_lib.build(config, world.rank, world.size)
        if self.model is None:
            self.model = models.get(config.model, datasets.input_shape, datasets.num_classes)
        model = self.model
        optimizer = build_optimizer(config, datasets.steps_per_epoch)
        model.compile(
            optimizer=optimizer,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
        distributed.broadcast_state(model, optimizer)
        if world.is_chief:
            logging.info(
                "training %s on %s: %d ranks x %d passes x %d = global batch %d, "
                "%d updates/epoch, %d epochs, %s lr %.4g, %s", model.name, config.dataset,
                world.size, config.backward_passes_per_step,
                config.per_rank_batch_size(world.size), config.global_batch_size,
                datasets.steps_per_epoch // config.backward_passes_per_step, config.epochs,
                config.optimizer, config.learning_rate, config.precision)

        callbacks = [
            distributed.metric_average_callback(),
            _EpochTimer(config.global_batch_size * datasets.steps_per_epoch
                        // config.backward_passes_per_step),
            _AverageNonTrainable(),
            _GlobalEval(datasets.eval, datasets.eval_examples, config.eval_every,
                        config.epochs),
            _Record(self.history, optimizer, world.is_chief),
        ]
        model.fit(
            datasets.train,
            epochs=config.epochs,
            steps_per_epoch=datasets.steps_per_epoch,
            callbacks=callbacks,
            verbose=0,
        )
        summary = self._summary(datasets, time.time() - t_start)
        if world.is_chief and config.model_dir:
            _write_json(os.path.join(config.model_dir, SUMMARY_FILE), summary)
            logging.info("summary written to %s", os.path.join(config.model_dir, SUMMARY_FILE))
        return summary

    def _summary(self, datasets: data_lib.Datasets, wall: float) -> dict:
        config, world = self.config, self.world
        peak_mb = np.zeros(world.size)
        peak_mb[world.rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        peak_mb = distributed.allreduce_sum(peak_mb, name="lars_tf.peak_rss")
        evals = [h["test_accuracy"] for h in self.history if "test_accuracy" in h]
        # Epoch 1 includes graph tracing; throughput is the mean over the later epochs.
        speeds = [h["images_per_sec"] for h in self.history[1:]] or \
            [h["images_per_sec"] for h in self.history]
        return {
            "final_test_accuracy": evals[-1] if evals else None,
            "best_test_accuracy": max(evals) if evals else None,
            "images_per_sec": float(np.mean(speeds)),
            "epochs": config.epochs,
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
            "config": {k: v for k, v in vars(config).items()},
            "versions": distributed.versions(),
        }


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
    """Exact eval over all ranks: each rank scores its shard, sums are all-reduced."""

    def __init__(self, dataset, examples: int, every: int, epochs: int):
        super().__init__()
        self.dataset, self.examples, self.every, self.epochs = dataset, examples, every, epochs

    def on_epoch_end(self, epoch, logs=None):
        if self.dataset is None or ((epoch + 1) % self.every and epoch + 1 != self.epochs):
            return
        local = self.model.evaluate(self.dataset, verbose=0, return_dict=True) \
            if self.examples else {"loss": 0.0, "accuracy": 0.0}
        n = float(self.examples)
        total = distributed.allreduce_sum(
            [local["loss"] * n, local["accuracy"] * n, n], name="lars_tf.eval")
        logs["test_loss"] = float(total[0] / total[2])
        logs["test_accuracy"] = float(total[1] / total[2])


class _Record(tf.keras.callbacks.Callback):
    """Keeps the per-epoch history; rank 0 logs one line per epoch."""

    def __init__(self, history: list, optimizer, chief: bool):
        super().__init__()
        self.history, self.optimizer, self.chief = history, optimizer, chief

    def on_epoch_end(self, epoch, logs=None):
        opt = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        lr = opt._learning_rate
        if callable(lr):
            lr = lr(opt.iterations)
        row = {"epoch": epoch + 1, "learning_rate": float(lr)}
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
