"""Argument checks shared by the user API."""

from __future__ import annotations

import numbers


def count(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int >= minimum``: Python or numpy integers (counts often come out of
    numpy), not bools; else a ValueError naming ``name``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or value < minimum):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
