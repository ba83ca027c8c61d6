"""One way to check a number, for the config, the optimizer and the schedules.

Every message names what is at fault first, in the caller's own spelling: a flag
(``--momentum=1.5: must be in [0, 1)``) or an argument (``LARS momentum=1.5: ...``).
"""

from __future__ import annotations

import numbers


def check_number(name: str, value, *, lo=None, hi=None, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a real number (an integer
    with ``integer``; never a bool or NaN) in the interval from ``lo`` to ``hi``, each end
    open or closed as asked (``None``: unbounded)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(
            value, numbers.Integral if integer else numbers.Real) or value != value:
        raise ValueError(f"{name}={value!r}: must be {kind}")
    below = lo is not None and (value < lo or (lo_open and value == lo))
    above = hi is not None and (value > hi or (hi_open and value == hi))
    if not (below or above):
        return
    if hi is None:
        bound = f"{'>' if lo_open else '>='} {lo}"
    elif lo is None:
        bound = f"{'<' if hi_open else '<='} {hi}"
    else:
        bound = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ValueError(f"{name}={value!r}: must be {kind} {bound}" if integer
                     else f"{name}={value!r}: must be {bound}")
