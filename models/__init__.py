"""Model registry: ``get(name, input_shape, num_classes)`` builds a registered Keras model.

Imported as ``lars_tf.models`` (setup.py maps this folder there). Any ``tf.keras.Model``
works with the trainer too; registering one makes it selectable by ``--model``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import tensorflow as tf

Builder = Callable[..., tf.keras.Model]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder(input_shape, num_classes, **kwargs)`` available as ``name``."""

    def add(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return add


def names() -> list[str]:
    return sorted(_REGISTRY)


def _builder(name: str) -> Builder:
    if name not in _REGISTRY:
        raise ValueError(f"--model={name!r}: unknown model; registered: {', '.join(names())}")
    return _REGISTRY[name]


def takes(name: str, option: str) -> bool:
    """Whether model ``name``'s builder has the keyword ``option``."""
    return option in inspect.signature(_builder(name)).parameters


def check_options(name: str, **options) -> None:
    """A ``ValueError`` naming the flag when model ``name`` does not take an option that is
    asked for (set to a true value), e.g. ``--zero_init_residual`` for a model without
    residual blocks; an unknown ``name`` is one naming ``--model``."""
    _builder(name)
    for option, value in options.items():
        if value and not takes(name, option):
            able = ", ".join(n for n in names() if takes(n, option)) or "none"
            raise ValueError(f"--{option}: --model={name} does not take it (models that do: "
                             f"{able})")


def get(name: str, input_shape, num_classes: int, **kwargs) -> tf.keras.Model:
    """Build model ``name``; an unknown name is a ``ValueError`` naming ``--model``."""
    return _builder(name)(tuple(input_shape), int(num_classes), **kwargs)


from lars_tf.models import alexnet, resnet, small  # noqa: E402,F401  (registers the models)
