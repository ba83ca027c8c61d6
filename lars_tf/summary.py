"""What a run leaves behind: the run summary (``summary.json``), its logs, checkpoints and
TensorBoard files, all written by rank 0 alone (``ChiefOutputs``; the other ranks get
``RunOutputs``, which does nothing)."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging

from lars_tf import callbacks as cb
from lars_tf import distributed, presets

SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What the run's outputs read of a training run (the trainer passes this, not itself):
    its config, the Horovod world, the model, the per-epoch history (a list the callbacks
    extend) and each rank's launch settings."""

    config: object
    world: object
    model: object
    history: list
    rank_settings: list


def run_summary(run: RunRecord, datasets, wall: float, tta, start_epoch: int,
                end_epoch: int) -> dict:
    """What ``Trainer.fit`` returns and rank 0 writes to ``summary.json``: accuracy, time to
    accuracy, throughput, peak memory per rank, history, each rank's settings, config,
    versions. Every rank must call it (it all-reduces the peak memory)."""
    config, world = run.config, run.world
    peak_mb = np.zeros(world.size)
    peak_mb[world.rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    peak_mb = distributed.allreduce_sum(peak_mb, name="lars_tf.peak_rss")
    evals = [h for h in run.history if "test_accuracy" in h]
    # The first epoch of a process includes graph tracing: throughput is the mean of the
    # others when there are any.
    timed = [h["images_per_sec"] for h in run.history if "images_per_sec" in h]
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
        "history": run.history,
        "ranks": run.rank_settings,
        "config": dict(vars(config)),
        "versions": distributed.versions(),
    }


# Set by horovodrun/mpirun for each rank (who it is, where to meet): not tuning.
_IDENTITY_VARS = ("HOROVOD_GLOO_", "HOROVOD_HOSTNAME", "HOROVOD_RANK", "HOROVOD_SIZE",
                  "HOROVOD_LOCAL_", "HOROVOD_CROSS_", "HOROVOD_CONTROLLER",
                  "HOROVOD_CPU_OPERATIONS")


def log_rank_settings(ranks: list[dict]) -> None:
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


def write_json(path: str, obj) -> None:
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


class RunOutputs:
    """What a rank other than 0 writes and logs: nothing. The trainer's one ``is_chief``
    check picks this class or ``ChiefOutputs``, so every side effect that must happen once
    (files, logs, the progress bar) lives in ``ChiefOutputs``."""

    progress_bar = False

    def started(self, run: RunRecord, datasets, start_epoch: int, end_epoch: int) -> None:
        """Training is about to begin (every rank has the same state)."""

    def callbacks(self, run: RunRecord, optimizer, tta, t_begin: float,
                  end_epoch: int) -> list:
        """Keras callbacks that write or log during ``fit``."""
        return []

    def finished(self, summary: dict) -> None:
        """The run is over; ``summary`` is what ``Trainer.fit`` returns."""


class ChiefOutputs(RunOutputs):
    """Rank 0: the start-up logs (each rank's settings, the preset, the run's shape), one
    log line per epoch, checkpoints, TensorBoard, and ``summary.json`` in ``model_dir``."""

    def __init__(self, config):
        self.config = config
        self.progress_bar = bool(config.progress_bar)
        self._first_update: list = []  # LogFirstUpdate's, once per ChiefOutputs

    def started(self, run, datasets, start_epoch, end_epoch):
        config, world = self.config, run.world
        log_rank_settings(run.rank_settings)
        if config.preset:
            presets.log_preset(config)
        k = config.backward_passes_per_step
        logging.info(
            "training %s on %s: %d ranks x %d passes x %d = global batch %d, "
            "%d updates/epoch, epochs %d-%d of %d, %s lr %.4g, %s", run.model.name,
            config.dataset, world.size, k, config.per_rank_batch_size(world.size),
            config.global_batch_size, datasets.steps_per_epoch // k, start_epoch + 1,
            end_epoch, config.epochs, config.optimizer, config.learning_rate,
            config.precision)

    def callbacks(self, run, optimizer, tta, t_begin, end_epoch):
        config = self.config
        out = [cb.LogEpoch(run.history), cb.LogFirstUpdate(self._first_update)]
        if config.model_dir:
            if config.checkpoint_every:
                out.append(cb.SaveCheckpoints(
                    config.model_dir, config.checkpoint_every, config.keep_checkpoints,
                    run.model, optimizer, run.history, tta, t_begin, end_epoch))
            out.append(tf.keras.callbacks.TensorBoard(
                os.path.join(config.model_dir, "tensorboard"), update_freq="epoch",
                profile_batch=0, write_graph=False))
        return out

    def finished(self, summary):
        if self.config.model_dir:
            path = os.path.join(self.config.model_dir, SUMMARY_FILE)
            write_json(path, summary)
            logging.info("summary written to %s", path)
