"""The select stage: the training rows the run trains on (all, or ``cfg.select``'s subset)."""

from __future__ import annotations

from typing import Any

from ..config import TrainConfig
from ..context import RunContext


def _select(model, tokenizer, rows, cfg: TrainConfig) -> dict[str, Any]:
    """Row numbers of ``rows`` that ``cfg.select`` keeps (``cfg.select_fraction`` of them)."""
    from ...select import find_reasoning_heads, select_data

    heads = None
    if cfg.select == "circuitseer":
        probe = rows[: min(8, len(rows))]
        heads = find_reasoning_heads(model, tokenizer, probe, method="ablation_estimate",
                                     prompt_field=cfg.question_field, solution_field=cfg.answer_field)
    result = select_data(model, tokenizer, rows, method=cfg.select, fraction=cfg.select_fraction, heads=heads,
                         seed=cfg.seed, question_field=cfg.question_field, answer_field=cfg.answer_field)
    return {"rows": sorted(int(i) for i in result.indices), "method": cfg.select}


def select_stage(ctx: RunContext) -> list[dict[str, Any]]:
    """``ctx.train`` narrowed to the ``select`` stage's subset (unchanged without ``cfg.select``)."""
    cfg = ctx.cfg
    if not cfg.select:
        return ctx.train
    sel = ctx.run.stage("select", lambda: _select(ctx.model, ctx.tokenizer, ctx.train, cfg), ctx.log,
                        every_process=cfg.select == "circuitseer")  # CircuitSeer scores a shard per process
    chosen = [ctx.train[i] for i in sel["rows"]]
    ctx.log(f"[select] {cfg.select}: {len(chosen)} of {len(ctx.train)} training examples")
    ctx.train = chosen
    return chosen


select_rows = _select  # the public name

__all__ = ["select_rows", "select_stage"]
