"""NumPy implementations of the documented rules, written from the docstrings (float64)."""

from __future__ import annotations

import numpy as np


def schedule(step, peak, warmup, total, end=0.0, power=2.0):
    if step < warmup:
        return peak * step / max(warmup, 1)
    frac = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return (peak - end) * (1.0 - frac) ** power + end


def lars_step(w, g, m, *, lr, momentum, wd, eta, eps, decay, adapt, mode="paper",
              nesterov=False):
    """One LARS update of one variable. Returns (w, m)."""
    w, g, m = (np.asarray(a, np.float64) for a in (w, g, m))
    wd = wd if decay else 0.0
    u = g + wd * w
    trust = 1.0
    if adapt:
        wn, gn = np.linalg.norm(w), np.linalg.norm(g)
        denom = gn + wd * wn if mode == "paper" else np.linalg.norm(u)
        # the gradient norm the rule is built on must be non-zero (else trust = 1)
        if wn > 0 and (gn if mode == "paper" else np.linalg.norm(u)) > 0:
            trust = eta * wn / (denom + eps)
    m = momentum * m + lr * trust * u
    step = momentum * m + lr * trust * u if nesterov else m
    return w - step, m


def tpu_poly_schedule(step, peak, warmup_epochs, batch, train_steps, examples=1281167,
                      end=1e-4):
    """The ResNet-50 LARS schedule of the code the resnet50-* presets come from (You's
    lars_util.py), written from its description: linear in the epoch up to ``peak`` at
    ``warmup_epochs``, then power-2 decay to ``end`` over ``train_steps - W + 1`` steps,
    with ``W = warmup_epochs * examples // batch``."""
    epoch = step * batch / examples
    if epoch <= warmup_epochs:
        return peak * epoch / warmup_epochs
    w = warmup_epochs * examples // batch
    length = train_steps - w + 1
    done = min(max(1, step - w), length)
    return (peak - end) * (1 - done / length) ** 2 + end
