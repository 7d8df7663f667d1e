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
    """The circuit :func:`train` trains: ``cfg.locate`` = ``"gradient"`` (SFT-loss gradient on the gold
    solutions, answer tokens weighted ``cfg.sft.pivotal_weight``), ``"gradient_contrast"`` (that gradient's
    norm divided by the LM-loss gradient's on general text from ``cfg.side_effect_data_dir``), ``"attribution"`` (first-wrong-digit
    pivots mined into ``mining_dir``, then logit-difference attribution) or ``"ablation"`` (the exact head
    ablation scan: query heads only, scored by how much the gold solutions' loss rises when each alone
    is ablated). ``keep_fraction`` of each kind is kept (None: every component scored, e.g. to draw
    several sizes from one scan)."""
    from ...locate import attribution_scan, gradient_scan

    if cfg.locate in ("gradient", "gradient_contrast", "ablation"):
        data = gold_sft_rows(tokenizer, rows, style, cfg)
        if cfg.locate == "ablation":
            return _ablation_scan(model, tokenizer, data, keep_fraction, progress)
        reference = _reference_rows(tokenizer, cfg) if cfg.locate == "gradient_contrast" else None
        return gradient_scan(model, data, keep_fraction=keep_fraction, pad_token_id=tokenizer.pad_token_id,
                             progress=progress, reference=reference)
    records = _mine_digit_pivots(model, tokenizer, rows, style, cfg, mining_dir, progress)
    return attribution_scan(model, None, records, target="logit_diff", keep_fraction=keep_fraction,
                            progress=progress)


def _ablation_scan(model, tokenizer, data, keep_fraction: float | None, progress: bool):
    """:func:`~circuit_peft.locate.head_ablation_scan` of the training rows as tokenised for SFT (the
    prompt's tokens, then the gold solution's with EOS; the scan reads the rows' labels): every query head,
    uniform ablation."""
    from ...locate import head_ablation_scan

    return head_ablation_scan(model, tokenizer, data, keep_fraction=keep_fraction, progress=progress)


def _reference_rows(tokenizer, cfg: TrainConfig, n_chunks: int = 32, chunk_length: int = 128) -> list[dict]:
    """General-text rows for the contrast locator: the last ``n_chunks`` chunks of the side-effect text
    (the KL measurement reads the first ones, so the two do not overlap on a long text)."""
    from ...evaluate.data import load_text
    from ...evaluate.side_effects import text_chunks
    from ...locate import general_text_rows

    chunks = text_chunks(tokenizer, load_text(cfg.side_effect_data_dir), chunk_length, None)
    return general_text_rows(chunks[-n_chunks:])


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
