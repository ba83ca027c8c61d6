"""``DistributedOptimizer`` for Keras 3: any Keras 3 optimizer, with gradients all-reduced
through Horovod's ops and, under ``mixed_float16``, dynamic loss scaling around the
all-reduce.

Horovod 0.28.1's own ``hvd.DistributedOptimizer`` is written for Keras 2: wrapped around a
Keras 3 optimizer it raises nothing and all-reduces nothing (the ranks drift apart). This
class does the all-reduce itself, one Horovod all-reduce op per gradient, so tensor fusion, the
cycle time, the response cache, the timeline, autotune and the launchers' settings all
apply as they do to Horovod's own optimizer. (On Keras 2 lars_tf uses Horovod's.)

Where loss scaling sits. One update, from the loss to the weights::

    loss * S -> backward pass -> [accumulate k passes] -> all-reduce of the scaled gradients
             -> finite?  yes: divide by S, update (the wrapped optimizer), S grows after a
                              run of good updates
                         no:  skip the update, halve S

The finite check runs on the *all-reduced* gradients, which are the same on every rank (an
Inf/NaN on one rank is Inf/NaN in the sum every rank receives), so every rank takes the
same skip decision and keeps the same S. This class is a Keras ``LossScaleOptimizer`` (it
owns S): so ``model.compile`` under ``mixed_float16`` does not wrap it in a loss-scale
optimizer of Keras' own, which would check each rank's local gradients before the
all-reduce, let the ranks decide differently and hang the job.
"""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util

from lars_tf import keras_compat

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
    """Refuse an optimizer wrapped by Horovod's Keras 2 ``DistributedOptimizer``, alone or
    inside another wrapper (a loss-scale optimizer)."""
    inner = optimizer
    while inner is not None and not any(hasattr(inner, a) for a in _HOROVOD_WRAPPER_ATTRIBUTES):
        inner = getattr(inner, "inner_optimizer", None)
    if inner is not None:
        raise ValueError(
            f"{where}: this optimizer is wrapped by horovod.tensorflow.keras."
            "DistributedOptimizer, which is written for Keras 2: around a Keras 3 "
            "optimizer it all-reduces no gradient, so the ranks would drift apart "
            "silently. Pass the plain optimizer and wrap it in "
            "lars_tf.DistributedOptimizer instead")


@keras.saving.register_keras_serializable(package="lars_tf")
class DistributedOptimizer(keras.optimizers.LossScaleOptimizer):
    """Wraps a Keras 3 optimizer so that ``apply`` all-reduces the gradients first, with
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
        initial_scale, dynamic_growth_steps: the loss scale ``S`` to start from, and how
            many good updates in a row double it (Keras' ``LossScaleOptimizer``'s).

    A skipped update (non-finite gradients) still counts as an update for the wrapped
    optimizer's ``iterations``, so its learning-rate schedule stays tied to the data seen:
    the ``j``-th update of a run uses ``lr(j)`` whatever was skipped before it (as on
    Keras 2, whose loss-scale optimizer counts skipped steps too).

    Usage (under ``horovodrun``, after ``lars_tf.init()``; in a plain process that no
    launcher started it is a world of one, and all-reduces nothing)::

        keras.mixed_precision.set_global_policy("mixed_float16")   # optional
        model = ...
        model.compile(optimizer=lars_tf.DistributedOptimizer(lars_tf.LARS(1.0)), loss=...)

    Horovod's ops have no XLA kernels: ``jit_compile=True`` is refused, and Keras'
    default ``jit_compile="auto"`` is turned off (with one warning where it would have
    turned XLA on, i.e. where a GPU is found).
    """

    def __init__(self, optimizer, compression: str = "none", backward_passes_per_step: int = 1,
                 gradient_predivide_factor: float = 1.0, sparse_as_dense: bool | None = None,
                 average: bool = True, loss_scale: str = "auto",
                 initial_scale: float = 2.0 ** 15, dynamic_growth_steps: int = 2000,
                 name: str | None = None, **kwargs):
        check_not_horovod_wrapped(optimizer, "lars_tf.DistributedOptimizer")
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(f"lars_tf.DistributedOptimizer wraps a Keras 3 optimizer, got "
                             f"{type(optimizer).__name__}")
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
        if loss_scale not in LOSS_SCALES:
            raise ValueError(f"loss_scale={loss_scale!r}: must be one of {LOSS_SCALES}")
        inner_scales = keras_compat.find_loss_scale_optimizer(optimizer) is not None
        if loss_scale == "dynamic" and inner_scales:
            raise ValueError(
                "lars_tf.DistributedOptimizer(loss_scale='dynamic') around an optimizer that "
                "scales the loss itself would scale it twice: pass the optimizer inside the "
                "LossScaleOptimizer")
        if loss_scale == "auto":
            loss_scale = ("dynamic" if not inner_scales
                          and keras.config.dtype_policy().name == "mixed_float16" else "none")
        from lars_tf import distributed

        # LossScaleOptimizer's own __init__ takes none of these options: set up the base.
        keras.optimizers.Optimizer.__init__(
            self, learning_rate=0.0, name=name or f"Distributed{optimizer.name}")
        self.inner_optimizer = optimizer
        self.compression = compression
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.gradient_predivide_factor = float(gradient_predivide_factor)
        self.sparse_as_dense = distributed.needs_dense_gradients(
            self.backward_passes_per_step, self.gradient_predivide_factor, sparse_as_dense)
        self.average = bool(average)
        self.loss_scale = loss_scale
        self.initial_scale = float(initial_scale)
        self.dynamic_growth_steps = int(dynamic_growth_steps)
        if self.scales_loss:
            self.inner_optimizer.loss_scale_factor = None  # scaled once, here
        guard_jit_compile()

    @property
    def scales_loss(self) -> bool:
        """Whether this optimizer scales the loss (dynamic loss scaling)."""
        return self.loss_scale == "dynamic"

    # -- the all-reduce ------------------------------------------------------------------
    def allreduce(self, grads: list) -> list:
        """Every rank's gradients combined (mean or sum); ``None`` stays ``None``. In a
        world of one, the gradients as given.

        One all-reduce op per dense gradient: in the training step's graph each starts as
        soon as its gradient exists, while the backward pass goes on (the last layers'
        gradients first), and Horovod's background thread fuses the ones that are ready
        together (``HOROVOD_FUSION_THRESHOLD``, ``HOROVOD_CYCLE_TIME``). Each keeps its
        dtype on the wire (so float32 and float64 gradients mix), except bfloat16, which
        Horovod's op does not take: it is sent as float32 (float16 with ``compression=
        "fp16"``), as are float32 gradients under compression."""
        from lars_tf import distributed

        if not distributed.is_initialized():
            return list(grads)  # a world of one (checked in build)
        size = distributed.size()
        f = self.gradient_predivide_factor
        prescale, postscale = 1.0 / f, (f / size if self.average else f)
        out = []
        for g in grads:
            if g is None:
                out.append(None)
            elif isinstance(g, tf.IndexedSlices):  # all-gathered: exact, nothing summed
                out.append(distributed.allreduce_sparse(g, average=self.average))
            else:
                g = tf.convert_to_tensor(g)
                wire = _WIRE_DTYPES[self.compression].get(g.dtype, g.dtype)
                reduced = distributed.allreduce_gradient(
                    tf.cast(g, wire), prescale_factor=prescale, postscale_factor=postscale)
                out.append(tf.cast(reduced, g.dtype))
        return out

    # -- Keras optimizer protocol ----------------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        with tf.init_scope():  # eager even when the first apply is being traced
            self._check_same_variables_on_every_rank(var_list)
        keras.optimizers.Optimizer.build(self, var_list)
        self.inner_optimizer.build(var_list)
        if self.backward_passes_per_step > 1:
            self._accumulators = [self.add_variable_from_reference(v, "accumulated_gradient")
                                  for v in var_list]
        if self.scales_loss:
            self.step_counter = self.add_variable(
                shape=(), dtype="int", initializer="zeros", name="step_counter")
            self.dynamic_scale = self.add_variable(
                shape=(), dtype="float32",
                initializer=keras.initializers.Constant(self.initial_scale),
                name="dynamic_scale")

    def _check_same_variables_on_every_rank(self, var_list) -> None:
        """Gradients are all-reduced by position: every rank must hold the same variables
        (path, shape, dtype) in the same order, or equal-shaped gradients of different
        variables would be summed, or the all-reduce would hang. Checked once, when the
        optimizer is built, by gathering every rank's list; a difference stops every rank
        with the same message."""
        from lars_tf import distributed

        if distributed.size_or_one("lars_tf.DistributedOptimizer") == 1:
            return
        mine = [(keras_compat.variable_path(v), tuple(v.shape), str(v.dtype))
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

    def apply(self, grads, trainable_variables=None):
        if control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()):
            raise ValueError(JIT_REFUSED)
        grads = list(grads)
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        if self.sparse_as_dense:
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                     for g in grads]
        k = self.backward_passes_per_step
        if k == 1:
            self._update(self.allreduce(grads), trainable_variables)
        else:
            for acc, g in zip(self._accumulators, grads):
                if g is not None:
                    acc.assign_add(tf.cast(g, acc.dtype))

            def update():
                mean = [None if g is None else acc / k
                        for acc, g in zip(self._accumulators, grads)]
                self._update(self.allreduce(mean), trainable_variables)
                for acc in self._accumulators:
                    acc.assign(tf.zeros_like(acc))
                return tf.constant(True)

            tf.cond(tf.equal((self._iterations + 1) % k, 0), update,
                    lambda: tf.constant(False))
        self._iterations.assign_add(1)

    def _update(self, grads: list, trainable_variables: list) -> None:
        """One weight update from the all-reduced (still scaled) gradients: unscaled,
        checked and applied, or skipped, the same way on every rank."""
        if not self.scales_loss:
            self.inner_optimizer.apply(grads, trainable_variables)
            return

        def apply_finite():
            scale = self.dynamic_scale
            self.inner_optimizer.apply(
                [None if g is None else g / tf.cast(scale, g.dtype) for g in grads],
                trainable_variables)
            grow = tf.equal(self.step_counter, self.dynamic_growth_steps - 1)
            self.step_counter.assign(tf.where(grow, tf.zeros_like(self.step_counter),
                                              self.step_counter + 1))
            self.dynamic_scale.assign(tf.where(grow, scale * 2.0, scale))
            return tf.constant(True)

        def skip():
            self.step_counter.assign(tf.zeros_like(self.step_counter))
            self.dynamic_scale.assign(self.dynamic_scale * 0.5)
            self.inner_optimizer.iterations.assign_add(1)  # the schedule counts it
            return tf.constant(False)

        tf.cond(self.check_finite(grads), apply_finite, skip)

    def scale_loss(self, loss):
        if self.scales_loss:
            scale = self.dynamic_scale if self.built else self.initial_scale
            return loss * tf.cast(scale, loss.dtype)
        return self.inner_optimizer.scale_loss(loss)

    def local_variables(self) -> list:
        """This rank's own state: the gradient sums of the accumulation window (zero at
        every window's end, so at every checkpoint), which differ between ranks."""
        return list(getattr(self, "_accumulators", []))

    @property
    def iterations(self):
        """Backward passes (the wrapped optimizer's ``iterations`` counts updates)."""
        return self._iterations

    def save_own_variables(self, store):
        k = self.backward_passes_per_step
        if k > 1 and int(self._iterations.numpy()) % k:
            raise ValueError(
                f"lars_tf.DistributedOptimizer: saving after backward pass "
                f"{int(self._iterations.numpy())}, in the middle of an accumulation window "
                f"of backward_passes_per_step={k}, would store half-accumulated gradients. "
                f"Save at the end of a window: make steps_per_epoch a multiple of {k}")
        super().save_own_variables(store)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "compression": self.compression,
            "backward_passes_per_step": self.backward_passes_per_step,
            "gradient_predivide_factor": self.gradient_predivide_factor,
            "sparse_as_dense": self.sparse_as_dense,
            "average": self.average,
            "loss_scale": self.loss_scale,  # resolved: a load does not depend on the policy
            "initial_scale": self.initial_scale,
            "dynamic_growth_steps": self.dynamic_growth_steps,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("optimizer"),
                                                      custom_objects=custom_objects)
        return cls(inner, **config)


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
