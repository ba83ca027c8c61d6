"""LARS: layer-wise adaptive rate scaling as a Keras optimizer (Keras 2.15 and Keras 3)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import tensorflow as tf

from lars_tf import keras_compat
from lars_tf.validation import check_number

# Biases and normalisation scales/offsets: Keras names them `.../bias`, `.../gamma`,
# `.../beta` (BatchNormalization, LayerNormalization, GroupNormalization), `.../scale`
# (RMSNormalization) or `.../offset`, with `:0` on Keras 2.
DEFAULT_EXCLUDE: tuple[str, ...] = (r"(^|/)bias(:\d+)?$",
                                    r"(^|/)(gamma|beta|scale|offset)(:\d+)?$")

TRUST_RATIO_MODES = ("paper", "decayed_gradient")
_CLIPPING = ("clipnorm", "clipvalue", "global_clipnorm")


@keras_compat.register
class LARS(keras_compat.OptimizerBase):
    r"""Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017; You et al. 2018).

    Each variable ``w`` (a "layer") gets its own learning rate, scaled by a trust ratio that
    compares the size of the weights with the size of their gradient ``g``. With global
    learning rate ``lr`` (a float or a schedule), trust coefficient ``eta``, weight decay
    ``wd``, momentum ``mu`` and momentum buffer ``m``:

    .. math::

        u     &= g + wd \cdot w \\
        trust &= \eta \frac{\lVert w \rVert}{\lVert g \rVert + wd \lVert w \rVert + \epsilon}
                 \quad \text{(trust_ratio_mode="paper", the default)} \\
        trust &= \eta \frac{\lVert w \rVert}{\lVert g + wd \cdot w \rVert + \epsilon}
                 \quad \text{(trust_ratio_mode="decayed_gradient")} \\
        m     &\leftarrow \mu m + lr \cdot trust \cdot u \\
        w     &\leftarrow w - m
        \quad \text{(nesterov: } w \leftarrow w - (\mu m + lr \cdot trust \cdot u))

    ``trust`` is 1 when ``||w||`` or the denominator's gradient norm (``||g||``, or
    ``||g + wd w||`` in ``decayed_gradient`` mode) is 0 (fresh zero-initialised layers, or a layer
    with no gradient signal), so such a layer moves at the global rate instead of not at all
    or by an infinite step.

    The default rule is Algorithm 1 of "ImageNet Training in Minutes" (You et al.). The
    ``decayed_gradient`` rule, used by TF Model Garden and optax, takes the norm of the
    decayed gradient instead; by the triangle inequality its denominator is never larger,
    so its steps are never smaller. The paper's rule is the default because it is the one
    whose 8K-32K batch ImageNet results were published.

    Variables whose name (``dense/kernel``: Keras 3's ``path``, Keras 2's ``name``) matches
    a regex in ``exclude_from_weight_decay`` use ``wd = 0``;
    those matching ``exclude_from_layer_adaptation`` use ``trust = 1`` (plain momentum SGD
    at the global rate). By default both lists hold biases and every normalisation layer's
    scale and offset (``gamma``/``beta``, RMSNormalization's ``scale``, ``offset``):
    they are few parameters, their scale carries no meaning that a trust ratio should
    preserve, and decaying BatchNorm's gamma/beta only fights the normalisation (Jia et al.,
    Goyal et al.). Weight decay is applied only here: do not also add an L2 loss, and the
    Keras base class's decoupled ``weight_decay`` is not used.

    Norms and the trust ratio are computed in float32 whatever the variable dtype, so a
    float16/bfloat16 variable or gradient neither overflows nor loses the ratio.

    Usage:

    >>> opt = LARS(learning_rate=0.1, momentum=0.9, weight_decay=1e-4)
    >>> w = tf.Variable([3.0, 4.0])
    >>> _ = opt.apply_gradients([(tf.constant([0.6, 0.8]), w)])
    >>> # ||w|| = 5, ||g|| = 1: trust = 0.001 * 5 / (1 + 1e-4 * 5) = 0.0049975, so the
    >>> # step is 0.1 * trust * (g + 1e-4 * w) = [0.0003, 0.0004]
    >>> w.numpy()
    array([2.9997, 3.9996], dtype=float32)

    Args:
        learning_rate: float or ``tf.keras.optimizers.schedules.LearningRateSchedule``.
        momentum: momentum ``mu`` in [0, 1).
        nesterov: use Nesterov momentum.
        weight_decay: L2 weight-decay factor ``wd`` >= 0, applied inside the LARS update.
        trust_coefficient: ``eta`` > 0 (0.001 in the paper).
        epsilon: added to the trust ratio's denominator, >= 0.
        exclude_from_weight_decay: regexes on variable names that get ``wd = 0``.
        exclude_from_layer_adaptation: regexes on variable names that get ``trust = 1``.
        trust_ratio_mode: ``"paper"`` or ``"decayed_gradient"`` (see above).
        name: optimizer name.
        **kwargs: passed to ``tf.keras.optimizers.Optimizer`` (``use_ema``, ...);
            ``weight_decay`` there is replaced by this class's own.
            ``clipnorm``, ``clipvalue`` and ``global_clipnorm`` are refused: the trust
            ratio rescales the clipped gradient back, so clipping cannot bound a LARS step.
    """

    def __init__(
        self,
        learning_rate: float | tf.keras.optimizers.schedules.LearningRateSchedule = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        epsilon: float = 0.0,
        exclude_from_weight_decay: Sequence[str] | None = DEFAULT_EXCLUDE,
        exclude_from_layer_adaptation: Sequence[str] | None = DEFAULT_EXCLUDE,
        trust_ratio_mode: str = "paper",
        name: str = "LARS",
        **kwargs,
    ):
        kwargs.pop("is_legacy_optimizer", None)
        kwargs.pop("weight_decay", None)
        clipping = sorted(k for k in _CLIPPING if kwargs.get(k) is not None)
        if clipping:
            raise ValueError(
                f"LARS: {', '.join(clipping)} cannot bound a LARS step, so it is refused: the "
                "trust ratio rescales every layer's update to trust_coefficient * lr * "
                "||w|| whatever the gradient's size, which undoes any clipping before it. "
                "LARS already bounds each layer's step relative to its weights; lower "
                "trust_coefficient or the learning rate for smaller steps")
        check_number("LARS momentum", momentum, lo=0.0, hi=1.0, hi_open=True)
        check_number("LARS weight_decay", weight_decay, lo=0.0)
        check_number("LARS trust_coefficient", trust_coefficient, lo=0.0, lo_open=True)
        check_number("LARS epsilon", epsilon, lo=0.0)
        if not isinstance(learning_rate, tf.keras.optimizers.schedules.LearningRateSchedule):
            if callable(learning_rate):
                raise ValueError(
                    "LARS: learning_rate must be a float or a LearningRateSchedule, "
                    f"got {learning_rate!r}"
                )
            check_number("LARS learning_rate", learning_rate, lo=0.0, lo_open=True)
        if trust_ratio_mode not in TRUST_RATIO_MODES:
            raise ValueError(
                f"LARS: trust_ratio_mode must be one of {TRUST_RATIO_MODES}, "
                f"got {trust_ratio_mode!r}"
            )
        super().__init__(learning_rate, name=name, weight_decay=None, **kwargs)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.lars_weight_decay = float(weight_decay)
        self.trust_coefficient = float(trust_coefficient)
        self.epsilon = float(epsilon)
        self.exclude_from_weight_decay_patterns = _compile("exclude_from_weight_decay",
                                                           exclude_from_weight_decay)
        self.exclude_from_layer_adaptation_patterns = _compile(
            "exclude_from_layer_adaptation", exclude_from_layer_adaptation)
        self.trust_ratio_mode = trust_ratio_mode
        self._excluded_keys: set[str] = set()

    # -- which variables get what -------------------------------------------------------
    def uses_weight_decay(self, variable: tf.Variable) -> bool:
        """True when ``variable`` is decayed (``weight_decay > 0`` and its name is not excluded)."""
        return (self.lars_weight_decay > 0
                and self._var_key(variable) not in self._excluded_keys
                and not _matches(self.exclude_from_weight_decay_patterns,
                                 keras_compat.variable_path(variable)))

    def exclude_from_weight_decay(self, var_list=None, var_names=None) -> None:
        """Keras' method, honoured: the variables in ``var_list``, and those whose name
        contains one of the strings ``var_names``, get ``wd = 0`` (on top of the
        ``exclude_from_weight_decay`` regexes). Call it before the optimizer is built."""
        if self.is_built:
            raise ValueError("LARS.exclude_from_weight_decay() must be called before the "
                             "optimizer is built (before its first apply_gradients)")
        if isinstance(var_names, str):
            var_names = [var_names]
        self.exclude_from_weight_decay_patterns += tuple(
            re.compile(re.escape(n)) for n in (var_names or ()))
        self._excluded_keys |= {self._var_key(v) for v in (var_list or ())}

    def uses_layer_adaptation(self, variable: tf.Variable) -> bool:
        """True when ``variable``'s step is scaled by its trust ratio."""
        return not _matches(self.exclude_from_layer_adaptation_patterns,
                            keras_compat.variable_path(variable))

    # -- Keras optimizer protocol ---------------------------------------------------------
    def _build_slots(self, var_list):
        self.momentums = [self._slot(var, "m") for var in var_list]
        self._rules = {
            self._var_key(var): (self.uses_weight_decay(var), self.uses_layer_adaptation(var))
            for var in var_list
        }

    def _update(self, gradient, variable, lr):
        decay, adapt = self._rules[self._var_key(variable)]
        accum = self.momentums[self._slot_index(variable)]
        dtype = tf.as_dtype(variable.dtype)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)

        update = gradient
        if decay:
            update = gradient + tf.cast(self.lars_weight_decay, dtype) * variable
        if adapt:
            lr = lr * self._trust_ratio(gradient, variable, update, decay)

        # accum <- mu * accum - lr * update; w <- w + accum (nesterov: w + mu*accum - lr*update).
        # The Keras momentum kernel keeps the buffer negated (accum = -m), an equivalent form
        # of the docstring's rule, and does the whole update in one pass over memory.
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=keras_compat.variable_handle(variable),
            accum=keras_compat.variable_handle(accum),
            lr=tf.cast(lr, dtype),
            grad=update,
            momentum=tf.cast(self.momentum, dtype),
            use_locking=False,
            use_nesterov=self.nesterov,
        )

    def _trust_ratio(self, gradient, variable, update, decay: bool) -> tf.Tensor:
        w_norm = _norm32(variable)
        g_norm = _norm32(gradient)
        if self.trust_ratio_mode == "paper":
            denom = g_norm
            if decay:
                denom = denom + self.lars_weight_decay * w_norm
        else:
            denom = _norm32(update) if decay else g_norm
        ratio = self.trust_coefficient * w_norm / (denom + self.epsilon)
        # The guard tests the gradient norm the rule is built on: ||g|| in paper mode (as
        # the paper's Algorithm 1), the decayed gradient's in decayed_gradient mode (as Model
        # Garden and optax), where a zero g of a decayed variable still moves by wd * w.
        guard = g_norm if self.trust_ratio_mode == "paper" else denom
        ok = tf.logical_and(w_norm > 0.0, guard > 0.0)
        return tf.where(ok, ratio, tf.ones_like(ratio))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "learning_rate": self._learning_rate_config(),
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "weight_decay": self.lars_weight_decay,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
                "exclude_from_weight_decay": [
                    p.pattern for p in self.exclude_from_weight_decay_patterns],
                "exclude_from_layer_adaptation": [
                    p.pattern for p in self.exclude_from_layer_adaptation_patterns],
                "trust_ratio_mode": self.trust_ratio_mode,
            }
        )
        return config


def _norm32(x: tf.Tensor) -> tf.Tensor:
    """L2 norm in float32; ``l2_loss`` is one reduction kernel with no temporary tensor."""
    x = tf.cast(x, tf.float32)
    return tf.sqrt(2.0 * tf.nn.l2_loss(x))


def _compile(arg: str, patterns: Sequence[str] | None) -> tuple[re.Pattern, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"LARS: {arg} has an invalid regex {p!r}: {e}") from None
    return tuple(out)


def _matches(patterns: Sequence[re.Pattern], name: str) -> bool:
    return any(p.search(name) for p in patterns)
