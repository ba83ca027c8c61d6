"""The Keras 3 side of ``lars_tf.keras_compat`` (TensorFlow >= 2.16, the default stack).

``lars_tf._keras2`` defines the same names for Keras 2; ``keras_compat`` picks one of the two
once, when it is imported. Nothing else in lars_tf imports this module.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

KERAS3 = True

# The loss-scale optimizers of this stack's Keras (lars_tf.DistributedOptimizer is one).
LOSS_SCALE_CLASSES = (keras.optimizers.LossScaleOptimizer,)


def variable_path(variable) -> str:
    """A variable's name with its layer, as the exclusion regexes see it
    (``dense/kernel``)."""
    return variable.path if isinstance(variable, keras.Variable) else variable.name


def variable_handle(variable):
    """The resource handle of a model or optimizer variable, for raw training ops."""
    return variable.value.handle if isinstance(variable, keras.Variable) else variable.handle


def plain_variables(variables) -> list[tf.Variable]:
    """The ``tf.Variable`` behind each variable (Keras 3 wraps one in its own class), for
    TensorFlow and Horovod APIs that take ``tf.Variable`` only."""
    out, seen = [], set()
    for v in variables:
        v = v.value if isinstance(v, keras.Variable) else v
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def is_variable(obj) -> bool:
    """A TensorFlow or Keras variable."""
    return isinstance(obj, (tf.Variable, keras.Variable))


def global_policy_name() -> str:
    """The name of Keras' global dtype policy (``float32``, ``mixed_float16``, ...)."""
    return keras.config.dtype_policy().name


class OptimizerBase(keras.optimizers.Optimizer):
    """The Keras optimizer base of lars_tf's optimizers (the same names on both stacks): the
    learning rate (a float or a schedule) given to ``__init__``, slots made with ``_slot``
    and found with ``_slot_index``, and ``_update(gradient, variable, learning_rate)`` to
    implement."""

    def __init__(self, learning_rate, name: str, **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)

    def build(self, var_list):
        if self.is_built:
            return
        super().build(var_list)
        self._build_slots(var_list)

    def _build_slots(self, var_list):
        """Make the optimizer's slot variables for ``var_list`` (once)."""

    @property
    def is_built(self) -> bool:
        return bool(getattr(self, "built", False))

    def _slot(self, variable, name: str):
        return self.add_variable_from_reference(variable, name)

    def _slot_index(self, variable) -> int:
        return self._get_variable_index(variable)

    def _learning_rate_config(self):
        return super().get_config()["learning_rate"]

    def update_step(self, gradient, variable, learning_rate):
        return self._update(gradient, variable, tf.cast(learning_rate, tf.float32))

    def _update(self, gradient, variable, learning_rate):
        raise NotImplementedError


def loss_scale_optimizer(optimizer, initial_scale: float, dynamic_growth_steps: int):
    """Keras' dynamic loss scaling around ``optimizer`` (one process; the distributed
    stack's loss scaling is ``lars_tf.DistributedOptimizer``'s)."""
    return keras.optimizers.LossScaleOptimizer(
        optimizer, initial_scale=initial_scale, dynamic_growth_steps=dynamic_growth_steps)


def loss_scale_state(lso) -> tuple[float, int]:
    """(loss scale, good steps since it last changed) of a loss-scale optimizer."""
    return float(lso.dynamic_scale), int(lso.step_counter)


def set_loss_scale_state(lso, scale: float, good_steps: int) -> None:
    lso.dynamic_scale.assign(scale)
    lso.step_counter.assign(good_steps)


def minimize(optimizer, loss_fn: Callable[[], tf.Tensor], variables) -> tf.Tensor:
    """``lars_tf.minimize`` on Keras 3: the stack's ``scale_loss``, then
    ``apply_gradients``."""
    variables = list(variables)
    with tf.GradientTape() as tape:
        loss = loss_fn()
        scaled = optimizer.scale_loss(loss)
    optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
    return loss


def compile_options() -> dict:
    """What ``model.compile`` needs with the lars_tf optimizer stack: no XLA (Horovod's ops
    have no XLA kernels) and no loss-scale optimizer of Keras' own around it
    (``auto_scale_loss=False``; ``lars_tf.DistributedOptimizer`` is one, so Keras would add
    none anyway, but another optimizer under ``mixed_float16`` would get one)."""
    return {"jit_compile": False, "auto_scale_loss": False}


def reseed_layers(model, seed: int, epoch: int = 0) -> None:
    """Seed the random draws of ``model``'s layers (dropout masks, ...) for ``epoch`` from
    ``seed``.

    Keras 3 layers each hold a ``SeedGenerator`` whose state is a non-trainable variable
    (``.../seed_generator_state``), seeded from Python's generator when the layer was made
    (and then, like every variable, broadcast from rank 0): this gives the n-th one a state
    drawn from (``seed``, ``epoch``, n), so that ranks given different seeds draw
    differently, and an epoch draws the same masks whether the run went straight through
    or resumed from a checkpoint before it (reseeded at every epoch's start)."""
    states = [v for v in model.non_trainable_variables
              if v.path.endswith("seed_generator_state")]
    for n, state in enumerate(states):
        # the generator steps the state's second element: distinct first elements keep
        # the layers' (and the epochs') streams apart
        first = (seed * 1_000_003 + epoch * 7_919 + n) % 2 ** 31
        state.assign(tf.constant([first, 0], state.dtype))


class DistributedOptimizerBase(keras.optimizers.LossScaleOptimizer):
    """Keras 3's optimizer protocol for ``lars_tf.DistributedOptimizer``, whose
    stack-neutral part (``_apply_distributed``, ``_build_state``, ...) calls back into the
    few methods here. It is a Keras ``LossScaleOptimizer``, so that ``compile`` under
    ``mixed_float16`` does not wrap it in one of Keras' own."""

    def _init_base(self, name: str) -> None:
        # LossScaleOptimizer's own __init__ takes none of our options: set up the base.
        keras.optimizers.Optimizer.__init__(self, learning_rate=0.0, name=name)
        from lars_tf.distributed_optimizer import guard_jit_compile

        guard_jit_compile()

    @property
    def is_built(self) -> bool:
        return bool(self.built)

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        keras.optimizers.Optimizer.build(self, var_list)
        self.inner_optimizer.build(var_list)
        self._build_state(var_list)

    def _new_slot(self, variable, name: str):
        return self.add_variable_from_reference(variable, name)

    def _new_scalar(self, name: str, dtype: str, value):
        return self.add_variable(shape=(), dtype=dtype,
                                 initializer=keras.initializers.Constant(value), name=name)

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if trainable_variables is None:
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
        self._apply_distributed(grads, trainable_variables)

    def _inner_apply(self, grads: list, variables: list) -> None:
        self.inner_optimizer.apply(grads, variables)

    def scale_loss(self, loss):
        if self.scales_loss:
            return self._scaled(loss)
        return self.inner_optimizer.scale_loss(loss)

    @property
    def iterations(self):
        """Backward passes (the wrapped optimizer's ``iterations`` counts updates)."""
        return self._iterations

    def save_own_variables(self, store):
        self._check_window_end()
        super().save_own_variables(store)
