"""CircuitSeer stage 3: soft sampling of a subset by score (Gumbel-top-k).

Drawing ``k`` items without replacement with probability ``softmax(z(s) / tau)`` is the same as
taking the ``k`` largest keys ``z(s_i) / tau + G_i`` with ``G_i`` standard Gumbel noise. ``z`` is
the z-score of the scores, so ``tau`` has the same meaning on every pool: ``tau -> 0`` gives
hard top-k, large ``tau`` gives a uniform random subset. Default ``tau = 0.5`` (our choice; the
paper does not give its value). NaN scores rank last.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .. import validation
from ..errors import located
from ..fractions import keep_count

DEFAULT_TAU = 0.5


def subset_size(n: int, fraction: float | None = None, k: int | None = None) -> int:
    """Number of items to keep: ``k`` (an integer in [1, n]), or :func:`~circuit_peft.fractions.keep_count` of
    ``fraction``; anything else is refused (:class:`~circuit_peft.errors.CircuitPeftError`)."""
    if k is not None:
        return validation.count(k, "k", at_most=n, of="the rows in the pool")
    if n == 0:
        raise ValueError("the pool is empty: nothing to select from")
    if fraction is None:
        raise ValueError("fraction must be in (0, 1] (e.g. 0.1 for 10 %), got None; or give k=")
    return keep_count(n, fraction)


def zscore(scores: Sequence[float]) -> np.ndarray:
    """(s - mean) / sd over finite scores; NaN/inf become -inf; a constant pool gives zeros."""
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    z = np.full(s.shape, -np.inf)
    if ok.any():
        mu, sd = s[ok].mean(), s[ok].std()
        z[ok] = (s[ok] - mu) / sd if sd > 0 else 0.0
    return z


def gumbel_top_k(scores: Sequence[float], k: int, tau: float = DEFAULT_TAU, seed: int = 0) -> np.ndarray:
    """Indices of ``k`` items drawn without replacement with probability ``softmax(z(s)/tau)``.

    Returned in draw order (highest key first). ``tau=0`` is exact top-k (ties by index);
    ``tau=inf`` is a uniform draw. Deterministic for a given ``seed``.
    """
    if tau < 0 or (isinstance(tau, float) and math.isnan(tau)):
        raise ValueError(f"tau must be >= 0, got {tau}")
    z = zscore(scores)
    k = validation.count(k, "k", at_most=len(z), of="the rows in the pool")
    if tau == 0:
        keys = z
    else:
        gumbel = np.random.default_rng(seed).gumbel(size=len(z))
        if math.isinf(tau):
            keys = np.where(np.isfinite(z), gumbel, -np.inf)
        else:
            keys = z / tau + gumbel
    order = np.lexsort((np.arange(len(z)), -keys))  # stable: higher key first, then lower index
    return order[:k]


def select_indices(
    scores: Sequence[float], fraction: float | None = 0.1, tau: float = DEFAULT_TAU, seed: int = 0,
    k: int | None = None,
) -> np.ndarray:
    """Sorted indices of the soft-sampled subset (``k`` items, or ``fraction`` of the pool)."""
    n = len(scores)
    return np.sort(gumbel_top_k(scores, subset_size(n, fraction, k), tau=tau, seed=seed))


def _scores_of(dataset: Any, scores: Sequence[float] | str) -> np.ndarray:
    """One finite score per row, from ``scores`` or the dataset's column of that name; a NaN, an inf or a
    value that is not a number is refused (:func:`circuit_peft.validation.finite_scores`)."""
    if isinstance(scores, str):
        if scores not in getattr(dataset, "column_names", []):
            raise located("scores", f"the dataset has no score column {scores!r} (columns: {dataset.column_names})")
        return validation.finite_scores(dataset[scores], f"scores (column {scores!r})", len(dataset))
    return validation.finite_scores(scores, "scores", len(dataset))


def select_subset(
    dataset: Any, scores: Sequence[float] | str, fraction: float | None = 0.1, tau: float = DEFAULT_TAU,
    seed: int = 0, k: int | None = None,
) -> Any:
    """The soft-sampled subset of ``dataset`` as a ``datasets.Dataset`` (original order kept).

    ``scores``: one float per row, or the name of a score column (e.g. ``"circuitseer_score"``); every
    score must be a finite number (a row without one cannot be ranked). ``k``: an integer >= 1.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        dataset = datasets.Dataset.from_list(list(dataset))
    idx = select_indices(_scores_of(dataset, scores), fraction=fraction, tau=tau, seed=seed, k=k)
    return dataset.select(idx.tolist())
