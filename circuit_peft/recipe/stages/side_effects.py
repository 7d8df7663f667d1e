"""The side-effects stage: MMLU / TruthfulQA deltas and KL of the adapted model against its base."""

from __future__ import annotations

from typing import Any

from ..config import TrainConfig
from ..context import RunContext


def _mmlu_subjects(cfg: TrainConfig) -> tuple[str, ...] | None:
    """``cfg.mmlu_subjects``, else the default subjects present in the data folder (else all present)."""
    from ...evaluate.data import DEFAULT_MMLU_SUBJECTS, mmlu_subjects_in

    if cfg.mmlu_subjects:
        return tuple(cfg.mmlu_subjects)
    present = mmlu_subjects_in(cfg.side_effect_data_dir)
    return tuple(s for s in DEFAULT_MMLU_SUBJECTS if s in present) or tuple(present) or None


def _measure_side_effects(peft_model, tokenizer, cfg: TrainConfig) -> dict[str, Any]:
    """MMLU / TruthfulQA deltas and KL of ``peft_model`` against itself with the adapter disabled."""
    from ...evaluate.side_effects import side_effects

    se = side_effects(peft_model, tokenizer, cfg.side_effect_data_dir, progress=True, kl_chunks=cfg.kl_chunks,
                      mmlu_subjects=_mmlu_subjects(cfg), mmlu_limit=cfg.mmlu_limit,
                      truthfulqa_limit=cfg.truthfulqa_limit)
    return {k: se[k] for k in ("mmlu_delta", "truthfulqa_delta", "kl") if se.get(k) is not None}



def side_effects_stage(ctx: RunContext, peft_model) -> dict[str, Any]:
    """The ``side_effects`` stage ({} without ``cfg.side_effect_data_dir``)."""
    if not ctx.cfg.side_effect_data_dir:
        return {}
    return ctx.run.stage("side_effects", lambda: _measure_side_effects(peft_model, ctx.tokenizer, ctx.cfg), ctx.log)


measure_side_effects = _measure_side_effects  # the public name (controls measure theirs too)

__all__ = ["measure_side_effects", "side_effects_stage"]
