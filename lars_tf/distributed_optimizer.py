"""``lars_tf.DistributedOptimizer``: any Keras optimizer (Keras 3, or Keras 2 on the legacy
stack), with gradients all-reduced through Horovod's ops and, under ``mixed_float16``,
dynamic loss scaling around the all-reduce.

Horovod 0.28.1's own ``hvd.DistributedOptimizer`` is written for Keras 2: wrapped around a
Keras 3 optimizer it raises nothing and all-reduces nothing (the ranks drift apart). This
class does the all-reduce itself with Horovod's ops (in buckets, the last layers' first, each
started as soon as its gradients exist), so tensor fusion, the cycle time, the response
cache, the timeline, autotune and the launchers' settings all apply as they do to Horovod's
own optimizer. The same class serves both stacks: what is Keras' protocol (``apply`` on
Keras 3, ``minimize``/``apply_gradients`` on Keras 2) comes from
``keras_compat.DistributedOptimizerBase``; everything here is written once.

Where loss scaling sits. One update, from the loss to the weights::

    loss * S -> backward pass -> [accumulate k passes] -> all-reduce of the scaled gradients
             -> finite?  yes: divide by S, update (the wrapped optimizer), S grows after a
                              run of good updates
                         no:  skip the update, halve S

The finite check runs on the *all-reduced* gradients, which are the same on every rank (an
Inf/NaN on one rank is Inf/NaN in the sum every rank receives), so every rank takes the
same skip decision and keeps the same S. This class is a Keras loss-scale optimizer (it
owns S): so ``model.compile`` under ``mixed_float16`` does not wrap it in a loss-scale
optimizer of Keras' own, which would check each rank's local gradients before the
all-reduce, let the ranks decide differently and hang the job.
"""

from __future__ import annotations

import warnings

import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util

from lars_tf import keras_compat, precision
from lars_tf.config import BUCKET_MB

# lars_tf.distributed (Horovod) is imported where the optimizer runs, not here: `import
# lars_tf` registers this class for loading saved models without loading Horovod.

# What marks an optimizer as wrapped by Horovod's Keras 2 DistributedOptimizer (which,
# around a Keras 3 optimizer, silently does not all-reduce).
_HOROVOD_WRAPPER_ATTRIBUTES = ("_allreduce_grads", "_agg_helper")

# Keras' base-optimizer arguments with their defaults: this wrapper has no use for them
# (they belong to the optimizer it wraps), so a value other than the default is refused
# instead of being silently ignored. (Saved configs of older versions carry the defaults.)
_BASE_ARGUMENT_DEFAULTS = {
    "learning_rate": 0.0, "weight_decay": None, "clipnorm": None, "global_clipnorm": None,
    "clipvalue": None, "use_ema": False, "ema_momentum": 0.99,
    "ema_overwrite_frequency": None, "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}

LOSS_SCALES = ("auto", "dynamic", "none")

# The dtype a gradient crosses the wire in, by compression (unlisted dtypes go as they are).
_WIRE_DTYPES = {"none": {tf.bfloat16: tf.float32},
                "fp16": {tf.bfloat16: tf.float16, tf.float32: tf.float16}}


def check_not_horovod_wrapped(optimizer, where: str) -> None:
    """Refuse an optimizer wrapped by Horovod's Keras ``DistributedOptimizer``, alone or
    inside another wrapper (a loss-scale optimizer)."""
    inner = optimizer
    while inner is not None and not any(hasattr(inner, a) for a in _HOROVOD_WRAPPER_ATTRIBUTES):
        inner = getattr(inner, "inner_optimizer", None)
    if inner is not None:
        harm = ("is written for Keras 2: around a Keras 3 optimizer it all-reduces no "
                "gradient, so the ranks would drift apart silently" if keras_compat.KERAS3
                else "all-reduces the gradients itself: they would be all-reduced twice, "
                "outside the loss scaling")
        raise ValueError(
            f"{where}: this optimizer is wrapped by horovod.tensorflow.keras."
            f"DistributedOptimizer, which {harm}. Pass the plain optimizer and wrap it in "
            "lars_tf.DistributedOptimizer instead")


@keras_compat.register
class DistributedOptimizer(keras_compat.DistributedOptimizerBase):
    """Wraps a Keras optimizer so that applying gradients all-reduces them first, with
    dynamic loss scaling around the all-reduce under ``mixed_float16``.

    Args:
        optimizer: the optimizer that updates the weights (LARS, SGD, Adam, ...).
        compression: ``"none"`` or ``"fp16"``: float32 gradients cross the wire as float16.
        backward_passes_per_step: ``k``: each rank adds up ``k`` local gradients and
            all-reduces their mean once, then ``optimizer`` updates the weights. This
            optimizer's ``iterations`` counts backward passes; the wrapped optimizer's
            counts updates, as every Keras optimizer (Adam's bias correction, a schedule)
            expects, so its schedule is written in updates. Save a model only at the end of
            an accumulation window (a multiple of ``k`` steps per epoch): saving in the
            middle of one raises, as it would store half-accumulated gradients.
        gradient_predivide_factor: ``f``: gradients are divided by ``f`` before the sum
            and by ``size / f`` after it (the same mean, rounded differently).
        sparse_as_dense: all-reduce sparse gradients (``tf.IndexedSlices``, from an
            ``Embedding``) as dense tensors. ``None`` turns it on exactly when
            accumulation or a predivide factor is used, which need dense tensors;
            otherwise sparse gradients are all-gathered, as Horovod does.
        average: the mean over ranks (``True``) or the sum.
        loss_scale: ``"auto"``: dynamic loss scaling when Keras' global dtype policy is
            ``mixed_float16`` as this optimizer is made (set the policy first, as for
            building the model) and ``optimizer`` does not scale the loss itself;
            ``"dynamic"``: always; ``"none"``: never.
        initial_scale: the loss scale ``S`` to start from (Keras' ``LossScaleOptimizer``'s).
        dynamic_growth_steps: how many good updates in a row double it (Keras' too).
        noise_scale_every: ``N > 0``: measure the gradient noise scale on every N-th update
            (see ``noise_scale_stats``; 0, the default, measures nothing). It needs more
            than one gradient per update: 2+ ranks, or ``backward_passes_per_step > 1``.
        bucket_mb: dense gradients are all-reduced in buckets of about this many MiB, the
            last layers' first, each starting once its gradients exist (see ``allreduce``);
            0: one all-reduce op per gradient.

    The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch
    Training", Appendix A) from what the update computes anyway: each backward pass's
    local gradient ``g_i`` (``b`` examples) and their mean ``g`` over the ``r = ranks x k``
    passes of the update (``B = r b`` examples). With ``|g_small|^2`` the mean of
    ``|g_i|^2`` (one more scalar in the all-reduce) and ``|g_big|^2 = |g|^2``::

        |G|^2     ~ (r |g_big|^2 - |g_small|^2) / (r - 1)       (unbiased)
        tr(S) / b ~ (|g_small|^2 - |g_big|^2) r / (r - 1)        (unbiased)
        B_simple  = tr(S) / |G|^2

    where ``S`` is the per-example gradient covariance. Both estimates are summed over
    the measured updates (after unscaling, and only for finite gradients);
    ``lars_tf.callbacks.GradientNoiseScale`` turns each epoch's means into ``B_simple``
    in examples.

    A skipped update (non-finite gradients) still counts as an update for the wrapped
    optimizer's ``iterations``, so its learning-rate schedule stays tied to the data seen:
    the ``j``-th update of a run uses ``lr(j)`` whatever was skipped before it (as Keras'
    loss-scale optimizers count skipped steps too).

    Usage (under ``horovodrun``, after ``lars_tf.init()``; in a plain process that no
    launcher started it is a world of one, and all-reduces nothing)::

        keras.mixed_precision.set_global_policy("mixed_float16")   # optional
        model = ...
        model.compile(optimizer=lars_tf.DistributedOptimizer(lars_tf.LARS(1.0)), loss=...)

    On Keras 2 the same works with ``tf.keras``; a custom loop there scales the loss with
    ``get_scaled_loss`` (or calls ``minimize``) and passes the scaled gradients to
    ``apply_gradients`` as they are: they are unscaled after the all-reduce.

    Horovod's ops have no XLA kernels: a training step compiled with XLA is refused (on
    Keras 3 already at ``compile(jit_compile=True)``, and Keras' default
    ``jit_compile="auto"`` is turned off, with one warning where it would have turned XLA
    on, i.e. where a GPU is found).
    """

    def __init__(self, optimizer, compression: str = "none", backward_passes_per_step: int = 1,
                 gradient_predivide_factor: float = 1.0, sparse_as_dense: bool | None = None,
                 average: bool = True, loss_scale: str = "auto",
                 initial_scale: float = 2.0 ** 15, dynamic_growth_steps: int = 2000,
                 noise_scale_every: int = 0, bucket_mb: float = BUCKET_MB,
                 name: str | None = None, **kwargs):
        check_not_horovod_wrapped(optimizer, "lars_tf.DistributedOptimizer")
        if not isinstance(optimizer, tf.keras.optimizers.Optimizer):
            raise ValueError(f"lars_tf.DistributedOptimizer wraps a Keras optimizer "
                             f"(tf.keras.optimizers.Optimizer), got {type(optimizer).__name__}")
        for arg, default in _BASE_ARGUMENT_DEFAULTS.items():
            if arg in kwargs and kwargs.pop(arg) != default:
                raise ValueError(
                    f"lars_tf.DistributedOptimizer({arg}=...): this wrapper only all-reduces "
                    f"and scales the loss; give {arg} to the optimizer it wraps "
                    f"({type(optimizer).__name__}), if that optimizer takes it")
        if kwargs:
            raise ValueError(f"lars_tf.DistributedOptimizer: unknown arguments "
                             f"{', '.join(sorted(kwargs))}")
        if compression not in ("none", "fp16"):
            raise ValueError(f"compression={compression!r}: must be 'none' or 'fp16'")
        if int(backward_passes_per_step) != backward_passes_per_step \
                or backward_passes_per_step < 1:
            raise ValueError(f"--backward_passes_per_step={backward_passes_per_step}: must "
                             "be an integer >= 1")
        if not gradient_predivide_factor > 0:
            raise ValueError(
                f"--gradient_predivide_factor={gradient_predivide_factor}: must be > 0")
        if not bucket_mb >= 0:
            raise ValueError(f"--bucket_mb={bucket_mb}: must be >= 0 (0: one all-reduce op "
                             "per gradient)")
        if loss_scale not in LOSS_SCALES:
            raise ValueError(f"loss_scale={loss_scale!r}: must be one of {LOSS_SCALES}")
        if int(noise_scale_every) != noise_scale_every or noise_scale_every < 0:
            raise ValueError(f"--noise_scale_every={noise_scale_every}: must be an integer "
                             ">= 0 (0: off)")
        inner_scales = precision.find_loss_scale_optimizer(optimizer) is not None
        if loss_scale == "dynamic" and inner_scales:
            raise ValueError(
                "lars_tf.DistributedOptimizer(loss_scale='dynamic') around an optimizer that "
                "scales the loss itself would scale it twice: pass the optimizer inside the "
                "LossScaleOptimizer")
        if loss_scale == "auto":
            loss_scale = ("dynamic" if not inner_scales
                          and keras_compat.global_policy_name() == "mixed_float16" else "none")
        from lars_tf import distributed

        inner_name = getattr(optimizer, "name", None) or type(optimizer).__name__  # Keras 2's
        self._init_base(name or f"Distributed{inner_name}")  # LossScaleOptimizer has none
        self.inner_optimizer = optimizer
        self.compression = compression
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.gradient_predivide_factor = float(gradient_predivide_factor)
        self.sparse_as_dense = distributed.needs_dense_gradients(
            self.backward_passes_per_step, self.gradient_predivide_factor, sparse_as_dense)
        self.average = bool(average)
        self.loss_scale_mode = loss_scale
        self.initial_scale = float(initial_scale)
        self.dynamic_growth_steps = int(dynamic_growth_steps)
        self.noise_scale_every = int(noise_scale_every)
        self.bucket_mb = float(bucket_mb)
        # An elastic job's ranks read unequal slices of the global batch: this rank's mean
        # gradient weighs count * ranks / global batch in the mean (lars_tf.data.elastic).
        # Read when the training step is traced (an elastic reset traces it again).
        self.batch_share = 1.0
        # False: the check that every rank holds the same variables waits for the caller
        # (an elastic rank runs no collective before it joins the others)
        self.check_variables_when_built = True
        if self.scales_loss and hasattr(optimizer, "loss_scale_factor"):
            optimizer.loss_scale_factor = None  # Keras 3: scaled once, here

    @property
    def scales_loss(self) -> bool:
        """Whether this optimizer scales the loss (dynamic loss scaling)."""
        return self.loss_scale_mode == "dynamic"

    # -- the all-reduce ------------------------------------------------------------------
    def allreduce(self, grads: list) -> list:
        """Every rank's gradients combined (mean or sum); ``None`` stays ``None``. In a
        world of one, the gradients as given.

        Dense gradients go in buckets of about ``bucket_mb`` MiB, taken in reverse order
        (the backward pass computes the last layers' gradients first), one Horovod group
        all-reduce per bucket: in the training step's graph a bucket starts as soon as its
        last gradient exists, while the backward pass goes on, and Horovod all-reduces its
        tensors together (one negotiation, one fused buffer). Horovod's background thread
        also fuses buckets that are ready at the same time (``HOROVOD_FUSION_THRESHOLD``,
        ``HOROVOD_CYCLE_TIME``). With ``bucket_mb=0`` every gradient is an op of its own.
        A bucket holds one dtype, and each gradient keeps its dtype on the wire (so
        float32 and float64 gradients mix), except bfloat16, which Horovod's op does not
        take: it is sent as float32 (float16 with ``compression="fp16"``), as are float32
        gradients under compression.
        """
        from lars_tf import distributed

        if not distributed.is_initialized():
            return list(grads)  # a world of one (checked in build)
        size = distributed.size()
        f = self.gradient_predivide_factor
        prescale, postscale = 1.0 / f, (f / size if self.average else f)
        # Horovod wants the same scale factors on every rank: an unequal share is a multiply
        share = self.batch_share
        out: list = [None] * len(grads)
        dense = []  # (position, tensor as it crosses the wire, its dtype)
        for i, g in enumerate(grads):
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):  # all-gathered: exact, nothing summed
                if share != 1.0:
                    g = tf.IndexedSlices(g.values * tf.cast(share, g.values.dtype),
                                         g.indices, g.dense_shape)
                out[i] = distributed.allreduce_sparse(g, average=self.average)
                continue
            g = tf.convert_to_tensor(g)
            if share != 1.0:
                g = g * tf.cast(share, g.dtype)
            wire = _WIRE_DTYPES[self.compression].get(g.dtype, g.dtype)
            dense.append((i, tf.cast(g, wire), g.dtype))
        for bucket in buckets(dense, int(self.bucket_mb * 2 ** 20)):
            reduced = distributed.grouped_allreduce_gradients(
                [t for _, t, _ in bucket], prescale_factor=prescale,
                postscale_factor=postscale)
            for (i, _, dtype), r in zip(bucket, reduced):
                out[i] = tf.cast(r, dtype)
        return out

    # -- what both stacks' protocols call ------------------------------------------------
    def _build_state(self, var_list: list) -> None:
        """This optimizer's own variables, once, after the wrapped optimizer's: the
        accumulators (``k > 1``) and the loss scale with its good-update counter."""
        if self.check_variables_when_built:
            with tf.init_scope():  # eager even when the first apply is being traced
                self.check_same_variables_on_every_rank(var_list)
        if self.backward_passes_per_step > 1:
            self._accumulators = [self._new_slot(v, "accumulated_gradient") for v in var_list]
        if self.scales_loss:
            self.step_counter = self._new_scalar("step_counter", "int64", 0)
            self.dynamic_scale = self._new_scalar("dynamic_scale", "float32",
                                                  self.initial_scale)
        if self.noise_scale_every:
            from lars_tf import distributed

            with tf.init_scope():
                r = self.backward_passes_per_step * (
                    distributed.size() if distributed.is_initialized() else 1)
            if r < 2:
                raise ValueError(
                    f"--noise_scale_every={self.noise_scale_every}: the gradient noise scale "
                    "compares the gradients of the backward passes of an update with their "
                    "mean, and this update has one (1 rank, backward_passes_per_step=1): "
                    "run 2+ ranks or accumulate 2+ passes")
            self._gradients_per_update = r
            # this rank's sum of |g_i|^2 over the window's passes (local, like the
            # accumulators); the sums of the two estimates and how many updates they hold
            self._pass_sq_norms = self._new_scalar("pass_sq_norms", "float32", 0.0)
            self.noise_g2_sum = self._new_scalar("noise_g2_sum", "float64", 0.0)
            self.noise_trace_sum = self._new_scalar("noise_trace_sum", "float64", 0.0)
            self.noise_count = self._new_scalar("noise_count", "int64", 0)

    def check_same_variables_on_every_rank(self, var_list) -> None:
        """Gradients are all-reduced by position: every rank must hold the same variables
        (path, shape, dtype) in the same order, or equal-shaped gradients of different
        variables would be summed, or the all-reduce would hang. Checked once, when the
        optimizer is built, by gathering every rank's list; a difference stops every rank
        with the same message."""
        from lars_tf import distributed

        if distributed.size_or_one("lars_tf.DistributedOptimizer") == 1:
            return
        mine = [(keras_compat.variable_path(v), tuple(v.shape), tf.as_dtype(v.dtype).name)
                for v in var_list]
        every = distributed.gather_object(mine, name=f"lars_tf.variables.{self.name}")
        for rank, theirs in enumerate(every):
            if theirs == every[0]:
                continue
            i = next((i for i, (a, b) in enumerate(zip(every[0], theirs)) if a != b),
                     min(len(theirs), len(every[0])))
            raise ValueError(
                "lars_tf.DistributedOptimizer: the ranks hold different trainable variables, "
                f"and gradients are all-reduced by position: variable {i} is "
                f"{_describe(every[0], i)} on rank 0 but {_describe(theirs, i)} on rank "
                f"{rank}. Build the same model, in the same order, on every rank")

    def _apply_distributed(self, grads: list, trainable_variables: list) -> None:
        """One backward pass's (scaled) gradients: accumulated, or all-reduced and applied
        at the end of a window; ``iterations`` counts the pass."""
        if control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()):
            raise ValueError(JIT_REFUSED)
        if self.sparse_as_dense:
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                     for g in grads]
        if self.noise_scale_every:
            self._pass_sq_norms.assign_add(tf.cond(
                self._measures_noise(), lambda: _squared_norm(grads), lambda: 0.0))
        k = self.backward_passes_per_step
        if k == 1:
            self._update(*self._reduce(grads), trainable_variables)
        else:
            for acc, g in zip(self._accumulators, grads):
                if g is not None:
                    acc.assign_add(tf.cast(g, acc.dtype))

            def update():
                mean = [None if g is None else acc / k
                        for acc, g in zip(self._accumulators, grads)]
                self._update(*self._reduce(mean), trainable_variables)
                for acc in self._accumulators:
                    acc.assign(tf.zeros_like(acc))
                return tf.constant(True)

            tf.cond(tf.equal((self._iterations + 1) % k, 0), update,
                    lambda: tf.constant(False))
        self._iterations.assign_add(1)

    def _measures_noise(self) -> tf.Tensor:
        """Whether the update this backward pass belongs to measures the noise scale."""
        update = self._iterations // self.backward_passes_per_step
        return tf.equal(update % self.noise_scale_every, 0)

    def _reduce(self, grads: list) -> tuple[list, tf.Tensor | None]:
        """The all-reduced gradients and, when the noise scale is measured, the ranks' mean
        of this window's mean squared pass norm: one scalar more, all-reduced beside the
        gradients (Horovod fuses it with them), so measuring adds no round trip."""
        from lars_tf import distributed

        reduced = self.allreduce(grads)
        if not self.noise_scale_every:
            return reduced, None
        small = self._pass_sq_norms / float(self.backward_passes_per_step)
        if distributed.is_initialized():
            small = distributed.allreduce_gradient(small,
                                                   postscale_factor=1.0 / distributed.size())
        return reduced, small

    def _record_noise(self, grads: list, small: tf.Tensor, scale) -> None:
        """Add this update's two unbiased estimates (see the class docstring) to their sums,
        from the all-reduced mean gradient ``grads`` and the ranks' mean squared pass norm
        ``small``, both still multiplied by the loss scale ``scale``. Every rank gets the
        same figures. Called at the end of a window, on every rank alike."""

        def measure():
            r = float(self._gradients_per_update)
            big = _squared_norm(grads)
            s2 = tf.square(tf.cast(scale, tf.float64))
            small_, big = tf.cast(small, tf.float64) / s2, tf.cast(big, tf.float64) / s2
            g2 = (r * big - small_) / (r - 1.0)
            trace = (small_ - big) * r / (r - 1.0)
            ok = tf.math.is_finite(g2) & tf.math.is_finite(trace)
            self.noise_g2_sum.assign_add(tf.where(ok, g2, tf.zeros_like(g2)))
            self.noise_trace_sum.assign_add(tf.where(ok, trace, tf.zeros_like(trace)))
            self.noise_count.assign_add(tf.cast(ok, tf.int64))
            return tf.constant(True)

        # the window's passes all had the same verdict (one update index)
        tf.cond(self._measures_noise(), measure, lambda: tf.constant(False))
        self._pass_sq_norms.assign(0.0)

    def noise_scale_stats(self) -> dict:
        """The sums since the last reset: ``g2_sum`` (of the estimates of ``|G|^2``),
        ``trace_per_pass_sum`` (of ``tr(S) / b``, ``b`` the examples of one backward pass
        on one rank) and ``count`` (the updates they hold). ``B_simple = b *
        trace_per_pass_sum / g2_sum``. Empty when the noise scale is not measured."""
        if not self.noise_scale_every or not self.is_built:
            return {}
        return {"g2_sum": float(self.noise_g2_sum.numpy()),
                "trace_per_pass_sum": float(self.noise_trace_sum.numpy()),
                "count": int(self.noise_count.numpy())}

    def reset_noise_scale_stats(self) -> None:
        """Start new sums (``GradientNoiseScale`` does at every epoch's start; the same on
        every rank)."""
        if self.noise_scale_every and self.is_built:
            for v in (self.noise_g2_sum, self.noise_trace_sum, self.noise_count):
                v.assign(tf.zeros_like(v))

    def _update(self, grads: list, small: tf.Tensor | None,
                trainable_variables: list) -> None:
        """One weight update from the all-reduced (still scaled) gradients: unscaled,
        checked and applied, or skipped, the same way on every rank. ``small``: see
        ``_reduce``."""
        if not self.scales_loss:
            if self.noise_scale_every:
                self._record_noise(grads, small, 1.0)
            self._inner_apply(grads, trainable_variables)
            return

        def apply_finite():
            scale = self.dynamic_scale
            if self.noise_scale_every:
                self._record_noise(grads, small, scale)
            self._inner_apply(
                [None if g is None else g / tf.cast(scale, g.dtype) for g in grads],
                trainable_variables)
            grow = tf.equal(self.step_counter, self.dynamic_growth_steps - 1)
            self.step_counter.assign(tf.where(grow, tf.zeros_like(self.step_counter),
                                              self.step_counter + 1))
            self.dynamic_scale.assign(tf.where(grow, scale * 2.0, scale))
            return tf.constant(True)

        def skip():
            if self.noise_scale_every:
                self._pass_sq_norms.assign(0.0)
            self.step_counter.assign(tf.zeros_like(self.step_counter))
            self.dynamic_scale.assign(self.dynamic_scale * 0.5)
            self.inner_optimizer.iterations.assign_add(1)  # the schedule counts it
            return tf.constant(False)

        tf.cond(_all_finite(grads), apply_finite, skip)

    def _scaled(self, loss):
        scale = self.dynamic_scale if self.is_built else self.initial_scale
        return loss * tf.cast(scale, loss.dtype)

    def _check_window_end(self) -> None:
        k = self.backward_passes_per_step
        if k > 1 and int(self._iterations.numpy()) % k:
            raise ValueError(
                f"lars_tf.DistributedOptimizer: saving after backward pass "
                f"{int(self._iterations.numpy())}, in the middle of an accumulation window "
                f"of backward_passes_per_step={k}, would store half-accumulated gradients. "
                f"Save at the end of a window: make steps_per_epoch a multiple of {k}")

    def local_variables(self) -> list:
        """This rank's own state: the gradient sums of the accumulation window and its
        pass norms (zero at every window's end, so at every checkpoint), which differ
        between ranks."""
        return [*getattr(self, "_accumulators", []),
                *([self._pass_sq_norms] if hasattr(self, "_pass_sq_norms") else [])]

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": tf.keras.optimizers.serialize(self.inner_optimizer),
            "compression": self.compression,
            "backward_passes_per_step": self.backward_passes_per_step,
            "gradient_predivide_factor": self.gradient_predivide_factor,
            "sparse_as_dense": self.sparse_as_dense,
            "average": self.average,
            # resolved: a load does not depend on the policy
            "loss_scale": self.loss_scale_mode,
            "initial_scale": self.initial_scale,
            "dynamic_growth_steps": self.dynamic_growth_steps,
            "noise_scale_every": self.noise_scale_every,
            "bucket_mb": self.bucket_mb,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = tf.keras.optimizers.deserialize(config.pop("optimizer"),
                                                custom_objects=custom_objects)
        return cls(inner, **config)


def buckets(dense: list, cap_bytes: int) -> list[list]:
    """``dense``, a list of ``(position, tensor, ...)`` in the order of the model's variables,
    split into the groups that are all-reduced together: in reverse order (the backward
    pass computes the last layers' gradients first), one dtype per group (a Horovod group
    has one), a group closed once it holds ``cap_bytes`` (``0``: every tensor alone); the
    groups left open at the end follow, ordered by position."""
    done, open_ = [], {}
    for item in reversed(dense):
        t = item[1]
        group = open_.setdefault(t.dtype, [])
        group.append(item)
        size = sum(x[1].shape.num_elements() or 0 for x in group) * t.dtype.size
        if size >= cap_bytes:
            done.append(open_.pop(t.dtype))
    # the buckets left open, in the order the backward pass completes them
    return done + sorted(open_.values(), key=lambda group: -group[-1][0])


def _squared_norm(grads: list) -> tf.Tensor:
    """The squared L2 norm of all gradients together, in float32 (a sparse gradient's
    repeated rows added up first, as its dense form would have them)."""
    total = tf.constant(0.0, tf.float32)
    for g in grads:
        if g is None:
            continue
        if isinstance(g, tf.IndexedSlices):
            rows, position = tf.unique(g.indices)
            g = tf.math.unsorted_segment_sum(g.values, position, tf.size(rows))
        total += tf.reduce_sum(tf.square(tf.cast(g, tf.float32)))
    return total


def _all_finite(grads: list) -> tf.Tensor:
    """True when no gradient holds an Inf or NaN."""
    checks = [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def _describe(variables: list, i: int) -> str:
    """Variable ``i`` of a rank's (path, shape, dtype) list, for a message."""
    if i >= len(variables):
        return f"no variable {i} (it has {len(variables)})"
    path, shape, dtype = variables[i]
    return f"{path!r} {list(shape)} {dtype}"


JIT_REFUSED = (
    "jit_compile=True with lars_tf.DistributedOptimizer: Horovod's all-reduce has no XLA "
    "kernel, so a training step that holds it cannot be compiled with XLA. Compile with "
    "jit_compile=False (or leave Keras' default 'auto', which lars_tf turns off)")


def _uses_distributed_optimizer(model) -> bool:
    optimizer = getattr(model, "optimizer", None)
    while optimizer is not None:
        if isinstance(optimizer, DistributedOptimizer):
            return True
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return False


def guard_jit_compile() -> None:
    """Make Keras' ``compile`` refuse ``jit_compile=True`` for a model whose optimizer is a
    ``DistributedOptimizer`` (at compile time, naming the cause, instead of XLA's raw "No
    registered HorovodGroupedAllreduce kernel" at the first step), and resolve
    ``jit_compile="auto"`` to False for it, with one warning where Keras would have turned
    XLA on (a GPU is found). Other models compile as before. Installed once, when the first
    ``DistributedOptimizer`` is made."""
    from keras.src.trainers.trainer import Trainer

    if getattr(Trainer, "_lars_tf_jit_guard", False):
        return
    prop, resolve = Trainer.jit_compile, Trainer._resolve_auto_jit_compile

    def set_jit_compile(model, value):
        if value and _uses_distributed_optimizer(model):
            raise ValueError(JIT_REFUSED)
        prop.fset(model, value)

    def resolve_auto(model):
        wanted = resolve(model)
        if wanted and _uses_distributed_optimizer(model):
            if getattr(model, "_lars_tf_jit_warned", False):
                return False
            model._lars_tf_jit_warned = True
            warnings.warn(
                "jit_compile='auto' would compile the training step with XLA here, but "
                "Horovod's all-reduce (lars_tf.DistributedOptimizer) has no XLA kernel: "
                "compiling without XLA. Pass jit_compile=False to silence this.", stacklevel=3)
            return False
        return wanted

    Trainer.jit_compile = property(prop.fget, set_jit_compile)
    Trainer._resolve_auto_jit_compile = resolve_auto
    Trainer._lars_tf_jit_guard = True
