"""One call from a pool to a subset, for every method: :func:`select_data` (used by the CLI)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import validation
from ..errors import located
from .baselines import (
    METHODS, ResponseLossScorer, ifd_indices, length_matched_indices, max_loss_indices, prompt_lengths, random_indices,
)
from .heads import ReasoningHeads
from .sampling import DEFAULT_TAU, select_indices, subset_size
from .scoring import CircuitSeerScorer, length_spearman

logger = logging.getLogger(__name__)


@dataclass
class SelectionResult:
    """``subset`` (``datasets.Dataset``), sorted pool ``indices``, per-row ``scores`` (None for random)
    and ``info`` (method, seconds, examples/s, length correlation, ...)."""

    subset: Any
    indices: np.ndarray
    scores: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)


def select_data(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    method: str = "circuitseer",
    fraction: float = 0.1,
    heads: ReasoningHeads | list | str | None = None,
    tau: float = DEFAULT_TAU,
    seed: int = 0,
    question_field: str = "question",
    answer_field: str = "answer",
    score_column: str = "score",
    **scorer_kwargs: Any,
) -> SelectionResult:
    """Score ``dataset`` with ``method`` and keep ``fraction`` of it (``model``/``tokenizer`` may be None
    for ``random``; options are keywords).

    ``circuitseer``: Gumbel-top-k (``tau``, ``seed``) over :class:`CircuitSeerScorer` scores
    (needs ``heads``); ``random``: uniform (``seed``); ``length-matched``: random with the length
    profile of the CircuitSeer subset; ``max-loss``: top ``L(answer|question)``; ``ifd``: top
    ``L(answer|question)/L(answer)`` among IFD <= 1. ``scorer_kwargs`` go to the scorer
    (``batch_size``, ``max_length``, ``on_long``, ``cache_dir``, ``query``, ``exclude_sink``, ...).
    The subset gets a ``score_column`` (not random) and a ``pool_index`` column: names the data must not
    already use (refused before any scoring, :func:`check_added_columns`).
    """
    import datasets

    if isinstance(model, (list, tuple, datasets.Dataset)) or isinstance(tokenizer, str):
        raise TypeError("select_data(model, tokenizer, dataset, method=..., fraction=...): the first argument is "
                        "data; the old order was select_data(dataset, method, fraction, model, tokenizer)")
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; use one of {METHODS}")
    if not isinstance(dataset, datasets.Dataset):
        dataset = datasets.Dataset.from_list(list(dataset))
    check_added_columns(dataset.column_names, method, score_column, "score_column")
    k = subset_size(len(dataset), fraction)
    if method != "random" and (model is None or tokenizer is None):
        raise ValueError(f"method {method!r} needs the reference model and its tokenizer")
    t0 = time.perf_counter()
    info: dict[str, Any] = {"method": method, "pool": len(dataset), "selected": k}
    scores = None
    if method == "random":
        idx = random_indices(len(dataset), k=k, seed=seed)
    elif method in ("circuitseer", "length-matched"):
        if heads is None:
            raise ValueError("CircuitSeer needs reasoning heads: pass a heads file (--heads) or a list of (layer, head)")
        scorer = CircuitSeerScorer(model, tokenizer, heads, question_field=question_field, **scorer_kwargs)
        scores = scorer.score(dataset)
        info["non_finite_scores"] = _check_finite(scores, k, method)
        idx = select_indices(scores, k=k, tau=tau, seed=seed)
        info["score_length_spearman"] = scorer.length_spearman
        info["heads"] = [list(h) for h in scorer.heads.heads]
        if method == "length-matched":
            idx = length_matched_indices(scorer.lengths, idx, seed=seed + 1)
    else:
        loss = ResponseLossScorer(model, tokenizer, question_field=question_field, answer_field=answer_field,
                                  **{k_: v for k_, v in scorer_kwargs.items()
                                     if k_ in ("batch_size", "max_length", "on_long", "cache_dir", "progress")})
        cond = loss.conditional(dataset)
        if method == "max-loss":
            info["non_finite_scores"] = _check_finite(cond, k, method)
            scores, idx = cond, max_loss_indices(cond, k=k)
        else:
            scores = loss.ifd(dataset, conditional=cond)
            info["non_finite_scores"] = _check_finite(scores, k, method)
            idx = ifd_indices(scores, k=k)
        info["score_length_spearman"] = length_spearman(scores, prompt_lengths(tokenizer, dataset, question_field))
    seconds = time.perf_counter() - t0
    info.update(seconds=round(seconds, 2), examples_per_s=round(len(dataset) / max(seconds, 1e-9), 2))
    subset = dataset.select(idx.tolist())
    subset = subset.add_column("pool_index", idx.tolist())
    if scores is not None:
        subset = subset.add_column(score_column, [float(scores[i]) for i in idx])
    return SelectionResult(subset, idx, scores, info)


def check_added_columns(columns: list[str], method: str, score_column: str, flag: str) -> None:
    """Refuse a ``score_column`` (``flag``: ``score_column`` or ``--score-column``) or a ``pool_index`` column
    the data already has: the subset would not be written (``datasets`` refuses a second column of a name),
    or its scores would overwrite the data's."""
    if method != "random":
        validation.new_column(columns, score_column, flag)
    if "pool_index" in columns:
        raise located("pool_index", f"the data already has a column 'pool_index' (an earlier selection's subset?); "
                                    "the subset adds one with each row's index in this pool: rename or drop it first")
    if method != "random" and score_column == "pool_index":
        raise located(flag, "'pool_index' is the column of each row's index in the pool; choose another name")


def _check_finite(scores: np.ndarray, k: int, method: str) -> int:
    """The number of rows without a finite score; raises when fewer than ``k`` rows have one (a subset
    padded with unscored rows, or NaN written as a score, would be silent garbage)."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(scores, dtype=float)))
    if len(scores) - len(bad) < k:
        raise located(method, f"only {len(scores) - len(bad)} of {len(scores)} rows have a finite score, fewer "
                         f"than the {k} to keep (rows without one: {bad[:8].tolist()}...); rows too short to "
                         "score (e.g. one-word questions or empty answers) cannot be ranked: drop them or lower "
                         "the fraction")
    if len(bad):
        logger.warning("%s: %d of %d rows have no finite score and are never selected (first: %s)", method,
                       len(bad), len(scores), bad[:8].tolist())
    return int(len(bad))


def plot_scores(scores: np.ndarray, indices: np.ndarray, path: str | Path, title: str = "scores") -> Path:
    """Histogram of the pool's scores, selected vs not selected, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(scores, dtype=float)
    chosen = np.zeros(len(scores), dtype=bool)
    chosen[np.asarray(indices, dtype=int)] = True
    finite = np.isfinite(scores)
    bins = np.histogram_bin_edges(scores[finite], bins=40)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(scores[finite & ~chosen], bins=bins, alpha=0.6, label=f"not selected ({(~chosen).sum()})")
    ax.hist(scores[finite & chosen], bins=bins, alpha=0.8, label=f"selected ({chosen.sum()})")
    ax.set_xlabel(title)
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
