"""The controls stage: each ``cfg.controls`` arm (:mod:`..controls`) trained like the circuit (same rows, recipe
and rate grid, a fresh base model each) and measured on the same held-out rows; located minus control, paired."""

from __future__ import annotations

from typing import Any

from ..context import RunContext
from ..controls import control_model, paired_gap
from ..examples import training_examples
from .evaluate import measure_accuracy
from .fit import adapter_config
from .rates import train_arm
from .side_effects import measure_side_effects


def controls_stage(ctx: RunContext, circuit, after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Train and measure every ``cfg.controls`` arm like the circuit (one stage each, a fresh base model
    each); located minus control, paired over the held-out problems."""
    out = {}
    for name in ctx.cfg.controls:
        result = dict(ctx.run.stage(f"control_{name}", lambda: _control(ctx, name, circuit), ctx.log,
                                    every_process=True))  # trained data-parallel, measured on the main process
        if len(after.get("correct", [])) == len(result["correct"]):
            result["gap"], result["gap_se"] = paired_gap(after["correct"], result["correct"])
        else:  # an "after" stage saved before per-problem results were kept
            result["gap"], result["gap_se"] = after["accuracy"] - result["accuracy"], None
        ctx.log(f"[control {name}] held-out accuracy {result['accuracy']:.3f}; located - control {result['gap']:+.3f}")
        out[name] = result
    return out


def _control(ctx: RunContext, name: str, circuit) -> dict[str, Any]:
    """One control: trained with the circuit's SFT settings (and rate grid) on the same rows, measured on
    the same held-out rows."""
    cfg, tokenizer = ctx.cfg, ctx.tokenizer
    model, size = control_model(name, ctx.fresh_base(), circuit, lambda c: adapter_config(c, cfg), cfg.seed)
    examples = training_examples(tokenizer, ctx.train, ctx.style, cfg)
    ctx.log(f"[control {name}] training {size['trainable_params']:,} parameters with the circuit's recipe")
    rate = train_arm(ctx.run, f"control_{name}", model, tokenizer, examples, ctx.val, ctx.style, cfg, ctx.log)
    if not ctx.run.is_main:
        return {}
    model.eval()
    result = {**size, **rate, **measure_accuracy(model, tokenizer, ctx.heldout, ctx.style, cfg)}
    if cfg.side_effect_data_dir:
        result["side_effects"] = measure_side_effects(model, tokenizer, cfg)
    return result


__all__ = ["controls_stage"]
