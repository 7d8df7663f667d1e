"""The fit stage: the circuit adapter trained, by pivotal SFT (:mod:`.rates`) or by the CCA update
(:func:`~circuit_peft.cca.fit.cca_update`, the one ``amplify`` runs too; the kept step is the explicit field
``cfg.cca_kept_step``: ``"last"``, the default here, or ``"best_validated"`` on the validation rows held back)."""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from ...cca.fit import KEPT_STEPS, CCAUpdateSpec, cca_update
from ..config import TrainConfig
from ..context import RunContext, RunFolder
from ..examples import training_examples
from ..rates import load_weights, save_weights
from .locate import mine_digit_pivots
from .rates import train_arm


def cca_spec(cfg: TrainConfig) -> CCAUpdateSpec:
    """The CCA update ``train --update cca`` runs: ``cfg.update_steps`` steps of the default update (SGD at the
    paper's lr 1e-4), the step ``cfg.cca_kept_step`` names."""
    from ...cca.update import UpdateConfig

    return CCAUpdateSpec(UpdateConfig(steps=cfg.update_steps), kept_step=cfg.cca_kept_step)


def _cca_update(peft_model, tokenizer, rows, style: str, cfg: TrainConfig, run: RunFolder, log,
                validate: Callable[[Any], float] | None = None) -> dict[str, Any]:
    """The CCA update of ``peft_model``'s circuit adapter (trained in place) on digit pivots mined from
    the base model with ``cfg`` (the run's own cap); ``validate`` scores a step (``"best_validated"``)."""
    with peft_model.disable_adapter():
        records = mine_digit_pivots(peft_model, tokenizer, rows, style, cfg, run.path / "mining")
    if not len(records):
        raise ValueError("mining found no pivotal token on the training examples (the base model made no "
                         "mistake a pivot fixes): nothing for the CCA update to learn from; use update='sft'")
    log(f"[train] CCA update of the circuit on {len(records)} pivot records, {cfg.update_steps} steps")
    result = cca_update(peft_model, records, None, cca_spec(cfg), validate, tokenizer=tokenizer)
    log(f"[train] CCA update kept the {result.kept}")
    return {"records": len(records), "initial_margin": result.initial_margin, "final_margin": result.final_margin,
            "kept": result.kept}


def _validator(ctx: RunContext) -> Callable[[Any], float] | None:
    """Accuracy on ``ctx.val`` at the arm's cap, when ``cfg.cca_kept_step`` keeps the best validated step."""
    from ...cca.update import accuracy_validator
    from ..config import checker

    cfg = ctx.cfg
    if cfg.cca_kept_step != "best_validated":
        return None
    return accuracy_validator(ctx.tokenizer, ctx.val, style=ctx.style, shots=cfg.shots, answer_format=checker(cfg),
                              question_field=cfg.question_field, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.eval_batch_size)


def adapter_config(circuit, cfg: TrainConfig):
    """The CircuitConfig ``cfg`` trains ``circuit`` with: the paper's projections, plus a LoRA branch when
    ``cfg.lora_rank`` > 0."""
    if cfg.lora_rank:
        return circuit.to_config(projections="paper", r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank)
    return circuit.to_config(projections="paper")



def fit_stage(ctx: RunContext, peft_model) -> dict[str, Any]:
    """The ``train`` stage: the circuit adapter of ``peft_model`` fitted on ``ctx.train``, its weights saved
    atomically (reloaded on a re-run). CCA mines with ``ctx.mining_cfg`` (the run's own cap, as the locate
    stage mined with)."""
    run, cfg, log = ctx.run, ctx.cfg, ctx.log
    weights = run.path / "stages" / "train.safetensors"
    if (run.path / "stages" / "train.json").exists() and weights.exists():
        load_weights(peft_model, weights)
        log("[train] done earlier: reused")
        return json.loads((run.path / "stages" / "train.json").read_text())

    def fit():
        if cfg.update == "cca":  # its own loop, on the main process: the others load its weights below
            out = _cca_update(peft_model, ctx.tokenizer, ctx.train, ctx.style, ctx.mining_cfg or cfg, run, log,
                              _validator(ctx))
            save_weights(peft_model, weights)
            return out
        examples = training_examples(ctx.tokenizer, ctx.train, ctx.style, cfg)
        steps = math.ceil(math.ceil(len(examples) / cfg.sft.batch_size) * cfg.sft.epochs)
        log(f"[train] pivotal SFT of the circuit on {len(examples)} examples, {cfg.sft.epochs:g} epochs "
            f"({steps} optimizer steps of {cfg.sft.batch_size}; the bar shows the time left)")
        out = train_arm(run, "train", peft_model, ctx.tokenizer, examples, ctx.val, ctx.style, cfg, log)
        if run.is_main:
            save_weights(peft_model, weights)
        return {"examples": len(examples), **out}

    result = run.stage("train", fit, log, every_process=cfg.update == "sft")  # SFT: data-parallel on every process
    if not run.is_main:  # exactly the weights the main process saved
        load_weights(peft_model, weights)
    return result

__all__ = ["KEPT_STEPS", "CCAUpdateSpec", "adapter_config", "cca_spec", "cca_update", "fit_stage"]
