"""Where Keras 2 (TensorFlow 2.15, the legacy stack) and Keras 3 (TensorFlow >= 2.16) differ.

Everything else in lars_tf is written once, against what the two share. The few places where
their APIs part ways are API shims with the same names in ``lars_tf._keras3`` and
``lars_tf._keras2``, of which this module imports one, once (retiring the legacy stack means
deleting ``_keras2.py`` and the branch below):

- variables: ``variable_path``, ``variable_handle``, ``plain_variables``, ``is_variable``;
- optimizers: ``OptimizerBase`` (what LARS is written on), ``DistributedOptimizerBase``
  (Keras' protocol for ``lars_tf.DistributedOptimizer``), ``loss_scale_optimizer``,
  ``loss_scale_state``, ``set_loss_scale_state`` (of one loss-scale optimizer),
  ``LOSS_SCALE_CLASSES``;
- training: ``minimize`` (a custom loop's step: public as ``lars_tf.minimize``),
  ``compile_options``, ``reseed_layers``, ``global_policy_name``.

The public calls built on them (``minimize``, ``loss_scale_state``,
``set_loss_scale_state``, ``find_loss_scale_optimizer``, ``innermost_optimizer``) are in
``lars_tf.precision``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

if int(keras.__version__.split(".")[0]) >= 3:
    from lars_tf import _keras3 as _stack
else:
    from lars_tf import _keras2 as _stack

KERAS3 = _stack.KERAS3
loss_scale_state = _stack.loss_scale_state
set_loss_scale_state = _stack.set_loss_scale_state
minimize = _stack.minimize
LOSS_SCALE_CLASSES = _stack.LOSS_SCALE_CLASSES
DistributedOptimizerBase = _stack.DistributedOptimizerBase
OptimizerBase = _stack.OptimizerBase
compile_options = _stack.compile_options
global_policy_name = _stack.global_policy_name
is_variable = _stack.is_variable
loss_scale_optimizer = _stack.loss_scale_optimizer
plain_variables = _stack.plain_variables
reseed_layers = _stack.reseed_layers
variable_handle = _stack.variable_handle
variable_path = _stack.variable_path


def register(cls):
    """Register a lars_tf class for saving and loading: as ``lars_tf>Name`` and, for
    Keras 2's ``.h5`` files and Horovod's wrapper (which name the class plainly), ``Name``;
    either loads with ``load_model(path)`` once lars_tf is imported, without
    ``custom_objects``."""
    cls = tf.keras.utils.register_keras_serializable(package="lars_tf")(cls)
    tf.keras.utils.get_custom_objects().setdefault(cls.__name__, cls)
    return cls
