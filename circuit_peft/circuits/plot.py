"""A circuit's picture: a layers x heads heatmap per head kind present and the kept MLP neurons per layer.

A view of a :class:`~circuit_peft.circuit.Circuit` (``Circuit.plot`` calls :func:`plot_circuit`); it reads only
the circuit's public attributes and never imports it. matplotlib is imported when a picture is drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files import atomic_path
from .io import per_layer_count

if TYPE_CHECKING:
    from ..circuit import Circuit

HEAD_KINDS: tuple[str, ...] = ("q", "k", "v", "o")
_HEAD_TITLES = {"q": "query heads", "k": "key heads", "v": "value heads", "o": "head outputs"}


def plot_circuit(circuit: "Circuit", path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a PNG (atomically): a layers x heads heatmap per head kind present (score if scored, else 1 for
    kept; kept cells outlined) and the kept-neuron count per layer. Needs the circuit's fingerprint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = circuit.require_fingerprint("plot")
    panels = [k for k in HEAD_KINDS if k in circuit.kinds()] + ["mlp"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, max(3.0, 0.18 * fp["n_layers"] + 1.5)),
                             squeeze=False)
    for ax, kind in zip(axes[0], panels):
        if kind == "mlp":
            _plot_neurons(ax, circuit, fp)
        else:
            _plot_heads(fig, ax, circuit, kind, fp)
    fig.suptitle(title or f"circuit ({circuit.method or 'located'}): "
                 f"{100 * circuit.component_fraction():.2f} % of components kept")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def _plot_neurons(ax, circuit: "Circuit", fp: dict[str, Any]) -> None:
    """Bar chart: kept MLP neurons per layer."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    counts = np.zeros(fp["n_layers"])
    for c in circuit.components:
        if c.kind == "mlp":
            counts[c.layer] += 1
    ax.barh(np.arange(fp["n_layers"]), counts, color="tab:blue")
    ax.set_xlabel(f"kept neurons (of {fp['n_neurons']})")
    ax.set_ylim(fp["n_layers"] - 0.5, -0.5)
    ax.set_xlim(0, max(1.0, counts.max() * 1.05))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("layer")
    ax.set_title("MLP")


def _plot_heads(fig, ax, circuit: "Circuit", kind: str, fp: dict[str, Any]) -> None:
    """Heatmap layers x heads of one head kind: the score if scored, else 1 for kept; kept cells outlined."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    kept = [c for c in circuit.components if c.kind == kind]
    grid = np.full((fp["n_layers"], per_layer_count(fp, kind)), np.nan)
    scored = any(c.kind == kind for c in circuit.scores)
    for c, s in circuit.scores.items():
        if c.kind == kind:
            grid[c.layer, c.index] = s
    if not scored:
        grid[:] = 0.0
        for c in kept:
            grid[c.layer, c.index] = 1.0
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="score" if scored else "kept")
    for c in kept:
        ax.add_patch(plt.Rectangle((c.index - 0.5, c.layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_xlabel("head")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("layer")
    ax.set_title(f"{_HEAD_TITLES[kind]} ({len(kept)} kept)")


__all__ = ["HEAD_KINDS", "plot_circuit"]
