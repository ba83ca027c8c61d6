"""The optimizers ``--optimizer`` names, each built from a ``TrainConfig`` and the run's
schedule: one builder per name, registered with ``@register``.

An optimizer is one function here (or in a module of your own imported before the config
is made)::

    @register("adamw", requires=_keras3_only)
    def adamw(config, schedule):
        import keras
        return keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)

The builder gets the config and the schedule (a Keras ``LearningRateSchedule`` that counts
updates) and returns the single-process optimizer; ``lars_tf.build`` puts it inside the
distributed stack (all-reduce, loss scaling). ``requires``: a function returning why the
optimizer cannot run on this stack ("" when it can), checked when the config is made.

This module imports no TensorFlow: the config validates names with it.
"""

from __future__ import annotations

from collections.abc import Callable

Builder = Callable[..., object]
_BUILDERS: dict[str, tuple[Builder, Callable[[], str] | None]] = {}


def register(name: str, requires: Callable[[], str] | None = None) -> Callable[[Builder], Builder]:
    """Register ``builder(config, schedule) -> optimizer`` as ``--optimizer=name``."""
    def add(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"an optimizer named {name!r} is already registered")
        _BUILDERS[name] = (builder, requires)
        return builder

    return add


def names() -> tuple[str, ...]:
    return tuple(_BUILDERS)


def check(name: str) -> None:
    """A ``ValueError`` naming ``--optimizer`` when ``name`` is unknown or cannot run here."""
    if name not in _BUILDERS:
        raise ValueError(f"--optimizer={name!r}: must be one of {names()}")
    requires = _BUILDERS[name][1]
    why = requires() if requires else ""
    if why:
        raise ValueError(f"--optimizer={name}: {why}")


def build(config, schedule):
    """The single-process optimizer ``config.optimizer`` names, on ``schedule``."""
    check(config.optimizer)
    return _BUILDERS[config.optimizer][0](config, schedule)


def _keras3_only() -> str:
    import keras

    if hasattr(keras.optimizers, "Lamb"):
        return ""
    return (f"Keras' Lamb comes with Keras 3; the legacy stack (Keras {keras.__version__}) "
            "has none")


def _lars_kwargs(config, schedule) -> dict:
    return dict(learning_rate=schedule, momentum=config.momentum,
                weight_decay=config.weight_decay, trust_coefficient=config.trust_coefficient)


@register("lars")
def lars(config, schedule):
    """LARS (You et al.): the trust ratio per layer, weight decay inside the update."""
    from lars_tf.optimizers import LARS

    return LARS(**_lars_kwargs(config, schedule))


@register("sgd")
def sgd(config, schedule):
    """Momentum SGD with LARS' weight-decay rule and exclusions, only without the trust
    ratio, so that the two differ in exactly one thing."""
    from lars_tf.optimizers import LARS

    return LARS(exclude_from_layer_adaptation=(".*",), name="SGD",
                **_lars_kwargs(config, schedule))


@register("nesterov")
def nesterov(config, schedule):
    """``sgd`` with Nesterov momentum."""
    from lars_tf.optimizers import LARS

    return LARS(exclude_from_layer_adaptation=(".*",), nesterov=True, name="NesterovSGD",
                **_lars_kwargs(config, schedule))


@register("lamb", requires=_keras3_only)
def lamb(config, schedule):
    """Keras 3's LAMB (Adam's moments with a layer-wise trust ratio), ``--momentum`` as its
    ``beta_1`` and ``--weight_decay`` decoupled (Keras' rule), on the same variables as
    LARS' (biases and normalisation parameters excluded)."""
    import keras

    from lars_tf.optimizers import DEFAULT_EXCLUDE

    opt = keras.optimizers.Lamb(learning_rate=schedule, beta_1=config.momentum, epsilon=1e-6,
                                weight_decay=config.weight_decay or None)
    opt.exclude_from_weight_decay(var_names=list(DEFAULT_EXCLUDE))
    return opt
