"""The CCA arms of a comparison: the paper's update with its mask, without it, on the mask's twin, and SFT.

Registered with :func:`~circuit_peft.compare.arms.register_arm_kind` when :mod:`circuit_peft.compare` is
imported, so ``--arms cca_mask,cca_nomask,cca_twin,cca_sft`` work. Every arm of a seed shares one CCA
preparation (:func:`cca_preparation`, files in the run folder, so a resumed run reads them): pivotal-token
records mined from the base model on the fit rows with :func:`~circuit_peft.cca.cca_preset` ``("paper")``'s
mining (10 samples at T 0.8 / 1.2, branching token pivots), then the DCM mask learnt on them with the preset's
schedule. Then:

* ``cca_mask``: the preset's update (full-batch SGD on the logit difference, 50 steps, ``projections="paper"``)
  on the mask's components (``target="circuit"``);
* ``cca_nomask``: the same records and steps on every weight (``target="all_weights"``, the paper's
  ``update_using_mask=False``);
* ``cca_twin``: the same update on the mask's layer-matched random twin (``target="twin"``, drawn from the seed);
* ``cca_sft``: the mask's adapter (``projections="paper"``) trained by the recipe's pivotal SFT on the fit rows'
  gold solutions, like every other SFT arm.

The CCA updates are measured at the comparison's checkpoints (e.g. after 17, 34 and 50 of 50 steps) like any
arm; the update's own validation schedule runs too (on the validation rows, at the seed's token cap), and
its best validated step, with that step's full measurement, is written to ``cca/<arm>_lr<lr>_seed<k>.json``:
the paper's rule, a secondary number that no budget constrains.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from ..cca.presets import PAPER_LRS
from ..errors import CircuitPeftError
from ..files import atomic_write_json
from .arms import ArmContext, ArmKind, ArmSpec, Checkpoint, checkpoint_steps, register_arm_kind, train_sft_arm

CCA_TARGETS: dict[str, str] = {"cca_mask": "circuit", "cca_nomask": "all_weights", "cca_twin": "twin"}
CCA_DIR = "cca"
_PREPARED: dict[tuple[str, int], tuple[Any, Any]] = {}  # (run folder, seed) -> (records, circuit), this process


def cca_settings(ctx: ArmContext, lr: float = 1e-4, target: str = "circuit"):
    """``cca_preset("paper")`` in the comparison's prompt style, shots, question field, cap and seed."""
    from ..cca import cca_preset

    cfg = ctx.config
    mining = {"prompt_style": ctx.style, "shots": cfg.shots, "question_field": cfg.question_field,
              "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    return cca_preset("paper", lr=lr, target=target, mining=mining)


def _folder(ctx: ArmContext) -> Path:
    if ctx.folder is None:
        raise CircuitPeftError("the CCA arms keep their records and mask in the run folder: ArmContext.folder is unset")
    return Path(ctx.folder)


def cca_preparation(ctx: ArmContext) -> tuple[Any, Any]:
    """The seed's mined records and DCM circuit: mined and learnt once into the run folder (``cca/``), then read.

    Returns ``(records, circuit)``; raises :class:`CircuitPeftError` when mining found no record or DCM kept no
    component (the CCA arms cannot run then; the message says which)."""
    key = (str(_folder(ctx)), ctx.config.seed)
    if key not in _PREPARED:
        _PREPARED[key] = _prepare(ctx)
    return _PREPARED[key]


def _prepare(ctx: ArmContext) -> tuple[Any, Any]:
    from ..cca.mining import mine_pivotal_tokens
    from ..cca.pipeline import locate_circuit
    from ..circuit import Circuit
    from ..evaluate.answers import answer_checker

    cfg, seed, folder = ctx.config, ctx.config.seed, _folder(ctx) / CCA_DIR
    preset, model = cca_settings(ctx), ctx.load_model()
    mined = mine_pivotal_tokens(model, ctx.tokenizer, ctx.rows, folder / f"mining_seed{seed}", preset.mining,
                                answer_format=answer_checker(cfg.answer, cfg.answer_field, cfg.question_field))
    if not len(mined.records):
        raise CircuitPeftError(f"seed {seed}: mining found no pivotal token on the fit rows; the CCA arms cannot run")
    path = folder / f"dcm_seed{seed}.json"
    if not path.exists():
        circuit = locate_circuit(model, mined.records, preset.amplify, progress=True)
        if not circuit.components:
            raise CircuitPeftError(f"seed {seed}: the DCM mask kept no component; the CCA arms cannot run")
        atomic_write_json(folder / f"dcm_seed{seed}_stats.json",
                          {"records": len(mined.records), "mining": mined.stats, "kept": len(circuit.components),
                           "component_fraction": circuit.component_fraction(), "counts": circuit.counts()})
        circuit.save(path)
    return mined.records, Circuit.load(path, model)


def _build_cca(spec: ArmSpec, ctx: ArmContext) -> tuple[nn.Module, dict[str, Any]]:
    """``cca_mask`` / ``cca_twin``: a fresh base model wrapped with the mask's (or its layer-matched random twin's)
    adapter, ``projections="paper"`` (so a saved checkpoint loads back into what this builds); ``cca_nomask``: the
    fresh base model itself, every weight trained."""
    from peft import get_peft_model

    from ..cca.update import circuit_config_for
    from ..locate.controls import random_circuit
    from ..tuner import circuit_size

    _, circuit = cca_preparation(ctx)
    model = ctx.load_model()
    if spec.kind == "cca_nomask":
        return model, {"trainable_params": sum(p.numel() for p in model.parameters())}
    if spec.kind == "cca_twin":
        circuit = random_circuit(circuit, "layer", seed=ctx.config.seed)  # as update.py's target="twin" draws it
    config = circuit_config_for(model, circuit, projections=cca_settings(ctx).update.projections)
    size = circuit_size(config, model)
    return get_peft_model(model, config), {"trainable_params": size["trainable_params"],
                                           "components": size["components"]}


def train_cca_arm(model: nn.Module, spec: ArmSpec, ctx: ArmContext, lr: float, on_checkpoint: Checkpoint) -> None:
    """The preset's update at ``lr`` on the arm's target, ``on_checkpoint`` at the comparison's checkpoints; its
    best validated step (the paper's rule) and that step's measurement saved beside the run's stages."""
    from ..cca.update import amplify_update

    records, circuit = cca_preparation(ctx)
    target = CCA_TARGETS[spec.kind]
    update = replace(cca_settings(ctx, lr, target).update, twin_seed=ctx.config.seed)
    if target != "all_weights":  # the model holds the mask's or the twin's adapter (_build_cca): trained in place
        update, circuit = replace(update, target="circuit"), None
    steps = set(checkpoint_steps(update.steps, ctx.checkpoints))

    def on_step(m: nn.Module, step: int) -> None:
        if step in steps:
            on_checkpoint(m, step)

    result = amplify_update(model, records, circuit, ctx.validate, update, tokenizer=ctx.tokenizer,
                            progress=True, on_step=on_step)
    paper_rule = {"best_step": result.best_step, "best_val": result.best_val, "kept": result.kept,
                  "records": len(records), "initial_margin": result.initial_margin,
                  "final_margin": result.final_margin, "history": result.history,
                  "point": ctx.measure(result.model) if ctx.measure is not None else None}
    atomic_write_json(_folder(ctx) / CCA_DIR / f"{spec.name}_lr{lr:g}_seed{ctx.config.seed}.json", paper_rule)


def _build_cca_sft(spec: ArmSpec, ctx: ArmContext) -> tuple[nn.Module, dict[str, Any]]:
    """The DCM mask's adapter (``projections="paper"``) on a fresh base model, initialised from the seed."""
    from ..recipe.controls import seeded_peft_model
    from ..tuner import circuit_size

    _, circuit = cca_preparation(ctx)
    config = circuit.to_config(projections="paper")
    model = seeded_peft_model(ctx.load_model(), config, ctx.config.seed)
    size = circuit_size(config, model)
    return model, {"trainable_params": size["trainable_params"], "components": size["components"]}


for _name in CCA_TARGETS:
    register_arm_kind(_name, ArmKind(_build_cca, train_cca_arm, lrs=PAPER_LRS, adapter=_name != "cca_nomask"))
register_arm_kind("cca_sft", ArmKind(_build_cca_sft, train_sft_arm))

__all__ = ["CCA_TARGETS", "cca_preparation", "cca_settings", "train_cca_arm"]
