"""The one rule for "keep a fraction" (circuits, reasoning heads, data subsets, DCM caps)."""

from __future__ import annotations

import math

from .validation import share


def keep_count(n: int, fraction: float) -> int:
    """How many of ``n`` ranked items a ``fraction`` keeps: rounded down, so that the share kept never
    exceeds the share asked for, and at least 1. ``fraction`` must be in (0, 1]."""
    share(fraction, "fraction")
    if n < 1:
        raise ValueError("nothing to keep a fraction of: the list is empty")
    return max(1, min(n, math.floor(float(fraction) * n + 1e-9)))


__all__ = ["keep_count"]
