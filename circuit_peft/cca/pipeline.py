"""CCA end to end: mine pivotal tokens -> locate the circuit -> amplification update -> evaluate.

:func:`amplify` is what ``circuit-peft amplify`` and ``circuit-peft demo`` run. It writes into
``output_dir``: ``mining/`` (resumable records), ``circuit.json`` and ``circuit.png`` (heatmap),
``adapter/`` (a PEFT adapter: ``PeftModel.from_pretrained(base, "adapter")`` after
``import circuit_peft``; with ``target="all_weights"`` ``model/`` instead: the whole updated model in float32,
read by ``load_model``) and ``report.json`` (accuracy before/after, circuit size, side effects,
update history).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from ..circuit import Circuit
from ..fractions import keep_count
from ..files import atomic_dir, atomic_write_json
from .mining import MiningConfig, mine_pivotal_tokens
from .config import LOCATE_METHODS, AmplifyConfig
from .fit import CCAUpdateSpec, cca_update
from .presets import cca_preset
from .update import UpdateConfig, accuracy_validator

logger = logging.getLogger(__name__)

def locate_circuit(model: nn.Module, records: Any, config: AmplifyConfig, progress: bool = True) -> Circuit:
    """The components that push toward the desired tokens, by the registered locator ``config.locate`` that reads
    contrastive records: ``attribution`` of the logit difference (top ``circuit_fraction`` of each kind) or ``dcm``
    masks (``m >= 0.5``, optionally capped at ``circuit_fraction`` of all components)."""
    from ..locate.registry import get_locator

    locator = get_locator(config.locate, "locate", among=LOCATE_METHODS)
    options: dict[str, Any] = {"kinds": ("q", "k", "v", "mlp"), "progress": progress}
    if locator.own_keep:  # DCM: its masks, then the cap
        options.update(lambda_l1=config.dcm_lambda, epochs=config.dcm_epochs, steps=config.dcm_steps,
                       **({} if config.dcm_lr is None else {"lr": config.dcm_lr}))
        circuit = locator(model, None, records, None, **options)
        if config.circuit_fraction is not None and circuit.components:
            cap = keep_count(circuit.total_components(), config.circuit_fraction)
            if len(circuit.components) > cap:
                circuit = circuit.top(k=cap)
        return circuit
    return locator(model, None, records, config.circuit_fraction, **options)


def _eval_kwargs(mining: MiningConfig, config: AmplifyConfig) -> dict[str, Any]:
    return dict(style=mining.prompt_style, shots=mining.shots, system=mining.system, instruction=mining.instruction,
                question_field=mining.question_field,
                max_new_tokens=config.eval_max_new_tokens or mining.max_new_tokens, batch_size=config.eval_batch_size)


@dataclass
class AmplifyResult:
    """What :func:`amplify` returns: the report (also in ``report.json``), the trained PEFT model and
    the output folder."""

    report: dict[str, Any]
    model: nn.Module
    output_dir: Path


def _settings(preset: str | None, mining: MiningConfig | None, update: UpdateConfig | None,
              config: AmplifyConfig | None) -> tuple[MiningConfig, UpdateConfig, AmplifyConfig]:
    """The three configs of a run: those given, else the ``preset``'s (``"paper"``), else the defaults."""
    if preset is not None:
        named = cca_preset(preset)
        mining, update, config = mining or named.mining, update or named.update, config or named.amplify
    return mining or MiningConfig(), update or UpdateConfig(), config or AmplifyConfig()


def _load_named(name: str, tokenizer: Any, config: AmplifyConfig, update: UpdateConfig, log: Any) -> tuple[Any, Any]:
    """The model ``name`` loaded as ``config.load`` says (float32 for ``all_weights``, whatever the dtype
    asked: a step on bfloat16 weights rounds away; 4-bit refused), and its tokenizer unless one is given."""
    from ..models import load_model, load_tokenizer

    load = config.load
    if update.target == "all_weights":
        load = load.for_full_training("--target all_weights", log)
    return load_model(name, spec=load), tokenizer or load_tokenizer(name)


def _save_updated(model: nn.Module, tokenizer: Any, out: Path, target: str) -> str:
    """Save the updated model under ``out``; returns the folder's name: ``adapter`` (a PEFT adapter), or
    ``model`` for ``all_weights``, which trains the model itself (a whole model folder ``load_model`` reads).
    A kill leaves the old folder or the new one, never a mix."""
    saved = "model" if target == "all_weights" else "adapter"
    with atomic_dir(out / saved) as tmp:
        model.save_pretrained(str(tmp))
        if saved == "model":
            tokenizer.save_pretrained(str(tmp))
    return saved


def amplify(
    model: nn.Module | str,
    tokenizer: Any,
    train_problems: Sequence[dict[str, Any]],
    val_problems: Sequence[dict[str, Any]],
    test_problems: Sequence[dict[str, Any]],
    output_dir: str | os.PathLike,
    mining: MiningConfig | None = None,
    update: UpdateConfig | None = None,
    config: AmplifyConfig | None = None,
    answer_format: Any = None,
    progress: bool = True,
    log: Any = print,
    preset: str | None = None,
) -> AmplifyResult:
    """Run CCA on ``model``; return an :class:`AmplifyResult` (the report is also ``output_dir/report.json``).

    ``train_problems`` are mined; ``val_problems`` pick the best update step (held-out accuracy; with
    ``config.kept_step="last"`` only recorded);
    ``test_problems`` measure accuracy before and after. All are rows with a question and a gold
    answer (read by ``answer_format``, default :class:`~circuit_peft.evaluate.answers.NumberAnswer`). The model is wrapped in place by the adapter (``result.model``). ``log`` receives one line per stage.
    ``model`` may be a name (hub id, folder, ``smollm2``): it is then loaded as ``config.load`` says, and
    ``tokenizer`` (None: the model's own) with it. ``preset="paper"``: the paper's settings
    (:func:`~circuit_peft.cca.presets.cca_preset`) for whichever of ``mining``, ``update``, ``config`` is None.
    """
    mining, update, config = _settings(preset, mining, update, config)
    _check_inputs(val_problems, test_problems, config)  # before any model work
    if isinstance(model, str):
        model, tokenizer = _load_named(model, tokenizer, config, update, log)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _AmplifyRun(model, tokenizer, list(train_problems), list(val_problems), list(test_problems), out, mining,
                      CCAUpdateSpec(update, kept_step=config.kept_step), config,
                      dict(_eval_kwargs(mining, config), answer_format=answer_format), progress)
    for key, stage in AMPLIFY_STAGES:
        with _timed(run.timings, key):
            line = stage(run)
        log(line.replace("{SECONDS}", f"{run.timings[key]:.0f}"))  # the stage's wall time, where its line names it
    report = {"settings": {"mining": asdict(mining), "update": asdict(run.spec.update), "amplify": asdict(config),
                           "n_train": len(train_problems), "n_val": len(val_problems), "n_test": len(test_problems)},
              "mining": run.mined.stats, **_outcome(run), "timings": run.timings,
              "files": {run.saved: str(out / run.saved), "circuit": str(out / "circuit.json"),
                        "heatmap": str(out / "circuit.png"), "records": str(out / "mining" / "records.jsonl")}}
    atomic_write_json(out / "report.json", report)
    return AmplifyResult(report=report, model=run.result.model, output_dir=out)


@dataclass
class _AmplifyRun:
    """What the stages of :func:`amplify` share: the inputs and settings, then each stage's result."""

    model: nn.Module
    tokenizer: Any
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    out: Path
    mining: MiningConfig
    spec: CCAUpdateSpec  # the one CCA update (cca.fit), its kept step explicit
    config: AmplifyConfig
    eval_kwargs: dict[str, Any]
    progress: bool
    timings: dict[str, float] = field(default_factory=dict)
    mined: Any = None
    circuit: Circuit | None = None
    before: Any = None
    result: Any = None
    saved: str = ""
    after: Any = None
    effects: dict[str, Any] = field(default_factory=dict)


def _mine_stage(r: _AmplifyRun) -> str:
    """Pivotal-token records of the base model on the training problems (resumable, in ``mining/``)."""
    r.mined = mine_pivotal_tokens(r.model, r.tokenizer, r.train, r.out / "mining", r.mining,
                                  r.eval_kwargs["answer_format"], progress=r.progress)
    return (f"mined {len(r.mined.records)} pivotal-token records from {r.mined.stats['mined']} problems "
            f"({{SECONDS}} s; greedy right on {r.mined.stats['greedy_correct']})")


def _locate_stage(r: _AmplifyRun) -> str:
    r.circuit = _locate_and_save(r.model, r.mined.records, r.config, r.out, r.progress)
    return f"located {len(r.circuit.components)} components by {r.config.locate} ({{SECONDS}} s)"


def _test_accuracy(r: _AmplifyRun, model: nn.Module) -> Any:
    """Greedy accuracy of ``model`` on the test problems, prompted as the problems were mined."""
    from ..evaluate.accuracy import evaluate_accuracy

    # not recipe.stages' measure_accuracy: a floor above cca; its TrainConfig has no system/instruction/answer_format
    return evaluate_accuracy(model, r.tokenizer, r.test, progress=r.progress, **r.eval_kwargs)


def _before_stage(r: _AmplifyRun) -> str:
    r.before = _test_accuracy(r, r.model)
    return f"accuracy before: {r.before.accuracy:.3f} ({r.before.correct}/{r.before.count})"


def _fit_stage(r: _AmplifyRun) -> str:
    """The CCA update (:func:`~circuit_peft.cca.fit.cca_update`) validated on the validation problems, saved."""
    # the update without a mask changes the model's own weights: side effects need a copy of the base
    if r.spec.update.target == "all_weights" and r.config.side_effect_data_dir:
        r.effects["base"] = copy.deepcopy(r.model)
    validator = accuracy_validator(r.tokenizer, r.val, **r.eval_kwargs)
    r.result = cca_update(r.model, r.mined.records, r.circuit, r.spec, validator, tokenizer=r.tokenizer,
                          progress=r.progress)
    r.saved = _save_updated(r.result.model, r.tokenizer, r.out, r.spec.update.target)
    return (f"update: best step {r.result.best_step} (validation {r.result.best_val}), margin "
            f"{r.result.initial_margin:.2f} -> {r.result.final_margin:.2f} ({{SECONDS}} s)")


def _after_stage(r: _AmplifyRun) -> str:
    r.after = _test_accuracy(r, r.result.model)
    size = r.result.size
    return (f"accuracy after: {r.after.accuracy:.3f} ({r.after.correct}/{r.after.count}); changed "
            f"{100 * size['component_fraction']:.2f} % of components, {100 * size['param_fraction']:.2f} % of parameters")


def _side_effects_stage(r: _AmplifyRun) -> str:
    base = r.effects.pop("base", None)
    r.effects = _side_effects(r.result.model, r.tokenizer, r.config, r.progress, base=base)
    if not r.effects:
        return "side effects: skipped (no side-effect data folder)"
    return "side effects: " + ", ".join(f"{k} {r.effects[k]:+.4f}" if k.endswith("delta") else f"{k} {r.effects[k]:.4f}"
                                        for k in ("mmlu_delta", "truthfulqa_delta", "kl")
                                        if r.effects.get(k) is not None)


# amplify's stages in order, each timed under its key: the CCA preset of mine -> locate -> evaluate -> fit -> evaluate
# -> side effects (train's stages are recipe.stages; both fit with cca.fit.cca_update)
AMPLIFY_STAGES: tuple[tuple[str, Callable[[_AmplifyRun], str]], ...] = (
    ("mine_s", _mine_stage), ("locate_s", _locate_stage), ("eval_before_s", _before_stage), ("update_s", _fit_stage),
    ("eval_after_s", _after_stage), ("side_effects_s", _side_effects_stage))


def _check_inputs(val_problems, test_problems, config: AmplifyConfig) -> None:
    """Refuse empty held-out sets and missing side-effect data before any model work."""
    from ..evaluate.data import load_mmlu, load_truthfulqa

    if not val_problems:
        raise ValueError("the validation set is empty: give held-out problems to pick the best update step")
    if not test_problems:
        raise ValueError("the test set is empty: give held-out problems to measure accuracy")
    if config.side_effect_data_dir is not None:
        if "mmlu" in config.side_effects:
            load_mmlu(config.side_effect_data_dir, config.mmlu_subjects)
        if "truthfulqa" in config.side_effects:
            load_truthfulqa(config.side_effect_data_dir, 1)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the block's wall time in seconds as ``timings[key]``."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def _locate_and_save(model: nn.Module, records, config: AmplifyConfig, out: Path, progress: bool) -> Circuit:
    circuit = locate_circuit(model, records, config, progress=progress)
    if not circuit.components:
        raise ValueError("locating kept no component; lower dcm_lambda or raise circuit_fraction")
    circuit.save(out / "circuit.json")
    circuit.plot(out / "circuit.png", title=f"CCA circuit ({config.locate})")
    return circuit


def _side_effects(peft_model, tokenizer, config: AmplifyConfig, progress: bool, base=None) -> dict[str, Any]:
    """MMLU/TruthfulQA deltas and KL against ``base`` or the adapter disabled ({} without a side-effect data folder)."""
    if config.side_effect_data_dir is None or not config.side_effects:
        return {}
    from ..evaluate.side_effects import side_effects

    # not recipe.stages.side_effects: a floor above cca; it keeps 3 deltas, amplify every score, a base copy, its tasks
    return side_effects(peft_model, tokenizer, config.side_effect_data_dir, base=base, tasks=config.side_effects,
                        mmlu_subjects=config.mmlu_subjects, mmlu_limit=config.mmlu_limit,
                        truthfulqa_limit=config.truthfulqa_limit, kl_chunks=config.kl_chunks, progress=progress)


def _outcome(r: _AmplifyRun) -> dict[str, Any]:
    """The report's results: accuracy before/after, the circuit and its size, side effects, the update."""
    size = r.result.size
    return {
        "accuracy_before": r.before.accuracy, "accuracy_after": r.after.accuracy,
        "accuracy_before_stderr": r.before.stderr, "accuracy_after_stderr": r.after.stderr,
        "n_records": len(r.mined.records), "circuit": {"method": r.config.locate, "kept": len(r.circuit.components),
                                                        "counts": r.circuit.counts()},
        "components": size["components"], "total_components": size["total_components"],
        "component_fraction": size["component_fraction"], "trainable_params": size["trainable_params"],
        "param_fraction": size["param_fraction"], "side_effects": {k: v for k, v in r.effects.items() if k != "details"},
        "update": {k: v for k, v in r.result.to_dict().items() if k != "components"},
    }
