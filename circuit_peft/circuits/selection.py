"""THE keep rule: which scored components a circuit keeps.

A :class:`Keep` asks for exactly one of

* ``k``: the ``k`` best (``k`` larger than the scored items is refused, never silently cut);
* ``fraction``: the best share, rounded down and at least 1 (:func:`circuit_peft.fractions.keep_count`);
* ``z``: those whose z-score ``(s - mean) / sd`` is ``>= z`` (mean and population standard deviation over
  the ranked scores; at least the best one is kept, as for a fraction; all-equal scores are refused,
  their z-scores being undefined),

applied to each kind's scores separately (``per_kind=True``, the default: scores of a head and of a neuron
are on different scales) or to all of them pooled. ``Circuit.top``/``top_each_kind``, the locators'
``keep`` and the reasoning heads' ``top_heads`` all keep through :func:`keep_ranked`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Sequence, TypeVar

from .. import validation
from ..errors import CircuitPeftError
from ..fractions import keep_count

T = TypeVar("T", bound=Hashable)


@dataclass(frozen=True)
class Keep:
    """Exactly one of ``k``, ``fraction`` or ``z`` (module docstring), per kind or pooled."""

    k: int | None = None
    fraction: float | None = None
    z: float | None = None
    per_kind: bool = True

    def __post_init__(self) -> None:
        given = [name for name in ("k", "fraction", "z") if getattr(self, name) is not None]
        if len(given) != 1:
            raise CircuitPeftError(f"keep: give exactly one of k=, fraction= or z= (got {given or 'none'})")
        if self.k is not None:
            object.__setattr__(self, "k", validation.count(self.k, "k"))
        if self.fraction is not None:
            validation.share(self.fraction, "fraction")
        if self.z is not None:
            validation.finite_number(self.z, "z")

    @classmethod
    def of(cls, keep: "Keep | float | None") -> "Keep | None":
        """``keep`` as a :class:`Keep`: a number is a fraction of each kind; None stays None (keep all)."""
        if keep is None or isinstance(keep, Keep):
            return keep
        return cls(fraction=keep)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form recorded in a circuit's ``meta["selection"]``."""
        return {"k": self.k, "fraction": self.fraction, "z": self.z, "per_kind": self.per_kind}


def keep_ranked(ranked: Sequence[tuple[T, float]], keep: Keep, what: str = "scored components") -> list[T]:
    """The items of ``ranked`` ((item, score) pairs, best first) that ``keep`` keeps, in ranked order."""
    n = len(ranked)
    if not n:
        raise CircuitPeftError(f"no {what} to rank: the scores are empty")
    if keep.k is not None:
        if keep.k > n:
            raise CircuitPeftError(f"top k={keep.k} is larger than the number of {what} ({n}); use k <= {n}")
        return [c for c, _ in ranked[: keep.k]]
    if keep.fraction is not None:
        return [c for c, _ in ranked[: keep_count(n, keep.fraction)]]
    vals = [_finite(s) for _, s in ranked]
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / n)
    if sd == 0 or not math.isfinite(sd):
        raise CircuitPeftError(f"z={keep.z}: all {n} {what} score the same, so z-scores are undefined; "
                               "use k= or fraction=")
    kept = [c for c, v in zip((c for c, _ in ranked), vals) if (v - mean) / sd >= keep.z]
    return kept or [ranked[0][0]]


def _finite(s: float) -> float:
    """NaN scores rank last (and count as -inf)."""
    return -math.inf if s != s else float(s)


__all__ = ["Keep", "keep_ranked"]
