"""Mixed-precision policy and dynamic loss scaling (TensorFlow only).

Where loss scaling sits in the lars_tf stack, from the loss to the weights::

    loss * S  ->  backward pass (float16 activations, scaled gradients)
              ->  all-reduce of the *scaled* gradients (Horovod; float16 on the wire with
                  fp16 compression, where scaling keeps small gradients representable)
              ->  divide by S  ->  finite?  yes: LARS update in float32, S grows after a run
                                                  of good steps
                                            no:  skip the update, S halves

Every rank makes the same skip decision because it is taken on the all-reduced gradients:
an Inf/NaN on any one rank becomes Inf/NaN in the sum that every rank receives. With
Horovod gradient accumulation the decision is taken once per weight update, on the
all-reduced accumulated gradients, and S only changes then, so the scaled gradients of one
accumulation window all share one S. ``lars_tf.DistributedOptimizer`` does all of it, on
both stacks.
"""

from __future__ import annotations

import tensorflow as tf

from lars_tf import keras_compat
from lars_tf.config import PRECISIONS


def set_policy(precision: str) -> tf.keras.mixed_precision.Policy:
    """Set Keras' global dtype policy: ``fp32``, ``mixed_float16`` or ``mixed_bfloat16``.

    Mixed policies compute in 16 bits and keep float32 variables (the master weights that
    LARS updates); call this before building the model.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision={precision!r}: must be one of {PRECISIONS}")
    policy = tf.keras.mixed_precision.Policy("float32" if precision == "fp32" else precision)
    tf.keras.mixed_precision.set_global_policy(policy)
    return policy


def compute_dtype(precision: str) -> tf.DType:
    """The dtype a model computes in under ``precision`` (its inputs' dtype)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision={precision!r}: must be one of {PRECISIONS}")
    return {"fp32": tf.float32, "mixed_float16": tf.float16,
            "mixed_bfloat16": tf.bfloat16}[precision]


def needs_loss_scaling(precision: str) -> bool:
    """float16 has 5 exponent bits and needs loss scaling; bfloat16 has float32's range."""
    return precision == "mixed_float16"


def wrap_loss_scale(
    optimizer: tf.keras.optimizers.Optimizer,
    precision: str,
    initial_scale: float = 2.0 ** 15,
    dynamic_growth_steps: int = 2000,
) -> tf.keras.optimizers.Optimizer:
    """``optimizer`` under Keras' dynamic loss scaling when ``precision`` needs it, else as
    is: for one process. With Horovod, ``lars_tf.DistributedOptimizer`` scales the loss
    itself, around the all-reduce (``lars_tf.build.wrap_optimizer``)."""
    if not needs_loss_scaling(precision):
        return optimizer
    return keras_compat.loss_scale_optimizer(optimizer, initial_scale, dynamic_growth_steps)


def find_loss_scale_optimizer(optimizer):
    """The loss-scale optimizer in a stack of wrapped optimizers, or None."""
    while optimizer is not None:
        # lars_tf.DistributedOptimizer is a loss-scale optimizer that scales only under
        # mixed_float16
        if isinstance(optimizer, keras_compat.LOSS_SCALE_CLASSES) \
                and getattr(optimizer, "scales_loss", True):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


def loss_scale_state(optimizer) -> tuple[float, int]:
    """(loss scale, good steps since it last changed) of the loss-scale optimizer in the
    stack ``optimizer``."""
    return keras_compat.loss_scale_state(find_loss_scale_optimizer(optimizer))


def set_loss_scale_state(optimizer, scale: float, good_steps: int) -> None:
    """Set the loss scale and its good-step counter (tests, and resuming by hand)."""
    keras_compat.set_loss_scale_state(find_loss_scale_optimizer(optimizer), scale, good_steps)


def minimize(optimizer, loss_fn, variables):
    """One training step as ``model.fit`` takes it, for a custom loop: the loss of
    ``loss_fn()``, scaled by a loss-scale optimizer in the stack, differentiated, and
    handed to ``optimizer`` (which all-reduces, unscales and updates). Returns the loss."""
    return keras_compat.minimize(optimizer, loss_fn, variables)


def innermost_optimizer(optimizer):
    """The optimizer that updates the weights, inside every wrapper (Horovod's, loss
    scaling, lars_tf's DistributedOptimizer)."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer
