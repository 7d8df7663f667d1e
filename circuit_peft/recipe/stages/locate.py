"""The locate stage: the circuit :func:`~circuit_peft.recipe.pipeline.train` trains (``circuit.json`` and its
heatmap ``circuit.png``), by the locator ``cfg.locate`` names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import TrainConfig, checker
from ..context import RunContext
from ..examples import gold_sft_rows



def locate_for_training(model, tokenizer, rows, style: str, cfg: TrainConfig, mining_dir: str | os.PathLike,
                        keep_fraction: float | None, progress: bool = True):
    """The circuit :func:`train` trains, by the registered locator ``cfg.locate``
    (:mod:`circuit_peft.locate.registry`) on the task data it reads. Probe-row locators (``gradient``: the
    SFT-loss gradient, answer tokens weighted ``cfg.sft.pivotal_weight``; ``gradient_contrast``: that norm divided
    by the LM-loss gradient's on general text from ``cfg.side_effect_data_dir``; ``ablation``: the exact head
    ablation scan, query heads only; ``ablation_estimate``; ``refined``) read the gold solutions tokenised as SFT
    trains on them; record locators (``attribution``: the logit difference) read first-wrong-digit pivots mined
    into ``mining_dir`` (token ids: the model's own pad id, no tokenizer). ``keep_fraction`` of each kind is kept
    (None: every component scored, e.g. to draw several sizes from one scan)."""
    from ...locate.registry import get_locator

    locator = get_locator(cfg.locate, "locate")
    if locator.reads == "records":
        records = _mine_digit_pivots(model, tokenizer, rows, style, cfg, mining_dir, progress)
        return locator(model, None, records, keep_fraction, progress=progress)
    options = {"reference": _reference_text(cfg)} if cfg.locate == "gradient_contrast" else {}
    return locator(model, tokenizer, gold_sft_rows(tokenizer, rows, style, cfg), keep_fraction, progress=progress,
                   **options)


def _reference_text(cfg: TrainConfig) -> str:
    """The general text of the contrast locator: the side-effect text (its last chunks are read,
    :func:`~circuit_peft.locate.gradient.reference_rows`; the KL measurement reads the first ones)."""
    from ...evaluate.data import load_text

    return load_text(cfg.side_effect_data_dir)


def _mine_digit_pivots(model, tokenizer, rows, style: str, cfg: TrainConfig, mining_dir: str | os.PathLike,
                       progress: bool = True):
    """Pivot records of ``model`` on ``rows`` (mined once into ``mining_dir``, resumable), checked by
    ``cfg.answer``'s checker: the first wrong digit for ``number``, else the paper's branching pivots."""
    from ...cca.mining import MiningConfig, mine_pivotal_tokens

    mining = MiningConfig(pivot="digit" if cfg.answer == "number" else "token", shots=cfg.shots, prompt_style=style,
                          max_new_tokens=cfg.max_new_tokens, question_field=cfg.question_field, seed=cfg.seed)
    return mine_pivotal_tokens(model, tokenizer, rows, mining_dir, mining, answer_format=checker(cfg),
                               progress=progress).records


def _locate(model, tokenizer, rows, style, cfg: TrainConfig, out: Path) -> dict[str, Any]:
    circuit = locate_for_training(model, tokenizer, rows, style, cfg, out / "mining", cfg.circuit_fraction)
    circuit.save(out / "circuit.json")
    circuit.plot(out / "circuit.png", title=f"located circuit ({cfg.locate})")
    return {"components": len(circuit.components), "counts": circuit.counts(),
            "component_fraction": circuit.component_fraction()}



def locate_stage(ctx: RunContext) -> dict[str, Any]:
    """The ``locate`` stage on ``ctx.train`` (the selected rows), saved into the run folder."""
    located = ctx.run.stage("locate", lambda: _locate(ctx.model, ctx.tokenizer, ctx.train, ctx.style, ctx.cfg,
                                                      ctx.out), ctx.log)
    ctx.log(f"[locate] {ctx.cfg.locate}: {located['components']} components "
            f"({100 * located['component_fraction']:.2f} %)")
    return located


mine_digit_pivots = _mine_digit_pivots  # the public name: the CCA fit mines with it

__all__ = ["locate_for_training", "locate_stage", "mine_digit_pivots"]
