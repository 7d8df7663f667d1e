"""The rate-grid stage: one arm (the circuit or a control) trained by pivotal SFT at ``cfg.sft.learning_rate``,
or at each rate of ``cfg.learning_rates`` keeping the best on the validation rows (:mod:`..rates`)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Any

from ..config import TrainConfig
from ..context import RunFolder
from ..examples import gold_solution_batches, gold_solution_loss
from ..rates import fit_on_grid
from ..sft import train_sft
from .evaluate import measure_accuracy


def _train_arm(run: RunFolder, tag: str, model, tokenizer, examples, val_rows, style: str, cfg: TrainConfig,
               log) -> dict[str, Any]:
    """Pivotal SFT of ``model``'s adapter at ``cfg.sft.learning_rate``, or with ``cfg.learning_rates`` at
    each rate, keeping the one with the best accuracy on ``val_rows`` (ties: the lower gold-solution loss
    there). Returns the rate (and the validation accuracy and loss per rate)."""
    trainer_dir = run.path / f"trainer_{tag}"

    def train_at(m, lr: float) -> None:
        train_sft(m, tokenizer, examples, replace(cfg.sft, learning_rate=lr), str(trainer_dir), style=style,
                  progress=True)
        shutil.rmtree(trainer_dir, ignore_errors=True)

    if not cfg.learning_rates:
        train_at(model, cfg.sft.learning_rate)
        return {"lr": cfg.sft.learning_rate}
    val_batches = gold_solution_batches(model, tokenizer, val_rows, style, cfg)  # tokenised once, every rate
    choice = fit_on_grid(run, tag, model, train_at,
                         lambda m: measure_accuracy(m, tokenizer, val_rows, style, cfg)["accuracy"], cfg.learning_rates, log,
                         tie_break=lambda m: gold_solution_loss(m, val_batches), extensions=cfg.grid_extensions)
    log(f"[{tag}] learning rate {choice.lr:g} chosen on {len(val_rows)} validation rows"
        + (" (the grid's edge: the best rate may lie outside)" if choice.at_edge else ""))
    return {"lr": choice.lr, "validation_accuracy": choice.validation_accuracy,
            "validation_loss": choice.validation_loss, "n_validation": len(val_rows), "lr_at_grid_edge": choice.at_edge}



train_arm = _train_arm  # the public name: the fit and controls stages, compare's arms

__all__ = ["train_arm"]
