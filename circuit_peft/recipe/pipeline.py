"""The main job in one call: examples -> (selected) -> located circuit -> trained adapter -> evaluated.

:func:`train` is what ``circuit-peft train`` and ``make demo`` run. It writes into ``output_dir``:

- ``run.json``: the settings and the inputs' fingerprint (a folder made with other settings is refused);
- ``stages/<stage>.json``: one file per finished stage (``select``, ``locate``, ``before``, ``train``,
  ``after``, ``side_effects``, ``control_<name>``), so that a re-run after a stop skips what is done;
- ``circuit.json`` / ``circuit.png``: the located circuit and its heatmap;
- ``adapter/``: a normal PEFT adapter (written to a temporary sibling, then renamed into place) whose
  ``README.md`` model card shows the heatmap, the components, the before/after numbers and the command;
- ``report.json``: everything above in one file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..distributed import end_process_group_at_exit
from ..files import atomic_dir, atomic_write_json, atomic_write_text
from ..models import LoadSpec
from ..runs import OpenRun, fingerprint as _fingerprint
from .controls import CONTROLS
from .caps import MAX_CUT_SHARE, MAX_NEW_TOKENS_LIMIT, check_cap_settings, uncut_measure
from .rates import GRID_EXTENSIONS, arms_with_chosen_rate, fit_on_grid, load_weights, save_weights, validation_split
from .sft import SFTSettings, gold_examples, pivotal_dataset, train_sft

LOCATORS: tuple[str, ...] = ("gradient", "gradient_contrast", "attribution", "ablation")
SELECTORS: tuple[str, ...] = ("circuitseer", "ifd", "random")
UPDATES: tuple[str, ...] = ("sft", "cca")
STAGES: tuple[str, ...] = ("select", "locate", "before", "train", "after", "side_effects")


@dataclass
class TrainConfig:
    """Settings of :func:`train`. ``circuit_fraction``: share of each kind (q/k/v heads, MLP neurons)
    kept; ``lora_rank`` > 0 adds a LoRA branch to the circuit adapter; ``max_new_tokens`` caps
    generation at evaluation (the report gives the share of answers that hit it). ``update``: ``"sft"``
    (pivotal-weighted SFT on the gold solutions, the default) or ``"cca"`` (the CCA update: logit
    difference on mined digit pivots, ``update_steps`` SGD steps at the paper's lr 1e-4, last step kept).
    ``controls``: arms trained after the circuit with the same data and recipe (:mod:`.controls`:
    ``random_layer``, ``random_anywhere``, ``lora``, ``lora_matched``); they may be added to a finished run.
    ``learning_rates``: a grid; the circuit and each control then keep the rate with the best accuracy on
    ``validation_fraction`` of the training rows, held back from training (:mod:`.rates`); empty: every
    arm trains at ``sft.learning_rate``. ``load``: where and in what dtype every model of the run loads
    (:class:`~circuit_peft.models.LoadSpec`, default ``auto``: cuda + bfloat16 on a GPU, cpu + float32
    otherwise; a dict of its fields is accepted); the trained slices stay float32."""

    locate: str = "gradient"
    circuit_fraction: float = 0.02
    select: str | None = None
    select_fraction: float = 0.25
    lora_rank: int = 0
    update: str = "sft"
    update_steps: int = 100
    sft: SFTSettings = field(default_factory=SFTSettings)
    prompt_style: str | None = None  # None: chat if the tokenizer has a template, else few-shot
    shots: list[dict[str, str]] | None = None
    max_new_tokens: int = 64
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT  # the base is re-measured up to this cap (.caps)
    max_cut_share: float = MAX_CUT_SHARE  # ... while more of its answers than this share hit the cap
    grid_extensions: int = GRID_EXTENSIONS  # rates tried beyond a learning-rate grid's chosen edge (.rates)
    eval_batch_size: int = 32
    side_effect_data_dir: str | None = None
    mmlu_subjects: tuple[str, ...] | None = None  # None: the default subjects found in the data folder
    mmlu_limit: int = 20  # MMLU rows per subject in the side effects
    truthfulqa_limit: int = 60  # TruthfulQA rows in the side effects
    kl_chunks: int = 8  # 128-token chunks of general text for the KL
    question_field: str = "question"
    answer_field: str = "answer"
    seed: int = 0
    controls: tuple[str, ...] = ()
    learning_rates: tuple[float, ...] = ()
    validation_fraction: float = 0.2
    load: LoadSpec = field(default_factory=LoadSpec)
    answer: str = "number"  # the answer checker (evaluate.answers.ANSWER_CHECKERS); "none": completion loss

    def __post_init__(self) -> None:
        self.load = LoadSpec.of(self.load)
        _check_answer_settings(self)
        self.controls = tuple(self.controls)
        self.learning_rates = tuple(self.learning_rates)
        if any(not lr > 0 for lr in self.learning_rates) or len(set(self.learning_rates)) != len(self.learning_rates):
            raise ValueError(f"learning_rates must be distinct rates > 0, got {self.learning_rates!r}")
        if self.learning_rates and self.update != "sft":
            raise ValueError("learning_rates choose the SFT rate on validation; update='cca' has its own step size: "
                             "use update='sft' (--update sft) with --lrs")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ValueError(f"controls: unknown {unknown}; choose from {CONTROLS}")
        if self.controls and self.update != "sft":
            raise ValueError("controls are trained with pivotal SFT like the circuit; with update='cca' they would "
                             "compare two recipes: use update='sft' (--update sft) with --controls")
        if self.locate not in LOCATORS:
            raise ValueError(f"locate must be one of {LOCATORS}, got {self.locate!r}")
        if self.locate == "gradient_contrast" and self.side_effect_data_dir is None:
            raise ValueError("locate='gradient_contrast' needs general text: set side_effect_data_dir "
                             "(--side-effects-data: a data folder with text/tinyshakespeare.txt)")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {self.update!r}")
        if self.select is not None and self.select not in SELECTORS:
            raise ValueError(f"select must be one of {SELECTORS} or None, got {self.select!r}")
        for name in ("circuit_fraction", "select_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        for name in ("max_new_tokens", "eval_batch_size", "update_steps", "mmlu_limit", "truthfulqa_limit", "kl_chunks"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        check_cap_settings(self.max_new_tokens, self.max_new_tokens_limit, self.max_cut_share)
        if int(self.grid_extensions) != self.grid_extensions or self.grid_extensions < 0:
            raise ValueError(f"grid_extensions must be an integer >= 0, got {self.grid_extensions!r}")
        if int(self.lora_rank) != self.lora_rank or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an integer >= 0, got {self.lora_rank!r}")
        if isinstance(self.sft, dict):
            self.sft = SFTSettings(**self.sft)


@dataclass
class TrainResult:
    """What :func:`train` returns: the report (also in ``report.json``) and the trained PEFT model."""

    report: dict[str, Any]
    model: nn.Module
    output_dir: Path


class RunFolder(OpenRun):
    """:class:`~circuit_peft.runs.OpenRun` plus finished stages (``stages/<name>.json``) for :func:`train`.

    Under ``torchrun`` / ``accelerate launch`` only the main process opens (and locks) the folder and writes
    into it; the others wait for its ``run.json`` and for each stage's file (:mod:`circuit_peft.distributed`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from ..distributed import is_main_process

        super().__init__(*args, **kwargs)
        self.is_main = is_main_process()

    def open(self) -> None:
        if not self.is_main:  # the main process checks, locks and writes the folder; this one reads it
            from ..distributed import wait_for_file

            wait_for_file(self.path / "run.json", lambda p: p.exists() and json.loads(p.read_text())["key"] == self.key)
            wait_for_file(self.path / "stages")
            return
        super().open()
        (self.path / "stages").mkdir(exist_ok=True)

    def close(self) -> None:
        if self.is_main:
            super().close()

    def stage(self, name: str, fn: Callable[[], dict[str, Any]], log: Callable[[str], None],
              every_process: bool = False) -> dict[str, Any]:
        """The stage's saved result, or run ``fn`` and save what it returns (JSON). With several processes, the
        main one runs ``fn`` and saves; the others wait for its file, having run ``fn`` too when
        ``every_process`` (a stage that trains data-parallel; ``fn`` then measures on the main process only)."""
        path = self.path / "stages" / f"{name}.json"
        if path.exists():
            log(f"[{name}] done earlier: reused")
            return json.loads(path.read_text())
        if not self.is_main:
            from ..distributed import wait_for_file

            if every_process:
                fn()
            return json.loads(wait_for_file(path).read_text())
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = time.perf_counter() - t0
        atomic_write_json(path, result)
        return result


def _check_answer_settings(cfg: TrainConfig) -> None:
    """``cfg.answer`` names a checker; ``"none"`` (no generation) refuses what needs a checked answer."""
    from ..evaluate.answers import ANSWER_CHECKERS

    if cfg.answer not in ANSWER_CHECKERS:
        raise ValueError(f"answer must be one of {tuple(ANSWER_CHECKERS)}, got {cfg.answer!r}")
    if cfg.answer != "none":
        return
    needs = {"update='cca' (--update cca)": cfg.update == "cca",
             "locate='attribution' (--locate attribution)": cfg.locate == "attribution",
             "learning_rates (--lrs)": bool(cfg.learning_rates), "controls (--controls)": bool(cfg.controls)}
    refused = [name for name, on in needs.items() if on]
    if refused:
        raise ValueError(f"answer='none' (--answer none) checks no answers, and {', '.join(refused)} need checked "
                         "answers (mined pivotal tokens, or accuracy to compare): choose --answer number|choice|exact, "
                         "or drop " + ", ".join(refused))


def _checker(cfg: TrainConfig):
    """The answer checker ``cfg.answer`` names, reading ``cfg``'s fields."""
    from ..evaluate.answers import answer_checker

    return answer_checker(cfg.answer, cfg.answer_field, cfg.question_field)


def measure_accuracy(model, tokenizer, rows, style, cfg: TrainConfig) -> dict[str, Any]:
    """Held-out accuracy with ``cfg``'s checker; with ``answer='none'`` the completion loss instead."""
    from ..evaluate.accuracy import evaluate_accuracy

    if cfg.answer == "none":
        return _completion_loss(model, tokenizer, rows, style, cfg)
    r = evaluate_accuracy(model, tokenizer, rows, style=style, shots=cfg.shots, question_field=cfg.question_field,
                          answer_format=_checker(cfg),
                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, progress=True)
    return {"accuracy": r.accuracy, "stderr": r.stderr, "count": r.count, "capped_fraction": r.capped_fraction,
            "correct": [int(x["correct"]) for x in r.records]}


def _select(model, tokenizer, rows, cfg: TrainConfig) -> dict[str, Any]:
    from ..select import find_reasoning_heads, select_data

    heads = None
    if cfg.select == "circuitseer":
        probe = rows[: min(8, len(rows))]
        heads = find_reasoning_heads(model, tokenizer, probe, method="attribution", prompt_field=cfg.question_field,
                                     solution_field=cfg.answer_field)
    result = select_data(model, tokenizer, rows, method=cfg.select, fraction=cfg.select_fraction, heads=heads,
                         seed=cfg.seed, question_field=cfg.question_field, answer_field=cfg.answer_field)
    return {"rows": sorted(int(i) for i in result.indices), "method": cfg.select}


def _completion_loss(model, tokenizer, rows, style, cfg: TrainConfig) -> dict[str, Any]:
    """Mean held-out completion loss per token (nats) with its standard error, per row in ``losses``."""
    from ..evaluate.accuracy import completion_loss
    from ..evaluate.generation import eval_mode

    data = pivotal_dataset(tokenizer, training_examples(tokenizer, rows, style, cfg), 1.0, style)
    with eval_mode(model):
        return completion_loss(model, tokenizer, [dict(r) for r in data], batch_size=cfg.eval_batch_size)


def training_examples(tokenizer, rows, style: str, cfg: TrainConfig) -> list[dict[str, Any]]:
    """``rows``' gold solutions as SFT examples in ``style``, with ``cfg``'s shots, fields and checker."""
    return gold_examples(tokenizer, rows, style, cfg.shots, cfg.question_field, cfg.answer_field, _checker(cfg))


def _gold_sft_rows(tokenizer, rows, style: str, cfg: TrainConfig) -> list[dict[str, Any]]:
    """``rows``' gold solutions tokenised as pivotal SFT trains on them (``input_ids``, ``labels``, weights)."""
    return pivotal_dataset(tokenizer, training_examples(tokenizer, rows, style, cfg), cfg.sft.pivotal_weight, style)


def locate_for_training(model, tokenizer, rows, style: str, cfg: TrainConfig, mining_dir: str | os.PathLike,
                        keep_fraction: float | None, progress: bool = True):
    """The circuit :func:`train` trains: ``cfg.locate`` = ``"gradient"`` (SFT-loss gradient on the gold
    solutions, answer tokens weighted ``cfg.sft.pivotal_weight``), ``"gradient_contrast"`` (that gradient's
    norm divided by the LM-loss gradient's on general text from ``cfg.side_effect_data_dir``), ``"attribution"`` (first-wrong-digit
    pivots mined into ``mining_dir``, then logit-difference attribution) or ``"ablation"`` (the exact head
    ablation scan: query heads only, scored by how much the gold solutions' loss rises when each alone
    is ablated). ``keep_fraction`` of each kind is kept (None: every component scored, e.g. to draw
    several sizes from one scan)."""
    from ..locate import attribution_scan, gradient_scan

    if cfg.locate in ("gradient", "gradient_contrast", "ablation"):
        data = _gold_sft_rows(tokenizer, rows, style, cfg)
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
    prompt's tokens, then the gold solution's with EOS): every query head, uniform ablation."""
    from ..locate import head_ablation_scan

    return head_ablation_scan(model, tokenizer, _probe_rows(data), keep_fraction=keep_fraction, progress=progress)


def _probe_rows(data) -> list[dict[str, list[int]]]:
    """Tokenised SFT rows (``input_ids``, ``labels``) as probe rows: the prompt's ids, then the gold
    solution's (with EOS), the part SFT trains on."""
    probe = []
    for row in data:
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)
        probe.append({"prompt_ids": row["input_ids"][:start], "solution_ids": row["input_ids"][start:]})
    return probe


def _gold_solution_batches(model, tokenizer, rows, style: str, cfg: TrainConfig) -> list[dict]:
    """``rows``' gold solutions as probe batches (prompt, then solution), tokenised as SFT trains on them."""
    from ..locate.ablation import probe_batches

    probe = _probe_rows(_gold_sft_rows(tokenizer, rows, style, cfg))
    return probe_batches(model, tokenizer, probe, cfg.eval_batch_size)


def _gold_solution_loss(model, batches: list[dict]) -> float:
    """Mean loss of the gold solutions' tokens in ``batches`` (nats per token, unweighted), in eval mode:
    what breaks a tie between learning rates of equal validation accuracy."""
    from ..evaluate.generation import eval_mode
    from ..locate.ablation import solution_losses

    with eval_mode(model):
        return solution_losses(model, batches)


def _reference_rows(tokenizer, cfg: TrainConfig, n_chunks: int = 32, chunk_length: int = 128) -> list[dict]:
    """General-text rows for the contrast locator: the last ``n_chunks`` chunks of the side-effect text
    (the KL measurement reads the first ones, so the two do not overlap on a long text)."""
    from ..evaluate.data import load_text
    from ..evaluate.side_effects import text_chunks
    from ..locate import general_text_rows

    chunks = text_chunks(tokenizer, load_text(cfg.side_effect_data_dir), chunk_length, None)
    return general_text_rows(chunks[-n_chunks:])


def _mine_digit_pivots(model, tokenizer, rows, style: str, cfg: TrainConfig, mining_dir: str | os.PathLike,
                       progress: bool = True):
    """Pivot records of ``model`` on ``rows`` (mined once into ``mining_dir``, resumable), checked by
    ``cfg.answer``'s checker: the first wrong digit for ``number``, else the paper's branching pivots."""
    from ..cca.mining import MiningConfig, mine_pivotal_tokens

    mining = MiningConfig(pivot="digit" if cfg.answer == "number" else "token", shots=cfg.shots, prompt_style=style,
                          max_new_tokens=cfg.max_new_tokens, question_field=cfg.question_field, seed=cfg.seed)
    return mine_pivotal_tokens(model, tokenizer, rows, mining_dir, mining, answer_format=_checker(cfg),
                               progress=progress).records


def _cca_update(peft_model, tokenizer, rows, style: str, cfg: TrainConfig, run: "RunFolder", log) -> dict[str, Any]:
    """The CCA update of ``peft_model``'s circuit adapter (trained in place) on digit pivots mined from
    the base model."""
    from ..cca.update import amplify_update

    with peft_model.disable_adapter():
        records = _mine_digit_pivots(peft_model, tokenizer, rows, style, cfg, run.path / "mining")
    if not len(records):
        raise ValueError("mining found no pivotal token on the training examples (the base model made no "
                         "mistake a pivot fixes): nothing for the CCA update to learn from; use update='sft'")
    log(f"[train] CCA update of the circuit on {len(records)} pivot records, {cfg.update_steps} steps")
    # no validator: the last step is kept (kept_step_rule, the one place that decides; amplify validates instead)
    result = amplify_update(peft_model, records, None, None, tokenizer=tokenizer, steps=cfg.update_steps)
    log(f"[train] CCA update kept the {result.kept}")
    return {"records": len(records), "initial_margin": result.initial_margin, "final_margin": result.final_margin,
            "kept": result.kept}


def _locate(model, tokenizer, rows, style, cfg: TrainConfig, out: Path) -> dict[str, Any]:
    circuit = locate_for_training(model, tokenizer, rows, style, cfg, out / "mining", cfg.circuit_fraction)
    circuit.save(out / "circuit.json")
    circuit.plot(out / "circuit.png", title=f"located circuit ({cfg.locate})")
    return {"components": len(circuit.components), "counts": circuit.counts(),
            "component_fraction": circuit.component_fraction()}


def adapter_config(circuit, cfg: TrainConfig):
    """The CircuitConfig ``cfg`` trains ``circuit`` with: the paper's projections, plus a LoRA branch when
    ``cfg.lora_rank`` > 0."""
    if cfg.lora_rank:
        return circuit.to_config(projections="paper", r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank)
    return circuit.to_config(projections="paper")


def save_adapter(peft_model, out: Path, card: str, images: Sequence[str] = ("circuit.png",)) -> None:
    """Write ``out/adapter`` so that a kill leaves the old adapter or the new one, never a mix; ``images``
    (files of ``out`` the card shows) are copied beside it."""
    with atomic_dir(out / "adapter") as tmp:
        peft_model.save_pretrained(str(tmp))
        readme = tmp / "README.md"
        existing = readme.read_text() if readme.exists() else ""
        front = ""
        if existing.startswith("---"):  # keep PEFT's metadata block first, where the Hub reads it
            end = existing.index("---", 3) + 3
            front, existing = existing[:end] + "\n\n", existing[end:]
        atomic_write_text(readme, front + card + "\n" + existing)
        for image in images:
            shutil.copy(out / image, tmp / image)


def model_card(report: dict[str, Any], command: str | None) -> str:
    """The top of the adapter's README: what it is, the before/after table, the heatmap, the command."""
    b, a = report["before"], report["after"]
    lines = [f"# Circuit adapter for {report['model']}", "",
             f"Trained by circuit-peft: only {report['locate']['components']} components "
             f"({100 * report['locate']['component_fraction']:.2f} % of q/k/v heads and MLP neurons, "
             f"{report['trainable_params']:,} parameters) changed. Load with `PeftModel.from_pretrained` "
             "after `import circuit_peft`.", ""]
    if "loss" in b:  # answer='none': the held-out completion loss
        lines += ["| held-out | completion loss (nats/token) | standard error |", "| --- | ---: | ---: |",
                  f"| before | {b['loss']:.4f} | {b['stderr']:.4f} |", f"| after | {a['loss']:.4f} | {a['stderr']:.4f} |",
                  "", _loss_change(b, a), ""]
    else:
        lines += ["| held-out | accuracy | standard error | answers hitting the token cap |", "| --- | ---: | ---: | ---: |",
                  f"| before | {b['accuracy']:.3f} | {b['stderr']:.3f} | {b['capped_fraction']:.3f} |",
                  f"| after | {a['accuracy']:.3f} | {a['stderr']:.3f} | {a['capped_fraction']:.3f} |", ""]
    effects = report.get("side_effects") or {}
    if effects:
        lines += ["Side effects: " + ", ".join(f"{k} {v:+.4f}" for k, v in effects.items() if k != "seconds"), ""]
    if report.get("controls"):
        lines += ["Controls trained the same way on the same rows (located minus control paired over the held-out "
                  "problems; one training run each, so the SE does not cover another training seed):", "",
                  "| control | trainable parameters | accuracy | located - control |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {name} | {c['trainable_params']:,} | {c['accuracy']:.3f} | {_gap_text(c)} |"
                  for name, c in report["controls"].items()]
        lines += [""]
    lines += [*(f"{line}." for line in _rate_lines(report)), "", "![circuit](circuit.png)", ""]
    if command:
        lines += ["Made with:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def summary_table(report: dict[str, Any]) -> str:
    """A short human summary: before/after accuracy (or completion loss) with standard errors and the circuit size."""
    b, a = report["before"], report["after"]
    if "loss" in b:
        return "\n".join([
            f"{'':8s} {'loss':>9s} {'+/- SE':>7s}   (nats per completion token, {b['count']} held-out rows)",
            f"{'before':8s} {b['loss']:9.4f} {b['stderr']:7.4f}", f"{'after':8s} {a['loss']:9.4f} {a['stderr']:7.4f}",
            f"{_loss_change(b, a)}; circuit {report['locate']['components']} components "
            f"({100 * report['locate']['component_fraction']:.2f} %), {report['trainable_params']:,} trainable parameters",
        ])
    gain = a["accuracy"] - b["accuracy"]
    se = (a["stderr"] ** 2 + b["stderr"] ** 2) ** 0.5
    return "\n".join([
        f"{'':8s} {'accuracy':>9s} {'+/- SE':>7s} {'capped':>7s}   ({b['count']} held-out problems)",
        f"{'before':8s} {b['accuracy']:9.3f} {b['stderr']:7.3f} {b['capped_fraction']:7.3f}",
        f"{'after':8s} {a['accuracy']:9.3f} {a['stderr']:7.3f} {a['capped_fraction']:7.3f}",
        f"change {gain:+.3f} ({gain / se if se else float('nan'):+.1f} SE); circuit "
        f"{report['locate']['components']} components ({100 * report['locate']['component_fraction']:.2f} %), "
        f"{report['trainable_params']:,} trainable parameters",
        *_control_lines(report.get("controls") or {}),
        *_rate_lines(report),
    ])


def _loss_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    """After minus before completion loss, with the standard error paired over the same held-out rows."""
    from ..evaluate.accuracy import ratio_mean_se

    counts = before["counts"]
    diff = [(x - y) * n for x, y, n in zip(after["losses"], before["losses"], counts)]
    change = ratio_mean_se(diff, counts)
    se = change["stderr"]
    return (f"change {change['loss']:+.4f} nats/token (paired SE {se:.4f}, "
            f"{change['loss'] / se if se else float('nan'):+.1f} SE)")


def _rate_lines(report: dict[str, Any]) -> list[str]:
    """One line naming each arm's learning rate and its validation accuracy, when a grid chose them."""
    chosen = arms_with_chosen_rate(report)
    if not chosen:
        return []
    n = next(iter(chosen.values()))["n_validation"]
    edge = [name for name, a in chosen.items() if a.get("lr_at_grid_edge")]
    return [f"learning rate chosen per arm on {n} validation rows held back from training (validation accuracy; "
            "ties: the lower gold-solution loss): "
            + ", ".join(f"{name} {a['lr']:g} ({a['validation_accuracy'][format(a['lr'], 'g')]:.3f})"
                        for name, a in chosen.items())
            + (f"; {', '.join(edge)} kept the widened grid's edge: the best rate may lie outside it" if edge else "")]


def _gap_text(control: dict[str, Any]) -> str:
    se = control.get("gap_se")
    return f"{control['gap']:+.3f}" + (f" +/- {se:.3f}" if se is not None else " (unpaired)")


def _control_lines(controls: dict[str, dict[str, Any]]) -> list[str]:
    """The summary's rows for the controls: accuracy like before/after, then located minus control."""
    if not controls:
        return []
    return ["controls: same rows and recipe, one training run each (located - control paired over held-out problems)",
            *[f"{name:16s} {c['accuracy']:9.3f} {c['stderr']:7.3f} {c['capped_fraction']:7.3f}   located - control "
              f"{_gap_text(c)}; {c['trainable_params']:,} parameters" for name, c in controls.items()]]


def train(
    model_name: str,
    train_rows: Sequence[dict[str, Any]],
    heldout_rows: Sequence[dict[str, Any]],
    output_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Locate the circuit of ``model_name`` on ``train_rows``, train it, evaluate on ``heldout_rows``.

    Rows are in one of the formats :func:`~circuit_peft.evaluate.formats.task_rows` reads: TRL's ``messages``
    or ``prompt``/``completion`` (strings or turns), or ``{question, answer}`` dicts (field names in
    ``config``); ``config.answer`` chooses how answers are checked (a number, GSM8K-style ``... #### n`` or
    bare, by default). Each stage is resumable (see the module docstring). Returns a :class:`TrainResult`.
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
    config = asdict(cfg)
    config.update(cfg.load.settings())  # the resolved dtype, not the device: a run may resume on another device
    config.pop("load")
    config.pop("controls")  # trained after the circuit: adding controls to a finished run reuses it
    if cfg.answer == "number":  # run folders made before the checker choice keep their settings
        config.pop("answer")
    for key in ("max_new_tokens_limit", "max_cut_share", "grid_extensions"):  # add measurements or rates only:
        config.pop(key)  # a folder made before them resumes, its finished stages kept
    if not cfg.learning_rates:  # run folders made before the grid existed keep their settings
        config.pop("learning_rates"), config.pop("validation_fraction")
    settings = {"model": model_name, "config": config, "train": _fingerprint(train_rows),
                "heldout": _fingerprint(heldout_rows)}
    val_rows: list[dict[str, Any]] = []
    if cfg.learning_rates:  # rows held back to choose each arm's rate: never located on or trained on
        train_rows, val_rows = validation_split(train_rows, cfg.validation_fraction, cfg.seed)
    run = RunFolder(output_dir, settings)
    if not run.is_main:  # one process speaks (and writes); see circuit_peft.distributed
        log = _silent
    end_process_group_at_exit()
    run.open()
    try:
        return _run_stages(run, model_name, train_rows, val_rows, heldout_rows, cfg, command, log)
    finally:
        run.close()


def _silent(_: str) -> None:
    """The log of a process that is not the main one."""


def _task_rows(train_rows, heldout_rows, cfg: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Both sets checked and normalised by :func:`~circuit_peft.evaluate.formats.task_rows` (one format);
    refuses what reads only question/answer rows (selection, shots) on the other formats."""
    from ..evaluate.formats import task_rows

    train_rows, kind = task_rows(train_rows, _checker(cfg), cfg.question_field, cfg.answer_field, what="training")
    heldout_rows, held = task_rows(heldout_rows, _checker(cfg), cfg.question_field, cfg.answer_field, what="held-out")
    if held != kind:
        raise ValueError(f"the training rows are {kind.replace('_', '/')} rows and the held-out rows "
                         f"{held.replace('_', '/')} rows: give both sets in one format")
    if kind != "question_answer":
        for name, on in (("select (--select)", cfg.select), ("shots (--shots)", cfg.shots)):
            if on:
                raise ValueError(f"{name} reads question/answer rows; these are {kind} prompt/completion rows")
    return train_rows, heldout_rows


def _fit(run: RunFolder, peft_model, tokenizer, rows, val_rows, style: str, cfg: TrainConfig, log,
         mining_cfg: TrainConfig | None = None) -> dict[str, Any]:
    """The train stage: pivotal SFT of the circuit, its weights saved atomically (reloaded on a re-run).
    ``mining_cfg``: the settings CCA mines with (the run's own cap, as the locate stage mined with)."""
    weights = run.path / "stages" / "train.safetensors"
    if (run.path / "stages" / "train.json").exists() and weights.exists():
        load_weights(peft_model, weights)
        log("[train] done earlier: reused")
        return json.loads((run.path / "stages" / "train.json").read_text())

    def fit():
        if cfg.update == "cca":  # its own loop, on the main process: the others load its weights below
            out = _cca_update(peft_model, tokenizer, rows, style, mining_cfg or cfg, run, log)
            save_weights(peft_model, weights)
            return out
        examples = training_examples(tokenizer, rows, style, cfg)
        steps = math.ceil(math.ceil(len(examples) / cfg.sft.batch_size) * cfg.sft.epochs)
        log(f"[train] pivotal SFT of the circuit on {len(examples)} examples, {cfg.sft.epochs:g} epochs "
            f"({steps} optimizer steps of {cfg.sft.batch_size}; the bar shows the time left)")
        out = _train_arm(run, "train", peft_model, tokenizer, examples, val_rows, style, cfg, log)
        if run.is_main:
            save_weights(peft_model, weights)
        return {"examples": len(examples), **out}

    result = run.stage("train", fit, log, every_process=cfg.update == "sft")  # SFT: data-parallel on every process
    if not run.is_main:  # exactly the weights the main process saved
        load_weights(peft_model, weights)
    return result


def _train_arm(run: RunFolder, tag: str, model, tokenizer, examples, val_rows, style: str, cfg: TrainConfig,
               log) -> dict[str, Any]:
    """Pivotal SFT of ``model``'s adapter at ``cfg.sft.learning_rate``, or with ``cfg.learning_rates`` at
    each rate, keeping the one with the best accuracy on ``val_rows`` (ties: the lower gold-solution loss
    there). Returns the rate (and the validation accuracy and loss per rate)."""
    trainer_dir = run.path / f"trainer_{tag}"

    def train_at(m, lr: float) -> None:
        train_sft(m, tokenizer, examples, replace(cfg.sft, learning_rate=lr), str(trainer_dir), style=style,
                  progress=True)
        shutil.rmtree(trainer_dir, ignore_errors=True)

    if not cfg.learning_rates:
        train_at(model, cfg.sft.learning_rate)
        return {"lr": cfg.sft.learning_rate}
    val_batches = _gold_solution_batches(model, tokenizer, val_rows, style, cfg)  # tokenised once, every rate
    choice = fit_on_grid(run, tag, model, train_at,
                         lambda m: measure_accuracy(m, tokenizer, val_rows, style, cfg)["accuracy"], cfg.learning_rates, log,
                         tie_break=lambda m: _gold_solution_loss(m, val_batches), extensions=cfg.grid_extensions)
    log(f"[{tag}] learning rate {choice.lr:g} chosen on {len(val_rows)} validation rows"
        + (" (the grid's edge: the best rate may lie outside)" if choice.at_edge else ""))
    return {"lr": choice.lr, "validation_accuracy": choice.validation_accuracy,
            "validation_loss": choice.validation_loss, "n_validation": len(val_rows), "lr_at_grid_edge": choice.at_edge}


def _mmlu_subjects(cfg: TrainConfig) -> tuple[str, ...] | None:
    """``cfg.mmlu_subjects``, else the default subjects present in the data folder (else all present)."""
    from ..evaluate.data import DEFAULT_MMLU_SUBJECTS, mmlu_subjects_in

    if cfg.mmlu_subjects:
        return tuple(cfg.mmlu_subjects)
    present = mmlu_subjects_in(cfg.side_effect_data_dir)
    return tuple(s for s in DEFAULT_MMLU_SUBJECTS if s in present) or tuple(present) or None


def _measure_side_effects(peft_model, tokenizer, cfg: TrainConfig) -> dict[str, Any]:
    """MMLU / TruthfulQA deltas and KL of ``peft_model`` against itself with the adapter disabled."""
    from ..evaluate.side_effects import side_effects

    se = side_effects(peft_model, tokenizer, cfg.side_effect_data_dir, progress=True, kl_chunks=cfg.kl_chunks,
                      mmlu_subjects=_mmlu_subjects(cfg), mmlu_limit=cfg.mmlu_limit,
                      truthfulqa_limit=cfg.truthfulqa_limit)
    return {k: se[k] for k in ("mmlu_delta", "truthfulqa_delta", "kl") if se.get(k) is not None}


def _side_effects(run: RunFolder, peft_model, tokenizer, cfg: TrainConfig, log) -> dict[str, Any]:
    return run.stage("side_effects", lambda: _measure_side_effects(peft_model, tokenizer, cfg), log)


def _controls(run: RunFolder, model_name: str, tokenizer, circuit, rows, val_rows, heldout_rows, style: str,
              cfg: TrainConfig, after: dict[str, Any], log) -> dict[str, dict[str, Any]]:
    """Train and measure every ``cfg.controls`` arm like the circuit (one stage each, a fresh base model
    each); located minus control, paired over the held-out problems."""
    from .controls import paired_gap

    out = {}
    for name in cfg.controls:
        result = dict(run.stage(f"control_{name}", lambda: _control(run, name, model_name, tokenizer, circuit, rows,
                                                                    val_rows, heldout_rows, style, cfg, log), log,
                                every_process=True))  # trained data-parallel, measured on the main process
        if len(after.get("correct", [])) == len(result["correct"]):
            result["gap"], result["gap_se"] = paired_gap(after["correct"], result["correct"])
        else:  # an "after" stage saved before per-problem results were kept
            result["gap"], result["gap_se"] = after["accuracy"] - result["accuracy"], None
        log(f"[control {name}] held-out accuracy {result['accuracy']:.3f}; located - control {result['gap']:+.3f}")
        out[name] = result
    return out


def _control(run: RunFolder, name: str, model_name: str, tokenizer, circuit, rows, val_rows, heldout_rows, style: str,
             cfg: TrainConfig, log) -> dict[str, Any]:
    """One control: trained with the circuit's SFT settings (and rate grid) on the same rows, measured on
    the same held-out rows."""
    from ..models import load_model
    from .controls import control_model

    model, size = control_model(name, load_model(model_name, spec=cfg.load), circuit, lambda c: adapter_config(c, cfg), cfg.seed)
    examples = training_examples(tokenizer, rows, style, cfg)
    log(f"[control {name}] training {size['trainable_params']:,} parameters with the circuit's recipe")
    rate = _train_arm(run, f"control_{name}", model, tokenizer, examples, val_rows, style, cfg, log)
    if not run.is_main:
        return {}
    model.eval()
    result = {**size, **rate, **measure_accuracy(model, tokenizer, heldout_rows, style, cfg)}
    if cfg.side_effect_data_dir:
        result["side_effects"] = _measure_side_effects(model, tokenizer, cfg)
    return result


CAP_TRAINING_ROWS = 32  # training rows the cap is chosen on when no validation rows are held back


def _before(model, tokenizer, rows, cap_rows, style: str, cfg: TrainConfig, log) -> dict[str, Any]:
    """The base model on the held-out ``rows``: accuracy at a cap chosen on ``cap_rows`` (validation or
    training rows, never the held-out ones) to cut few answers (:mod:`.caps`); the held-out rows' cut share
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


def _measured(result: dict[str, Any]) -> str:
    """One measurement in words: accuracy, or completion loss, with its standard error."""
    if "loss" in result:
        return f"completion loss {result['loss']:.4f} +/- {result['stderr']:.4f} nats/token"
    return f"accuracy {result['accuracy']:.3f} +/- {result['stderr']:.3f}"


def _selected_rows(run: RunFolder, model, tokenizer, train_rows: list[dict[str, Any]], cfg: TrainConfig,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The training rows the run trains on: all of them, or the ``cfg.select`` stage's subset."""
    if not cfg.select:
        return train_rows
    sel = run.stage("select", lambda: _select(model, tokenizer, train_rows, cfg), log,
                    every_process=cfg.select == "circuitseer")  # CircuitSeer scores a shard per process
    chosen = [train_rows[i] for i in sel["rows"]]
    log(f"[select] {cfg.select}: {len(chosen)} of {len(train_rows)} training examples")
    return chosen


def _run_stages(run: RunFolder, model_name: str, train_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]],
                heldout_rows: list[dict[str, Any]], cfg: TrainConfig, command: str | None,
                log: Callable[[str], None]) -> TrainResult:
    from peft import get_peft_model

    from ..circuit import Circuit
    from ..evaluate.formats import data_style, rows_kind
    from ..models import load_model, load_tokenizer
    from ..tuner import circuit_size

    settings = run.settings
    out = run.path
    tokenizer: PreTrainedTokenizerBase = load_tokenizer(model_name)
    style = data_style(tokenizer, rows_kind(train_rows, cfg.question_field, cfg.answer_field), cfg.prompt_style, log)
    model = load_model(model_name, spec=cfg.load)

    if val_rows:
        log(f"[rates] {len(val_rows)} training rows held back to choose each arm's learning rate from "
            f"{', '.join(f'{lr:g}' for lr in cfg.learning_rates)}")
    chosen = _selected_rows(run, model, tokenizer, train_rows, cfg, log)
    located = run.stage("locate", lambda: _locate(model, tokenizer, chosen, style, cfg, out), log)
    log(f"[locate] {cfg.locate}: {located['components']} components ({100 * located['component_fraction']:.2f} %)")
    cap_rows = val_rows or chosen[:CAP_TRAINING_ROWS]  # the cap is chosen on rows the verdict is not read on
    before = run.stage("before", lambda: _before(model, tokenizer, heldout_rows, cap_rows, style, cfg, log), log)
    mining_cfg = cfg  # mining keeps the run's own cap: the locate stage mined into the same folder with it
    cfg = replace(cfg, max_new_tokens=before.get("max_new_tokens", cfg.max_new_tokens))  # every arm at the base's cap
    log(f"[before] held-out {_measured(before)}" + ("" if "loss" in before else
        f" ({cfg.max_new_tokens} new tokens, {100 * before['capped_fraction']:.0f} % of held-out answers cut)"))

    circuit = Circuit.load(out / "circuit.json", model)
    peft_model = get_peft_model(model, adapter_config(circuit, cfg))
    size = circuit_size(peft_model.peft_config["default"], peft_model)
    fitted = _fit(run, peft_model, tokenizer, chosen, val_rows, style, cfg, log, mining_cfg)
    peft_model.eval()
    after = run.stage("after", lambda: measure_accuracy(peft_model, tokenizer, heldout_rows, style, cfg), log)
    log(f"[after] held-out {_measured(after)}")
    effects = _side_effects(run, peft_model, tokenizer, cfg, log) if cfg.side_effect_data_dir else {}
    controls = _controls(run, model_name, tokenizer, circuit, chosen, val_rows, heldout_rows, style, cfg, after, log)
    report = {"model": model_name, "settings": settings, "style": style, "n_train": len(chosen),
              "n_heldout": len(heldout_rows), "locate": located, "before": before, "after": after,
              "side_effects": effects, "controls": controls, "trainable_params": size["trainable_params"],
              "training": {k: v for k, v in fitted.items() if k != "seconds"},
              "param_fraction": size["param_fraction"], "command": command,
              "files": {"adapter": str(out / "adapter"), "circuit": str(out / "circuit.json"),
                        "heatmap": str(out / "circuit.png")}}
    if run.is_main:  # one adapter and one report, however many processes trained
        save_adapter(peft_model, out, model_card(report, command))
        atomic_write_json(out / "report.json", report)
    log(summary_table(report))
    return TrainResult(report=report, model=peft_model, output_dir=out)


__all__ = ["LOCATORS", "SELECTORS", "UPDATES", "TrainConfig", "TrainResult", "RunFolder", "adapter_config",
           "locate_for_training", "measure_accuracy", "model_card", "save_adapter", "summary_table", "train",
           "training_examples"]
