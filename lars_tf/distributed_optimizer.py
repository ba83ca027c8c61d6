"""``DistributedOptimizer`` for Keras 3: any Keras 3 optimizer, with gradients all-reduced
through Horovod's ops.

Horovod 0.28.1's own ``hvd.DistributedOptimizer`` is written for Keras 2: wrapped around a
Keras 3 optimizer it raises nothing and all-reduces nothing (the ranks drift apart). This
class does the all-reduce itself, with Horovod's grouped all-reduce, so tensor fusion, the
cycle time, the response cache, the timeline, autotune and the launchers' settings all
apply as they do to Horovod's own optimizer. (On Keras 2 lars_tf uses Horovod's.)

Where loss scaling sits: Keras 3's ``LossScaleOptimizer`` checks the gradients it is given
for Inf/NaN. So that it checks the *all-reduced* gradients (the same on every rank, hence
one skip decision on every rank), it goes inside this optimizer::

    DistributedOptimizer(          # accumulate k passes, all-reduce the scaled gradients
        LossScaleOptimizer(        # mixed_float16 only: unscale, skip on Inf/NaN
            LARS))                 # the update, in float32

The data flow is the one lars_tf has on Keras 2 (scale the loss, all-reduce the scaled
gradients, unscale, check, update): only the nesting differs, because Keras 2's
loss-scale optimizer delegates the gradient computation, and so the all-reduce, to the
optimizer inside it, while Keras 3's receives finished gradients.
"""

from __future__ import annotations

import keras
import tensorflow as tf

# lars_tf.distributed (Horovod) is imported where the optimizer runs, not here: `import
# lars_tf` registers this class for loading saved models without loading Horovod.

# What marks an optimizer as wrapped by Horovod's Keras 2 DistributedOptimizer (which,
# around a Keras 3 optimizer, silently does not all-reduce).
_HOROVOD_WRAPPER_ATTRIBUTES = ("_allreduce_grads", "_agg_helper")


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
class DistributedOptimizer(keras.optimizers.Optimizer):
    """Wraps a Keras 3 optimizer so that ``apply`` all-reduces the gradients first.

    Args:
        optimizer: the optimizer that updates the weights (LARS, SGD, Adam, a
            ``LossScaleOptimizer`` around one, ...).
        compression: ``"none"`` or ``"fp16"``: float32 gradients cross the wire as float16.
        backward_passes_per_step: ``k``: each rank adds up ``k`` local gradients and
            all-reduces their mean once, then ``optimizer`` updates the weights. This
            optimizer's ``iterations`` counts backward passes; the inner optimizer's counts
            its updates, as every Keras optimizer (Adam's bias correction, a schedule)
            expects, so its schedule is written in updates.
        gradient_predivide_factor: ``f``: gradients are divided by ``f`` before the sum
            and by ``size / f`` after it (the same mean, rounded differently).
        sparse_as_dense: all-reduce sparse gradients (``tf.IndexedSlices``, from an
            ``Embedding``) as dense tensors. ``None`` turns it on exactly when
            accumulation or a predivide factor is used, which need dense tensors;
            otherwise sparse gradients are all-gathered, as Horovod does.
        average: the mean over ranks (``True``) or the sum.

    Usage (under ``horovodrun``, after ``lars_tf.init()``)::

        opt = lars_tf.DistributedOptimizer(lars_tf.LARS(learning_rate=1.0))
        model.compile(optimizer=opt, loss=..., jit_compile=False, auto_scale_loss=False)

    Horovod's ops have no XLA kernels: compile with ``jit_compile=False``. Under
    ``mixed_float16`` put Keras' ``LossScaleOptimizer`` inside this one (as
    ``lars_tf.distributed.wrap_optimizer`` does) and compile with ``auto_scale_loss=False``,
    or Keras wraps this optimizer in a second loss-scale optimizer, which checks each rank's
    gradients before the all-reduce (``lars_tf.keras_compat.compile_options()`` gives both).
    """

    def __init__(self, optimizer, compression: str = "none", backward_passes_per_step: int = 1,
                 gradient_predivide_factor: float = 1.0, sparse_as_dense: bool | None = None,
                 average: bool = True, name: str | None = None, **kwargs):
        check_not_horovod_wrapped(optimizer, "lars_tf.DistributedOptimizer")
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(f"lars_tf.DistributedOptimizer wraps a Keras 3 optimizer, got "
                             f"{type(optimizer).__name__}")
        if compression not in ("none", "fp16"):
            raise ValueError(f"compression={compression!r}: must be 'none' or 'fp16'")
        if int(backward_passes_per_step) != backward_passes_per_step \
                or backward_passes_per_step < 1:
            raise ValueError(f"--backward_passes_per_step={backward_passes_per_step}: must "
                             "be an integer >= 1")
        if not gradient_predivide_factor > 0:
            raise ValueError(
                f"--gradient_predivide_factor={gradient_predivide_factor}: must be > 0")
        from lars_tf import distributed

        super().__init__(learning_rate=0.0, name=name or f"Distributed{optimizer.name}",
                         **kwargs)
        self.inner_optimizer = optimizer
        self.compression = compression
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.gradient_predivide_factor = float(gradient_predivide_factor)
        self.sparse_as_dense = distributed.needs_dense_gradients(
            self.backward_passes_per_step, self.gradient_predivide_factor, sparse_as_dense)
        self.average = bool(average)

    # -- the all-reduce ------------------------------------------------------------------
    def allreduce(self, grads: list) -> list:
        """Every rank's gradients combined (mean or sum), in one grouped all-reduce of the
        dense ones; ``None`` stays ``None``."""
        from lars_tf import distributed

        size = distributed.size()
        f = self.gradient_predivide_factor
        prescale, postscale = 1.0 / f, (f / size if self.average else f)
        dense = [i for i, g in enumerate(grads)
                 if g is not None and not isinstance(g, tf.IndexedSlices)]
        out = list(grads)
        if dense:
            tensors, dtypes = [], []
            for i in dense:
                g = tf.convert_to_tensor(grads[i])
                dtypes.append(g.dtype)
                if self.compression == "fp16" and g.dtype == tf.float32:
                    g = tf.cast(g, tf.float16)
                tensors.append(g)
            reduced = distributed.grouped_allreduce_sum(
                tensors, prescale_factor=prescale, postscale_factor=postscale)
            for i, r, dtype in zip(dense, reduced, dtypes):
                out[i] = tf.cast(r, dtype)
        for i, g in enumerate(grads):
            if isinstance(g, tf.IndexedSlices):  # all-gathered: exact, nothing summed
                out[i] = distributed.allreduce_sparse(g, average=self.average)
        return out

    # -- Keras optimizer protocol, delegated ----------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.inner_optimizer.build(var_list)
        if self.backward_passes_per_step > 1:
            self._accumulators = [self.add_variable_from_reference(v, "accumulated_gradient")
                                  for v in var_list]

    def apply(self, grads, trainable_variables=None):
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
            self.inner_optimizer.apply(self.allreduce(grads), trainable_variables)
        else:
            for acc, g in zip(self._accumulators, grads):
                if g is not None:
                    acc.assign_add(tf.cast(g, acc.dtype))

            def update():
                mean = [None if g is None else acc / k
                        for acc, g in zip(self._accumulators, grads)]
                self.inner_optimizer.apply(self.allreduce(mean), trainable_variables)
                for acc in self._accumulators:
                    acc.assign(tf.zeros_like(acc))
                return tf.constant(True)

            tf.cond(tf.equal((self._iterations + 1) % k, 0), update,
                    lambda: tf.constant(False))
        self._iterations.assign_add(1)

    def local_variables(self) -> list:
        """This rank's own state: the gradient sums of the accumulation window (zero at
        every window's end, so at every checkpoint), which differ between ranks."""
        return list(getattr(self, "_accumulators", []))

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        config = super().get_config()
        config.update({
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "compression": self.compression,
            "backward_passes_per_step": self.backward_passes_per_step,
            "gradient_predivide_factor": self.gradient_predivide_factor,
            "sparse_as_dense": self.sparse_as_dense,
            "average": self.average,
        })
        config.pop("learning_rate", None)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("optimizer"),
                                                      custom_objects=custom_objects)
        return cls(inner, **config)
