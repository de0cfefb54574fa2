"""Type checks of numbers that options take, where Python's bool would pass as one (``True`` is an
``int``): each caller raises its own ValueError naming the option."""

from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (numpy's too), not a bool (numpy's bool is no ``numbers.Real``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
