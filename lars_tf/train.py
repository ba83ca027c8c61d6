"""The trainer: config, data, model and the optimizer stack wired into Keras' ``fit``."""

from __future__ import annotations

import time

import tensorflow as tf
from absl import logging

from lars_tf import build, checkpoint, distributed, keras_compat
from lars_tf import callbacks as cb
from lars_tf import data as data_lib
from lars_tf import precision as precision_lib
from lars_tf import summary as summary_lib
from lars_tf.config import TrainConfig


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
        config, world, outputs = self.config, self.world, self.outputs
        t_start = time.time()
        resume = self._find_checkpoint()
        start_epoch = resume[0] if resume else 0
        datasets = self._datasets(train, eval, steps_per_epoch, start_epoch)
        if self.model is None:
            self.model = build.build_model(config, datasets.input_shape, datasets.num_classes)
        model = self.model
        num_classes = build.num_classes(model, datasets.input_shape)
        optimizer = build.build_optimizer(config, datasets.steps_per_epoch)
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
        outputs.started(self, datasets, start_epoch, end_epoch)

        elapsed_before = float(meta.get("elapsed_sec", 0.0))
        tta = cb.TimeToAccuracy(config.target_accuracy, t_start - elapsed_before,
                                meta.get("time_to_accuracy"))
        fp16 = config.precision == "mixed_float16"
        k = config.backward_passes_per_step
        callbacks = [
            cb.ReseedLayers(model, data_lib.rank_seed(config.seed, world.rank)),
            *([cb.StopOnNonFinite(world.rank, datasets.steps_per_epoch)] if not fp16 else []),
            *([cb.StopOnStuckLossScale(config.max_skipped_updates, k, datasets.steps_per_epoch)]
              if fp16 and config.max_skipped_updates else []),
            *([cb.CheckReplicas(config.check_replicas_every, optimizer)]
              if config.check_replicas_every else []),
            *([cb.Watchdog(config.watchdog_sec, world.rank)] if config.watchdog_sec else []),
            cb.AverageMetrics(),
            cb.EpochTimer(config.global_batch_size * datasets.steps_per_epoch // k),
            cb.AverageBatchNormStatistics(),
            cb.ExactEval(datasets.eval, config.eval_every, end_epoch, num_classes),
            cb.SkippedRecords(datasets.skipped),
            tta,
            cb.LearningRateLogger(optimizer),
            *([cb.GradientNoiseScale(optimizer, config.per_rank_batch_size(world.size))]
              if config.noise_scale_every else []),
            cb.EpochLog(self.history),
            *(callbacks or []),
            # last: a checkpoint holds what the user's callbacks did at the epoch's end
            *outputs.callbacks(self, optimizer, tta, t_start - elapsed_before, end_epoch),
        ]
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
        summary = summary_lib.run_summary(self, datasets, elapsed_before + time.time() - t_start,
                                          tta, start_epoch, end_epoch)
        outputs.finished(summary)
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
