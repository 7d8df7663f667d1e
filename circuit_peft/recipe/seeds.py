"""The main job over several seeds: one run folder per seed, the gains and control gaps averaged over seeds.

One training run cannot say whether a gap of a few points is the circuit or the seed. ``circuit-peft train
--seeds 0,1,2`` runs :func:`~circuit_peft.recipe.pipeline.train` once per seed into ``OUT/seed<k>/`` (each
resumable on its own) and writes ``OUT/seeds.json``: per seed and as mean and standard error over seeds,
held-out accuracy before and after, the gain, and located minus each control.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import atomic_write_json
from ..stats import mean_se
from .rates import arms_with_chosen_rate

SEEDS_FILE = "seeds.json"


def seed_folder(output_dir: str | Path, seed: int) -> Path:
    """Where seed ``seed``'s run lives inside a multi-seed output folder."""
    return Path(output_dir) / f"seed{seed}"


def check_seeds_folder(output_dir: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, a folder that holds a single-seed run (its stages would mix with the seeds')."""
    if (Path(output_dir) / "run.json").exists():
        raise ValueError(f"{flag} {output_dir} holds a single-seed run; use another folder for --seeds")


def summarise_seeds(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``{seed: report}`` (reports of :func:`train`) -> per-seed rows and mean / SE over seeds of the
    accuracy (the completion loss with ``answer='none'``) before and after, the gain, and ``located - control``
    for every control all seeds ran."""
    metric = "loss" if "loss" in next(iter(reports.values()))["before"] else "accuracy"  # loss: --answer none
    rows = {seed: {"before": r["before"][metric], "after": r["after"][metric],
                   "gain": r["after"][metric] - r["before"][metric],
                   **{f"minus_{name}": c["gap"] for name, c in (r.get("controls") or {}).items()}}
            for seed, r in sorted(reports.items())}
    keys = [k for k in next(iter(rows.values())) if all(k in row for row in rows.values())]
    summary = {"seeds": sorted(rows), "per_seed": rows}
    for key in keys:
        summary[key], summary[f"{key}_se"] = mean_se([row[key] for row in rows.values()])
    rates = {seed: {name: a["lr"] for name, a in arms_with_chosen_rate(r).items()} for seed, r in sorted(reports.items())}
    if any(rates.values()):
        summary["learning_rates"] = rates
    return summary


def write_seeds_summary(output_dir: str | Path, reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Summarise ``reports`` into ``OUT/seeds.json`` (atomically) and return the summary."""
    summary = summarise_seeds(reports)
    atomic_write_json(Path(output_dir) / SEEDS_FILE, summary)
    return summary


def seeds_table(summary: dict[str, Any]) -> str:
    """Mean +/- SE over seeds, one line per quantity, with the per-seed values."""
    lines = [f"over seeds {', '.join(map(str, summary['seeds']))} (mean +/- standard error over seeds):"]
    for key in [k for k in next(iter(summary["per_seed"].values())) if k in summary]:
        fmt = "{:.3f}" if key in ("before", "after") else "{:+.3f}"
        se = summary[f"{key}_se"]
        per = ", ".join(fmt.format(row[key]) for row in summary["per_seed"].values())
        name = "after - before" if key == "gain" else key.replace("minus_", "located - ")
        lines.append(f"  {name:28s} {fmt.format(summary[key]):>7s}" + (f" +/- {se:.3f}" if se is not None else "")
                     + f"   (per seed: {per})")
    rates = summary.get("learning_rates")
    if rates:
        arms = list(next(iter(rates.values())))
        lines.append("  learning rate chosen on validation, per seed: " + "; ".join(
            f"{arm} {', '.join(format(r[arm], 'g') for r in rates.values() if arm in r)}" for arm in arms))
    return "\n".join(lines)


__all__ = ["SEEDS_FILE", "check_seeds_folder", "seed_folder", "seeds_table", "summarise_seeds",
           "write_seeds_summary"]
