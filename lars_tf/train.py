"""The trainer: config, data, model and the optimizer stack wired into Keras' ``fit``."""

from __future__ import annotations

import os
import time

import tensorflow as tf
from absl import logging

from lars_tf import build, checkpoint, distributed, keras_compat
from lars_tf import callbacks as cb
from lars_tf import data as data_lib
from lars_tf import precision as precision_lib
from lars_tf import summary as summary_lib
from lars_tf.config import ELASTIC_JOB_FILE, TrainConfig, elastic_job_id


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
    checkpoints, TensorBoard logs and ``summary.json`` (``lars_tf.summary.ChiefOutputs``).
    """

    def __init__(self, config: TrainConfig, model: tf.keras.Model | None = None):
        if model is not None and config.zero_init_residual:
            raise ValueError("--zero_init_residual applies to registered models (--model); "
                             "build your own model with its residual BatchNorms started at 0")
        self.config = config
        self.world = distributed.init(config.intra_op_threads or None,
                                      config.inter_op_threads or None, config.deterministic)
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
            inter = tf.config.threading.get_inter_op_parallelism_threads()
            if inter != 1 and self.world.is_chief:
                logging.warning(
                    "--deterministic with %d inter-op threads per rank (%s): ops that run "
                    "side by side round differently from run to run, so two identical runs "
                    "can differ. Leave --inter_op_threads at 0 (then --deterministic runs one "
                    "op at a time) and call lars_tf.init() no earlier than the Trainer.",
                    inter, "--inter_op_threads" if config.inter_op_threads
                    else "lars_tf.init() was called before the Trainer")
        precision_lib.set_policy(config.precision)
        tf.keras.utils.set_random_seed(config.seed)
        self.model = model
        self.history: list[dict] = []
        # the one rank-0 check: every log line and file of the run goes through this
        self.outputs = (summary_lib.ChiefOutputs(config) if self.world.is_chief
                        else summary_lib.RunOutputs())

    def fit(self, train: tf.data.Dataset | data_lib.Datasets | None = None,
            eval: tf.data.Dataset | None = None, steps_per_epoch: int | None = None,
            callbacks: list[tf.keras.callbacks.Callback] | None = None) -> dict:
        if self.config.elastic:
            if train is not None:
                raise ValueError("--elastic: the trainer builds the data itself (its epochs "
                                 "are re-cut when ranks come and go); call fit() without "
                                 "datasets")
            return self._fit_elastic(callbacks)
        config, world, outputs = self.config, self.world, self.outputs
        t_start = time.time()
        resume = self._find_checkpoint()
        start_epoch = resume[0] if resume else 0
        datasets = self._datasets(train, eval, steps_per_epoch, start_epoch)
        fitted, optimizer = self._compile(datasets)
        model = self.model
        meta = {}
        if resume and world.is_chief:
            meta = checkpoint.restore(resume[1], model, optimizer)
            logging.info("resumed from %s (epoch %d, step %d)", resume[1], resume[0],
                         int(optimizer.iterations.numpy()))
        meta = distributed.broadcast_object(meta, name="lars_tf.resume_meta")
        self.history = list(meta.get("history", []))
        distributed.broadcast_state(model, optimizer)
        # The initial weights came from --seed (and now from rank 0); what is drawn from
        # here on (dropout masks) comes from (seed, rank), so ranks draw differently, and
        # on Keras 3 from the epoch too (cb.ReseedLayers), so a resumed run repeats them.
        tf.keras.utils.set_random_seed(data_lib.rank_seed(config.seed, world.rank))
        self.rank_settings = distributed.gather_object(distributed.rank_settings(),
                                                       name="lars_tf.rank_settings")
        end_epoch = config.stop_after_epoch or config.epochs
        outputs.started(self._record(), datasets, start_epoch, end_epoch)

        elapsed_before = float(meta.get("elapsed_sec", 0.0))
        tta = cb.TimeToAccuracy(config.target_accuracy, t_start - elapsed_before,
                                meta.get("time_to_accuracy"))
        k = config.backward_passes_per_step
        callbacks = self._callbacks(
            optimizer, datasets, tta, t_start - elapsed_before, end_epoch, callbacks,
            images_per_epoch=config.global_batch_size * datasets.steps_per_epoch // k)
        if start_epoch < end_epoch:
            fitted.fit(
                datasets.train,
                initial_epoch=start_epoch,
                epochs=end_epoch,
                steps_per_epoch=datasets.steps_per_epoch,
                shuffle=False,  # the pipeline shuffles (Keras 3 warns that it would not)
                callbacks=callbacks,
                verbose=1 if outputs.progress_bar else 0,
            )
        summary = summary_lib.run_summary(self._record(), datasets,
                                          elapsed_before + time.time() - t_start, tta,
                                          start_epoch, end_epoch)
        outputs.finished(summary)
        return summary

    def _compile(self, datasets, check_variables: bool = True):
        """The model (built from the registry if none was given) compiled with the optimizer
        stack, which is built. Returns what ``fit`` runs (the model, or the model behind
        its pixel normalisation) and the optimizer."""
        config = self.config
        if self.model is None:
            self.model = build.build_model(config, datasets.input_shape, datasets.num_classes)
        model = self.model
        num_classes = build.num_classes(model, datasets.input_shape)
        optimizer = build.build_optimizer(config, datasets.steps_per_epoch)
        optimizer.check_variables_when_built = check_variables
        # uint8 pixels (--normalize_on_device): fit and evaluate the model behind its
        # normalisation layer; checkpoints and broadcasts stay those of the model itself
        fitted = (build.with_pixel_normalization(model, datasets.input_shape)
                  if datasets.uint8_pixels else model)
        fitted.compile(
            optimizer=optimizer,
            **keras_compat.compile_options(),
            loss=build.build_loss(num_classes, config.label_smoothing),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                     build.top_k_accuracy(5, name="top5")],
        )
        optimizer.build(model.trainable_variables)
        return fitted, optimizer

    def _fit_elastic(self, user_callbacks) -> dict:
        """``fit`` for ``--elastic`` (``lars_tf.elastic``): one Keras ``fit`` per epoch (or
        the rest of one, after a reset), inside ``elastic.run``, with the data re-cut for
        the ranks of the moment. Until the ranks meet in the state's sync, nothing here
        runs a collective: a rank that joins a running job arrives there while the others
        wait in it."""
        from lars_tf import elastic
        from lars_tf.data import elastic as elastic_data

        config = self.config
        t_start = time.time()
        # every rank reads the checkpoint itself (no collective yet); rank 0's wins in sync
        found = checkpoint.latest(config.model_dir) if config.resume and config.model_dir \
            else None
        start_epoch = found[0] if found else 0
        world = self.world
        kw = dict(threads=distributed.threads_per_rank(world.local_size),
                  dtype=precision_lib.compute_dtype(config.precision))
        datasets = data_lib.build_elastic(config, world.rank, world.size, start_epoch, 0, **kw)
        fitted, optimizer = self._compile(datasets, check_variables=False)
        model = self.model
        meta = checkpoint.restore(found[1], model, optimizer) if found else {}
        self.history = list(meta.get("history", []))
        elapsed_before = float(meta.get("elapsed_sec", 0.0))
        tta = cb.TimeToAccuracy(config.target_accuracy, t_start - elapsed_before,
                                meta.get("time_to_accuracy"))
        end_epoch = config.stop_after_epoch or config.epochs
        state = elastic.TrainingState(model, optimizer, epoch=start_epoch,
                                      history=self.history)
        G = config.global_batch_size

        def train(state):
            world = self.world = distributed.init()  # after a reset: the ranks of now
            self.outputs = (summary_lib.ChiefOutputs(config) if world.is_chief
                            else summary_lib.RunOutputs())
            if world.is_chief and config.model_dir and elastic_job_id():
                # a rank this job starts later may find the checkpoints it writes
                summary_lib.write_json(os.path.join(config.model_dir, ELASTIC_JOB_FILE),
                                       {"job": elastic_job_id()})
            optimizer.check_same_variables_on_every_rank(model.trainable_variables)
            optimizer.batch_share = elastic_data.batch_share(G, world.rank, world.size)
            fitted.train_function = None  # traced again: the ranks, the share
            tf.keras.utils.set_random_seed(data_lib.rank_seed(config.seed, world.rank))
            self.rank_settings = distributed.gather_object(distributed.rank_settings(),
                                                           name="lars_tf.rank_settings")
            d = datasets
            started = False
            while state.epoch < end_epoch:
                d = data_lib.build_elastic(config, world.rank, world.size, state.epoch,
                                           state.update, **kw)
                if not started:
                    self.outputs.started(self._record(), d, state.epoch, end_epoch)
                    started = True
                steps = d.steps_per_epoch - state.update
                callbacks = self._callbacks(
                    optimizer, d, tta, t_start - elapsed_before, end_epoch, user_callbacks,
                    images_per_epoch=G * steps,
                    before_log=[elastic.CommitState(state, config.elastic_commit_every,
                                                    config.per_rank_batch_size(
                                                        world.size, world.rank))],
                    last=[elastic.EndEpoch(state)])
                fitted.fit(d.train, initial_epoch=state.epoch, epochs=state.epoch + 1,
                           steps_per_epoch=steps, shuffle=False, callbacks=callbacks,
                           verbose=1 if self.outputs.progress_bar else 0)
            # inside the run: a rank lost here is recovered from too
            summary = summary_lib.run_summary(self._record(), d,
                                              elapsed_before + time.time() - t_start, tta,
                                              start_epoch, end_epoch)
            summary["elastic_resets"] = state.resets
            return summary

        summary = elastic.run(train)(state)
        self.outputs.finished(summary)
        return summary

    def _callbacks(self, optimizer, datasets, tta, t_begin: float, end_epoch: int,
                   user: list | None, images_per_epoch: int, before_log=(), last=()) -> list:
        """The callbacks of a ``fit`` call, in order: the trainer's checks and figures,
        ``before_log``, the epoch log, the user's, the rank-0 outputs, then ``last``."""
        config, world, model = self.config, self.world, self.model
        fp16 = config.precision == "mixed_float16"
        k = config.backward_passes_per_step
        return [
            cb.ReseedLayers(model, data_lib.rank_seed(config.seed, world.rank)),
            *([cb.StopOnNonFinite(world.rank, datasets.steps_per_epoch)] if not fp16 else []),
            *([cb.StopOnStuckLossScale(config.max_skipped_updates, k, datasets.steps_per_epoch)]
              if fp16 and config.max_skipped_updates else []),
            *([cb.CheckReplicas(config.check_replicas_every, optimizer)]
              if config.check_replicas_every else []),
            *([cb.Watchdog(config.watchdog_sec, world.rank)] if config.watchdog_sec else []),
            cb.AverageMetrics(),
            cb.EpochTimer(images_per_epoch),
            cb.AverageBatchNormStatistics(),
            cb.ExactEval(datasets.eval, config.eval_every, end_epoch,
                         build.num_classes(model, datasets.input_shape)),
            cb.SkippedRecords(datasets.skipped),
            tta,
            cb.LearningRateLogger(optimizer),
            *([cb.GradientNoiseScale(optimizer, config.per_rank_batch_size(world.size))]
              if config.noise_scale_every else []),
            *before_log,
            cb.EpochLog(self.history),
            *(user or []),
            # a checkpoint holds what the user's callbacks did at the epoch's end
            *self.outputs.callbacks(self._record(), optimizer, tta, t_begin, end_epoch),
            *last,
        ]

    def _record(self) -> summary_lib.RunRecord:
        return summary_lib.RunRecord(self.config, self.world, self.model, self.history,
                                     self.rank_settings)

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
                                  threads=distributed.threads_per_rank(world.local_size),
                                  dtype=precision_lib.compute_dtype(config.precision))
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
