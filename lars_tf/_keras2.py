"""The Keras 2 side of ``lars_tf.keras_compat`` (TensorFlow 2.15, the legacy stack).

``lars_tf._keras3`` defines the same names for Keras 3; ``keras_compat`` picks one of the two
once, when it is imported. Retiring the legacy stack means deleting this file.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
from keras.src.mixed_precision.loss_scale_optimizer import BaseLossScaleOptimizer

KERAS3 = False

# The loss-scale optimizers of this stack's Keras (lars_tf.DistributedOptimizer is one).
LOSS_SCALE_CLASSES = (BaseLossScaleOptimizer,)


def variable_path(variable) -> str:
    """A variable's name with its layer, as the exclusion regexes see it
    (``dense/kernel:0``)."""
    return variable.name


def variable_handle(variable):
    """The resource handle of a model or optimizer variable, for raw training ops."""
    return variable.handle


def plain_variables(variables) -> list[tf.Variable]:
    """The variables, each once (Keras 2's are ``tf.Variable`` already)."""
    out, seen = [], set()
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def is_variable(obj) -> bool:
    """A TensorFlow variable."""
    return isinstance(obj, tf.Variable)


def global_policy_name() -> str:
    """The name of Keras' global dtype policy (``float32``, ``mixed_float16``, ...)."""
    return tf.keras.mixed_precision.global_policy().name


class OptimizerBase(tf.keras.optimizers.Optimizer):
    """The Keras optimizer base of lars_tf's optimizers (the same names on both stacks): the
    learning rate (a float or a schedule) given to ``__init__``, slots made with ``_slot``
    and found with ``_slot_index``, and ``_update(gradient, variable, learning_rate)`` to
    implement."""

    def __init__(self, learning_rate, name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        self._learning_rate = self._build_learning_rate(learning_rate)

    def build(self, var_list):
        if self.is_built:
            return
        super().build(var_list)
        self._build_slots(var_list)
        self._built = True

    def _build_slots(self, var_list):
        """Make the optimizer's slot variables for ``var_list`` (once)."""

    @property
    def is_built(self) -> bool:
        return bool(getattr(self, "_built", False))

    def _slot(self, variable, name: str):
        return self.add_variable_from_reference(model_variable=variable, variable_name=name)

    def _slot_index(self, variable) -> int:
        return self._index_dict[self._var_key(variable)]

    def _learning_rate_config(self):
        return self._serialize_hyperparameter(self._learning_rate)

    def update_step(self, gradient, variable):
        return self._update(gradient, variable, tf.cast(self.learning_rate, tf.float32))

    def _update(self, gradient, variable, learning_rate):
        raise NotImplementedError


def loss_scale_optimizer(optimizer, initial_scale: float, dynamic_growth_steps: int):
    """Keras' dynamic loss scaling around ``optimizer`` (one process; the distributed
    stack's loss scaling is ``lars_tf.DistributedOptimizer``'s)."""
    return tf.keras.mixed_precision.LossScaleOptimizer(
        optimizer, dynamic=True, initial_scale=initial_scale,
        dynamic_growth_steps=dynamic_growth_steps)


def loss_scale_state(lso) -> tuple[float, int]:
    """(loss scale, good steps since it last changed) of a loss-scale optimizer."""
    return float(lso.loss_scale), int(lso.dynamic_counter)


def set_loss_scale_state(lso, scale: float, good_steps: int) -> None:
    if isinstance(lso, DistributedOptimizerBase):
        lso.dynamic_scale.assign(scale)
        lso.step_counter.assign(good_steps)
    else:
        lso._loss_scale.current_loss_scale.assign(scale)
        lso._loss_scale.counter.assign(good_steps)


def minimize(optimizer, loss_fn: Callable[[], tf.Tensor], variables) -> tf.Tensor:
    """``lars_tf.minimize`` on Keras 2, whose optimizers scale the loss (and
    Horovod's, all-reduce) in their own ``minimize``."""
    variables = list(variables)
    with tf.GradientTape() as tape:
        loss = loss_fn()
    optimizer.minimize(loss, variables, tape=tape)
    return loss


def compile_options() -> dict:
    """What ``model.compile`` needs with the lars_tf optimizer stack: no XLA (Horovod's ops
    have no XLA kernels). Keras 2's compile adds no loss-scale optimizer around one that
    is a loss-scale optimizer already, as ``lars_tf.DistributedOptimizer`` is."""
    return {"jit_compile": False}


def reseed_layers(model, seed: int, epoch: int = 0) -> None:
    """Nothing on Keras 2: its layers draw from TensorFlow's global generator through
    stateful ops, whose state no checkpoint holds, so masks after a resume differ (Keras 3
    reseeds every layer's generator at each epoch's start)."""


class DistributedOptimizerBase(tf.keras.optimizers.Optimizer, BaseLossScaleOptimizer):
    """Keras 2's optimizer protocol for ``lars_tf.DistributedOptimizer``, whose
    stack-neutral part (``_apply_distributed``, ``_build_state``, ...) calls back into the
    few methods here.

    It is a Keras ``BaseLossScaleOptimizer``, so that ``compile`` under ``mixed_float16``
    does not wrap it in a ``LossScaleOptimizer`` (which would check each rank's local
    gradients before the all-reduce), and it answers that class's questions
    (``loss_scale``, ``dynamic_counter``, ``get_scaled_loss``). ``model.fit`` calls
    ``minimize``: ``compute_gradients`` scales the loss, ``apply_gradients`` all-reduces the
    scaled gradients, unscales them and updates (or skips)."""

    # plain attributes here (BaseLossScaleOptimizer declares them as abstract properties)
    inner_optimizer = None
    initial_scale = None
    dynamic_growth_steps = None

    def _init_base(self, name: str) -> None:
        tf.keras.optimizers.Optimizer.__init__(self, name=name, jit_compile=False)

    def _create_iteration_variable(self):
        # its own name: the .h5 format stores the stack's variables by name, and the
        # wrapped optimizer's counter is "iteration"
        with tf.init_scope():
            self._iterations = tf.Variable(0, name="backward_passes", dtype=tf.int64,
                                           trainable=False)
        self._variables.append(self._iterations)

    @property
    def is_built(self) -> bool:
        return bool(getattr(self, "_built", False))

    def build(self, var_list):
        if self.is_built:
            return
        var_list = list(var_list)
        super().build(var_list)
        self.inner_optimizer.build(var_list)
        self._build_state(var_list)
        self._built = True

    def _new_slot(self, variable, name: str):
        return self.add_variable_from_reference(model_variable=variable, variable_name=name)

    def _new_scalar(self, name: str, dtype: str, value):
        return self.add_variable(shape=(), dtype=dtype,
                                 initializer=tf.keras.initializers.Constant(value), name=name)

    def compute_gradients(self, loss, var_list, tape=None):
        if not callable(loss) and tape is None:
            raise ValueError("compute_gradients: a Tensor loss needs the tape that computed it")
        tape = tf.GradientTape() if tape is None else tape
        with tape:
            if callable(loss):
                if not callable(var_list):
                    tape.watch(var_list)
                loss = loss()
            if callable(var_list):
                var_list = var_list()
            loss = self.get_scaled_loss(loss)
        return list(zip(tape.gradient(loss, var_list), var_list))

    def apply_gradients(self, grads_and_vars, name=None, skip_gradients_aggregation=False,
                        **kwargs):
        pairs = list(grads_and_vars)
        variables = [v for _, v in pairs]
        with tf.init_scope():
            self.build(variables)
        self._apply_distributed([g for g, _ in pairs], variables)
        return self._iterations

    def _inner_apply(self, grads: list, variables: list) -> None:
        self.inner_optimizer.apply_gradients(
            [(g, v) for g, v in zip(grads, variables) if g is not None],
            skip_gradients_aggregation=True)

    def get_scaled_loss(self, loss):
        """The loss times the loss scale (the loss itself when this optimizer does not
        scale); a callable loss gives a callable."""
        if callable(loss):
            return lambda: self.get_scaled_loss(loss())
        return self._scaled(loss) if self.scales_loss else loss

    def get_unscaled_gradients(self, grads):
        raise ValueError(
            "lars_tf.DistributedOptimizer unscales the gradients itself, after the "
            "all-reduce: pass apply_gradients the gradients of get_scaled_loss(loss) as "
            "they are")

    @property
    def loss_scale(self):
        """The current loss scale (1 when this optimizer does not scale)."""
        if not self.scales_loss:
            return tf.convert_to_tensor(1.0)
        return tf.convert_to_tensor(self.dynamic_scale if self.is_built else self.initial_scale)

    @property
    def dynamic_counter(self):
        """Good updates since the loss scale last changed (None when it does not scale)."""
        return self.step_counter if self.scales_loss else None

    @property
    def dynamic(self) -> bool:
        return self.scales_loss

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self.inner_optimizer.learning_rate = value

    @property
    def variables(self):
        """This optimizer's variables, then the wrapped optimizer's: the whole stack, as
        Keras 2's ``.h5`` format saves and restores an optimizer (through ``variables``
        and ``set_weights``)."""
        return [*self._variables, *self.inner_optimizer.variables]

    def set_weights(self, weights):
        variables = self.variables
        if len(weights) != len(variables):
            raise ValueError(f"{self.name}.set_weights: {len(weights)} values for "
                             f"{len(variables)} variables")
        for variable, value in zip(variables, weights):
            variable.assign(value)

    def save_own_variables(self, store):
        self._check_window_end()
        super().save_own_variables(store)
