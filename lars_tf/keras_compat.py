"""Where Keras 2 (TensorFlow 2.15, the legacy stack) and Keras 3 (TensorFlow >= 2.16) differ.

Everything else in lars_tf is written once, against what the two share; the few places
where their APIs part ways are here, each behind a name that says what it is for.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

KERAS3 = int(keras.__version__.split(".")[0]) >= 3


def register(cls):
    """Register a lars_tf class for saving and loading: as ``lars_tf>Name`` and, for
    Keras 2's ``.h5`` files and Horovod's wrapper (which name the class plainly), ``Name``;
    either loads with ``load_model(path)`` once lars_tf is imported, without
    ``custom_objects``."""
    cls = tf.keras.utils.register_keras_serializable(package="lars_tf")(cls)
    tf.keras.utils.get_custom_objects().setdefault(cls.__name__, cls)
    return cls


def variable_path(variable) -> str:
    """A variable's name with its layer, as the exclusion regexes see it:
    ``dense/kernel`` (Keras 3's path) or ``dense/kernel:0`` (Keras 2's name)."""
    return variable.path if _is_keras_variable(variable) else variable.name


def variable_handle(variable):
    """The resource handle of a model or optimizer variable, for raw training ops."""
    return variable.value.handle if _is_keras_variable(variable) else variable.handle


def plain_variables(variables) -> list[tf.Variable]:
    """The ``tf.Variable`` behind each variable (Keras 3 wraps one in its own class), for
    TensorFlow and Horovod APIs that take ``tf.Variable`` only."""
    out, seen = [], set()
    for v in variables:
        v = v.value if _is_keras_variable(v) else v
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def is_variable(obj) -> bool:
    """A TensorFlow or Keras 3 variable."""
    return isinstance(obj, tf.Variable) or _is_keras_variable(obj)


def _is_keras_variable(variable) -> bool:
    """Keras 3's own variable class, which wraps a ``tf.Variable`` (Keras 2 has none)."""
    return KERAS3 and isinstance(variable, keras.Variable)


class OptimizerBase(tf.keras.optimizers.Optimizer):
    """A Keras optimizer base that is the same on both: the learning rate (a float or a
    schedule) given to ``__init__``, slots made with ``_slot`` and found with
    ``_slot_index``, and ``_update(gradient, variable, learning_rate)`` to implement."""

    def __init__(self, learning_rate, name: str, **kwargs):
        if KERAS3:
            super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        else:
            super().__init__(name=name, **kwargs)
            self._learning_rate = self._build_learning_rate(learning_rate)

    def build(self, var_list):
        if self.is_built:
            return
        super().build(var_list)
        self._build_slots(var_list)
        if not KERAS3:
            self._built = True

    def _build_slots(self, var_list):
        """Make the optimizer's slot variables for ``var_list`` (once)."""

    @property
    def is_built(self) -> bool:
        return bool(getattr(self, "built" if KERAS3 else "_built", False))

    def _slot(self, variable, name: str):
        if KERAS3:
            return self.add_variable_from_reference(variable, name)
        return self.add_variable_from_reference(model_variable=variable, variable_name=name)

    def _slot_index(self, variable) -> int:
        if KERAS3:
            return self._get_variable_index(variable)
        return self._index_dict[self._var_key(variable)]

    def _learning_rate_config(self):
        if KERAS3:
            return super().get_config()["learning_rate"]
        return self._serialize_hyperparameter(self._learning_rate)

    def update_step(self, gradient, variable, learning_rate=None):
        if learning_rate is None:  # Keras 2 passes none
            learning_rate = self.learning_rate
        return self._update(gradient, variable, tf.cast(learning_rate, tf.float32))

    def _update(self, gradient, variable, learning_rate):
        raise NotImplementedError


def loss_scale_optimizer(optimizer, initial_scale: float, dynamic_growth_steps: int,
                         is_update_step: Callable[[], tf.Tensor] | None = None):
    """Keras' dynamic loss scaling around ``optimizer``.

    ``is_update_step`` (Keras 2 only) returns a boolean tensor: True when this backward
    pass ends an accumulation window of the Horovod optimizer inside (its gradients are
    the all-reduced sum of the window); on the other passes that optimizer only
    accumulates, and the loss scale is neither checked nor changed. On Keras 3 the
    accumulation happens outside the loss-scale optimizer (``lars_tf.DistributedOptimizer``
    calls it once per update), so there is nothing to say.
    """
    if KERAS3:
        if is_update_step is not None:
            raise ValueError("is_update_step: Keras 3 accumulates outside loss scaling")
        return keras.optimizers.LossScaleOptimizer(
            optimizer, initial_scale=initial_scale, dynamic_growth_steps=dynamic_growth_steps)
    return Keras2LossScaleOptimizer(optimizer, is_update_step=is_update_step, dynamic=True,
                                    initial_scale=initial_scale,
                                    dynamic_growth_steps=dynamic_growth_steps)


def find_loss_scale_optimizer(optimizer):
    """The loss-scale optimizer in a stack of wrapped optimizers, or None."""
    while optimizer is not None:
        # lars_tf.DistributedOptimizer is a Keras 3 loss-scale optimizer that scales only
        # under mixed_float16
        if isinstance(optimizer, _loss_scale_classes()) \
                and getattr(optimizer, "scales_loss", True):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


def loss_scale_state(optimizer) -> tuple[float, int]:
    """(loss scale, good steps since it last changed) of the loss-scale optimizer in the
    stack ``optimizer``."""
    lso = find_loss_scale_optimizer(optimizer)
    if KERAS3:
        return float(lso.dynamic_scale), int(lso.step_counter)
    return float(lso.loss_scale), int(lso.dynamic_counter)


def set_loss_scale_state(optimizer, scale: float, good_steps: int) -> None:
    """Set the loss scale and its good-step counter (tests, and resuming by hand)."""
    lso = find_loss_scale_optimizer(optimizer)
    if KERAS3:
        lso.dynamic_scale.assign(scale)
        lso.step_counter.assign(good_steps)
    else:
        lso._loss_scale.current_loss_scale.assign(scale)
        lso._loss_scale.counter.assign(good_steps)


def minimize(optimizer, loss_fn: Callable[[], tf.Tensor], variables) -> tf.Tensor:
    """One training step as ``model.fit`` takes it, for a custom loop: the loss of
    ``loss_fn()``, scaled by a loss-scale optimizer in the stack, differentiated, and
    handed to ``optimizer`` (which all-reduces, unscales and updates). Returns the loss."""
    variables = list(variables)
    with tf.GradientTape() as tape:
        loss = loss_fn()
        scaled = optimizer.scale_loss(loss) if KERAS3 else loss
    if KERAS3:
        optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
    else:  # Keras 2's loss-scale and Horovod optimizers act in minimize's gradient step
        optimizer.minimize(loss, variables, tape=tape)
    return loss


def compile_options() -> dict:
    """What ``model.compile`` needs with the lars_tf optimizer stack: no XLA (Horovod's ops
    have no XLA kernels) and, on Keras 3, no loss-scale optimizer of Keras' own around it
    (``auto_scale_loss=False``: under ``mixed_float16`` Keras 3 would wrap the stack in a
    second one, which scales the loss again and checks the gradients before the all-reduce,
    on each rank alone)."""
    return {"jit_compile": False, **({"auto_scale_loss": False} if KERAS3 else {})}


def reseed_layers(model, seed: int, epoch: int = 0) -> None:
    """Seed the random draws of ``model``'s layers (dropout masks, ...) for ``epoch`` from
    ``seed``.

    Keras 3 layers each hold a ``SeedGenerator`` whose state is a non-trainable variable
    (``.../seed_generator_state``), seeded from Python's generator when the layer was made
    (and then, like every variable, broadcast from rank 0): this gives the n-th one a state
    drawn from (``seed``, ``epoch``, n), so that ranks given different seeds draw
    differently, and an epoch draws the same masks whether the run went straight through
    or resumed from a checkpoint before it (reseeded at every epoch's start). Keras 2
    layers draw from TensorFlow's global generator through stateful ops, whose state no
    checkpoint holds: there nothing is done, and masks after a resume differ."""
    if not KERAS3:
        return
    states = [v for v in model.non_trainable_variables
              if v.path.endswith("seed_generator_state")]
    for n, state in enumerate(states):
        # the generator steps the state's second element: distinct first elements keep
        # the layers' (and the epochs') streams apart
        first = (seed * 1_000_003 + epoch * 7_919 + n) % 2 ** 31
        state.assign(tf.constant([first, 0], state.dtype))


def innermost_optimizer(optimizer):
    """The optimizer that updates the weights, inside every wrapper (Horovod's, loss
    scaling, lars_tf's DistributedOptimizer)."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def _loss_scale_classes() -> tuple:
    if KERAS3:
        return (keras.optimizers.LossScaleOptimizer,)
    return (LossScaleOptimizerV3,)


if not KERAS3:
    from keras.src.mixed_precision.loss_scale_optimizer import LossScaleOptimizerV3

    class Keras2LossScaleOptimizer(LossScaleOptimizerV3):
        """Keras 2's dynamic loss scaling, deciding once per weight update.

        ``is_update_step`` returns a boolean tensor: True when this backward pass ends an
        accumulation window (its gradients are the all-reduced sum of the window). On the
        other backward passes the inner optimizer only accumulates, and the loss scale is
        neither checked nor changed. With ``is_update_step=None`` every pass is an update
        (plain Keras behaviour).
        """

        def __init__(self, inner_optimizer,
                     is_update_step: Callable[[], tf.Tensor] | None = None, **kwargs):
            super().__init__(inner_optimizer, **kwargs)
            self._is_update_step = is_update_step

        def apply_gradients(self, grads_and_vars, skip_gradients_aggregation=False,
                            **kwargs):
            if self._is_update_step is None:
                return super().apply_gradients(grads_and_vars, skip_gradients_aggregation,
                                               **kwargs)
            grads_and_vars = list(grads_and_vars)
            parent = super()

            def update():
                parent.apply_gradients(grads_and_vars, skip_gradients_aggregation, **kwargs)
                return tf.constant(True)

            def accumulate():
                # The inner (Horovod) optimizer counts the pass and leaves the weights alone.
                self._optimizer.apply_gradients(grads_and_vars,
                                                skip_gradients_aggregation=True)
                return tf.constant(False)

            return tf.cond(self._is_update_step(), update, accumulate)
