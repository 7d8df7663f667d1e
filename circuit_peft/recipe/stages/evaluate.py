"""The evaluate stages: held-out accuracy with the run's answer checker (or the completion loss with
``answer='none'``), and the base model's measurement at a token cap chosen on non-held-out rows."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..caps import uncut_measure
from ..config import TrainConfig, checker
from ..context import RunContext
from ..examples import training_examples
from ..sft import pivotal_dataset

CAP_TRAINING_ROWS = 32  # training rows the cap is chosen on when no validation rows are held back


def measure_accuracy(model, tokenizer, rows, style, cfg: TrainConfig) -> dict[str, Any]:
    """Held-out accuracy with ``cfg``'s checker; with ``answer='none'`` the completion loss instead."""
    from ...evaluate.accuracy import evaluate_accuracy

    if cfg.answer == "none":
        return _completion_loss(model, tokenizer, rows, style, cfg)
    r = evaluate_accuracy(model, tokenizer, rows, style=style, shots=cfg.shots, question_field=cfg.question_field,
                          answer_format=checker(cfg),
                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, progress=True)
    return {"accuracy": r.accuracy, "stderr": r.stderr, "count": r.count, "capped_fraction": r.capped_fraction,
            "correct": [int(x["correct"]) for x in r.records]}


def _completion_loss(model, tokenizer, rows, style, cfg: TrainConfig) -> dict[str, Any]:
    """Mean held-out completion loss per token (nats) with its standard error, per row in ``losses``."""
    from ...evaluate.accuracy import completion_loss
    from ...evaluate.generation import eval_mode

    data = pivotal_dataset(tokenizer, training_examples(tokenizer, rows, style, cfg), 1.0, style)
    with eval_mode(model):
        return completion_loss(model, tokenizer, [dict(r) for r in data], batch_size=cfg.eval_batch_size)


def _before(model, tokenizer, rows, cap_rows, style: str, cfg: TrainConfig, log) -> dict[str, Any]:
    """The base model on the held-out ``rows``: accuracy at a cap chosen on ``cap_rows`` (validation or
    training rows, never the held-out ones) to cut few answers (:mod:`..caps`); the held-out rows' cut share
    is reported, not used. With ``answer='none'``: the completion loss (nothing generated)."""
    if cfg.answer == "none":
        return measure_accuracy(model, tokenizer, rows, style, cfg)
    chosen = uncut_measure(lambda cap: measure_accuracy(model, tokenizer, cap_rows, style, replace(cfg, max_new_tokens=cap)),
                           cfg.max_new_tokens, cfg.max_new_tokens_limit, cfg.max_cut_share, log,
                           what=f"the base model on {len(cap_rows)} non-held-out rows")
    cap = chosen["max_new_tokens"]
    return {**measure_accuracy(model, tokenizer, rows, style, replace(cfg, max_new_tokens=cap)), "max_new_tokens": cap,
            "caps_tried": chosen["caps_tried"], "cap_rows": len(cap_rows),
            "cap_rows_capped_fraction": chosen["capped_fraction"]}


def measured(result: dict[str, Any]) -> str:
    """One measurement in words: accuracy, or completion loss, with its standard error."""
    if "loss" in result:
        return f"completion loss {result['loss']:.4f} +/- {result['stderr']:.4f} nats/token"
    return f"accuracy {result['accuracy']:.3f} +/- {result['stderr']:.3f}"


def before_stage(ctx: RunContext) -> dict[str, Any]:
    """The ``before`` stage: the base on the held-out rows at the cap chosen on validation rows (else up to
    :data:`CAP_TRAINING_ROWS` training rows); every later arm is measured at that cap (``ctx.cfg`` updated,
    ``ctx.mining_cfg`` keeping the run's own cap for mining)."""
    cfg = ctx.cfg
    cap_rows = ctx.val or ctx.train[:CAP_TRAINING_ROWS]  # the cap is chosen on rows the verdict is not read on
    before = ctx.run.stage("before", lambda: _before(ctx.model, ctx.tokenizer, ctx.heldout, cap_rows, ctx.style,
                                                     cfg, ctx.log), ctx.log)
    ctx.mining_cfg = cfg  # mining keeps the run's own cap: the locate stage mined into the same folder with it
    ctx.cfg = replace(cfg, max_new_tokens=before.get("max_new_tokens", cfg.max_new_tokens))  # every arm at that cap
    ctx.log(f"[before] held-out {measured(before)}" + ("" if "loss" in before else
            f" ({ctx.cfg.max_new_tokens} new tokens, {100 * before['capped_fraction']:.0f} % of held-out answers cut)"))
    return before


def after_stage(ctx: RunContext, peft_model) -> dict[str, Any]:
    """The ``after`` stage: the fitted circuit on the held-out rows, at the base's cap."""
    peft_model.eval()
    after = ctx.run.stage("after", lambda: measure_accuracy(peft_model, ctx.tokenizer, ctx.heldout, ctx.style,
                                                            ctx.cfg), ctx.log)
    ctx.log(f"[after] held-out {measured(after)}")
    return after


__all__ = ["CAP_TRAINING_ROWS", "after_stage", "before_stage", "measure_accuracy", "measured"]
