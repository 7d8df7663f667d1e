"""The main job in one call: examples -> (selected) -> located circuit -> trained adapter -> evaluated.

:func:`train` is what ``circuit-peft train`` and ``make demo`` run: it checks the rows, opens the run folder
(keyed by :func:`~circuit_peft.recipe.config.run_settings`) and runs the stages of :mod:`.stages` on one
:class:`~circuit_peft.recipe.context.RunContext`; :mod:`.report` writes the card and the summary. It writes
into ``output_dir``:

- ``run.json``: the settings and the inputs' fingerprint (a folder made with other settings is refused);
- ``stages/<stage>.json``: one file per finished stage (``select``, ``locate``, ``before``, ``train``,
  ``after``, ``side_effects``, ``control_<name>``), so that a re-run after a stop skips what is done;
- ``circuit.json`` / ``circuit.png``: the located circuit and its heatmap;
- ``adapter/``: a normal PEFT adapter (written to a temporary sibling, then renamed into place) whose
  ``README.md`` model card shows the heatmap, the components, the before/after numbers and the command;
- ``report.json``: everything above in one file.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from typing import Any, Callable, Sequence

from torch import nn

from ..distributed import end_process_group_at_exit
from ..files import atomic_write_json
from ..models import LoadSpec
from .config import LOCATORS, SELECTORS, STAGES, UPDATES, TrainConfig, TrainResult, checker, run_settings
from .context import RunContext, RunFolder
from .examples import training_examples
from .rates import validation_split
from .report import model_card, save_adapter, summary_table
from .stages import controls, evaluate, fit, locate, select, side_effects
from .stages.evaluate import measure_accuracy
from .stages.fit import adapter_config
from .stages.locate import locate_for_training


def train(
    model: str | nn.Module,
    train_rows: Sequence[dict[str, Any]],
    heldout_rows: Sequence[dict[str, Any]],
    output_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
    tokenizer: Any = None,
) -> TrainResult:
    """Locate the circuit of ``model`` on ``train_rows``, train it, evaluate on ``heldout_rows``.

    ``model``: a name (hub id, folder, ``smollm2``) loaded as ``config.load`` says, or a model given loaded
    (used as it is, wrapped in place by the adapter; ``tokenizer`` None: its ``name_or_path``'s). Rows are in one
    of the formats :func:`~circuit_peft.evaluate.formats.task_rows` reads: TRL's ``messages`` or
    ``prompt``/``completion`` (strings or turns), or ``{question, answer}`` dicts (field names in ``config``);
    ``config.answer`` chooses how answers are checked (a number, GSM8K-style ``... #### n`` or bare, by
    default). Each stage is resumable (see the module docstring). Returns a :class:`TrainResult`.
    """
    cfg = config or TrainConfig()
    train_rows, heldout_rows = [dict(r) for r in train_rows], [dict(r) for r in heldout_rows]
    for name, rows in (("training", train_rows), ("held-out", heldout_rows)):
        if not rows:
            raise ValueError(f"the {name} set is empty")
    train_rows, heldout_rows = _task_rows(train_rows, heldout_rows, cfg)
    if cfg.locate == "gradient_contrast":  # read the general text now, not after the model has loaded
        from ..evaluate.data import load_text

        load_text(cfg.side_effect_data_dir)
    if not isinstance(model, str):  # the run records how the given model is loaded, not cfg.load's defaults
        cfg = replace(cfg, load=_given_spec(model))
    model_name = model if isinstance(model, str) else _model_label(model)
    settings = run_settings(model_name, cfg, train_rows, heldout_rows)
    val_rows: list[dict[str, Any]] = []
    if cfg.holds_validation:  # rows held back to choose each arm's rate or the CCA step: never located on or trained on
        train_rows, val_rows = validation_split(train_rows, cfg.validation_fraction, cfg.seed)
    run = RunFolder(output_dir, settings)
    if not run.is_main:  # one process speaks (and writes); see circuit_peft.distributed
        log = _silent
    end_process_group_at_exit()
    run.open()
    try:
        ctx = _context(run, model, tokenizer, cfg, train_rows, val_rows, heldout_rows, log)
        return _run_stages(ctx, command)
    finally:
        run.close()


def _model_label(model: nn.Module) -> str:
    """What a run folder records for a model given loaded: its ``name_or_path``."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    if not name:
        raise ValueError("train(model=...): this model has no name_or_path to record in the run folder and load "
                         "its tokenizer from; give its name or folder instead")
    return str(name)


def _given_spec(model: nn.Module) -> LoadSpec:
    """The :class:`~circuit_peft.models.LoadSpec` a model given loaded was loaded with: its device, its dtype
    (the compute dtype of a 4-bit model), and whether its weights are 4-bit."""
    param = next(model.parameters())
    four_bit = bool(getattr(model, "is_loaded_in_4bit", False))
    dtype = getattr(getattr(model, "config", None), "torch_dtype", None) if four_bit else param.dtype
    return LoadSpec(device=str(param.device), dtype=str(dtype or param.dtype).removeprefix("torch."),
                    load_in_4bit=four_bit)


def _context(run: RunFolder, model: str | nn.Module, tokenizer: Any, cfg: TrainConfig, train_rows, val_rows,
             heldout_rows, log: Callable[[str], None]) -> RunContext:
    """The run context: the tokenizer, the prompt style and the model (loaded when ``model`` is a name)."""
    from ..evaluate.formats import data_style, rows_kind
    from ..models import load_model, load_tokenizer

    name = model if isinstance(model, str) else None
    tokenizer = tokenizer or load_tokenizer(name or _model_label(model))
    style = data_style(tokenizer, rows_kind(train_rows, cfg.question_field, cfg.answer_field), cfg.prompt_style, log)
    if name is not None:
        model = load_model(name, spec=cfg.load)
    pristine = copy.deepcopy(model) if name is None and cfg.controls else None
    if val_rows:
        what = (f"choose each arm's learning rate from {', '.join(f'{lr:g}' for lr in cfg.learning_rates)}"
                if cfg.learning_rates else "choose the CCA update's kept step")
        log(f"[rates] {len(val_rows)} training rows held back to {what}")
    return RunContext(run=run, cfg=cfg, model=model, tokenizer=tokenizer, style=style, train=train_rows, val=val_rows,
                      heldout=heldout_rows, log=log, model_name=name, pristine=pristine)


def _run_stages(ctx: RunContext, command: str | None) -> TrainResult:
    """select -> locate -> before -> fit -> after -> side effects -> controls, then the adapter and report."""
    from peft import get_peft_model

    from ..circuit import Circuit
    from ..tuner import circuit_size

    out = ctx.out
    select.select_stage(ctx)
    located = locate.locate_stage(ctx)
    before = evaluate.before_stage(ctx)
    circuit = Circuit.load(out / "circuit.json", ctx.model)
    peft_model = get_peft_model(ctx.model, adapter_config(circuit, ctx.cfg))
    size = circuit_size(peft_model.peft_config["default"], peft_model)
    fitted = fit.fit_stage(ctx, peft_model)
    after = evaluate.after_stage(ctx, peft_model)
    effects = side_effects.side_effects_stage(ctx, peft_model)
    arms = controls.controls_stage(ctx, circuit, after)
    report = {"model": ctx.run.settings["model"], "settings": ctx.run.settings, "style": ctx.style,
              "n_train": len(ctx.train), "n_heldout": len(ctx.heldout), "locate": located, "before": before,
              "after": after, "side_effects": effects, "controls": arms, "trainable_params": size["trainable_params"],
              "training": {k: v for k, v in fitted.items() if k != "seconds"},
              "param_fraction": size["param_fraction"], "command": command,
              "files": {"adapter": str(out / "adapter"), "circuit": str(out / "circuit.json"),
                        "heatmap": str(out / "circuit.png")}}
    if ctx.run.is_main:  # one adapter and one report, however many processes trained
        save_adapter(peft_model, out, model_card(report, command))
        atomic_write_json(out / "report.json", report)
    ctx.log(summary_table(report))
    return TrainResult(report=report, model=peft_model, output_dir=out)


def _silent(_: str) -> None:
    """The log of a process that is not the main one."""


def _task_rows(train_rows, heldout_rows, cfg: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Both sets checked and normalised by :func:`~circuit_peft.evaluate.formats.task_rows` (one format);
    refuses what reads only question/answer rows (selection, shots) on the other formats."""
    from ..evaluate.formats import task_rows

    train_rows, kind = task_rows(train_rows, checker(cfg), cfg.question_field, cfg.answer_field, what="training")
    heldout_rows, held = task_rows(heldout_rows, checker(cfg), cfg.question_field, cfg.answer_field, what="held-out")
    if held != kind:
        raise ValueError(f"the training rows are {kind.replace('_', '/')} rows and the held-out rows "
                         f"{held.replace('_', '/')} rows: give both sets in one format")
    if kind != "question_answer":
        for name, on in (("select (--select)", cfg.select), ("shots (--shots)", cfg.shots)):
            if on:
                raise ValueError(f"{name} reads question/answer rows; these are {kind} prompt/completion rows")
    return train_rows, heldout_rows



__all__ = ["LOCATORS", "SELECTORS", "STAGES", "UPDATES", "TrainConfig", "TrainResult", "RunFolder", "adapter_config",
           "locate_for_training", "measure_accuracy", "model_card", "save_adapter", "summary_table", "train",
           "training_examples"]
