"""frontier.png: test accuracy at a drift budget against the budget, one line per arm, seeds as bands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..stats import mean_se
from .verdict import best_at_budget


def frontier_curves(points: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, dict[str, list[float]]]:
    """Per arm, at every budget where any arm's choice can change (each measured validation KL > 0): the mean
    and standard error over seeds of the test accuracy at that budget (``budget``, ``mean``, ``se``)."""
    budgets = sorted({p["val_kl"] for arm in points.values() for seed in arm.values() for p in seed if p["val_kl"] > 0})
    curves = {}
    for name, by_seed in points.items():
        means, ses = [], []
        for b in budgets:
            mean, se = mean_se([best_at_budget(seed_points, b)["test_acc"] for seed_points in by_seed.values()])
            means.append(mean)
            ses.append(se or 0.0)
        curves[name] = {"budget": budgets, "mean": means, "se": ses}
    return curves


def plot_frontier(points: dict[str, dict[int, list[dict[str, Any]]]], budgets: dict[str, float],
                  path: str | Path, title: str = "") -> Path:
    """Draw :func:`frontier_curves` (x: validation KL budget, log scale; y: test accuracy; band: +/- one SE
    over seeds) with the verdict's budgets as dashed lines; write ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import atomic_path

    curves = frontier_curves(points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        if not c["budget"]:
            continue
        low = [m - s for m, s in zip(c["mean"], c["se"])]
        high = [m + s for m, s in zip(c["mean"], c["se"])]
        (line,) = ax.step(c["budget"], c["mean"], where="post", label=name)
        ax.fill_between(c["budget"], low, high, step="post", alpha=0.2, color=line.get_color())
    for name, b in budgets.items():
        if b > 0:
            ax.axvline(b, color="grey", linestyle="--", linewidth=0.8)
            ax.text(b, ax.get_ylim()[1], f" B={name}", rotation=90, va="top", fontsize=7, color="grey")
    if any(c["budget"] for c in curves.values()):
        ax.set_xscale("log")
    ax.set_xlabel("drift budget B: validation KL(base || arm) on general text, nats/token")
    ax.set_ylabel("test accuracy at budget B")
    ax.set_title(title or "accuracy vs drift (mean over seeds, band: +/- 1 SE)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


__all__ = ["frontier_curves", "plot_frontier"]
