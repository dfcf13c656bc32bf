"""What "a number" means in a configuration check, written once.

A bool is an int to Python (``True == 1``), so ``isinstance(x, int)`` alone would take
``timeout=True`` for one second; every validator that wants a number or an int asks
these instead, then adds its own bound and its own message::

    if not is_number(value) or value <= 0:
        raise ConfigError(f"... must be a finite number > 0, got {value!r}")

Standard library only: every configuration module imports it, so ``import lbclient``
must not pay for more.
"""

from __future__ import annotations

import math
from typing import TypeGuard


def is_number(value: object) -> TypeGuard[int | float]:
    """An int or a float, not a bool, and finite (not NaN, not +-inf).

    An int too large for a float raises :class:`OverflowError`, as ``math.isfinite``
    does on it."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: object) -> TypeGuard[int]:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
