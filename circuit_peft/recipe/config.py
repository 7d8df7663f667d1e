"""The settings of :func:`~circuit_peft.recipe.pipeline.train` and what it returns.

:class:`TrainConfig` is the one config a run folder is keyed by (:func:`run_settings`, through
:mod:`circuit_peft.runs`); the stages (:mod:`.stages`) read it from the run context."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..locate.registry import LOCATORS as LOCATORS_BY_NAME, locator_names
from ..models import LoadSpec
from ..runs import RunSchema
from .caps import MAX_CUT_SHARE, MAX_NEW_TOKENS_LIMIT, check_cap_settings
from .controls import CONTROLS
from .rates import GRID_EXTENSIONS
from .sft import SFTSettings

# the registered locators train runs (circuit_peft.locate.registry): all that keep a share of each kind's scores
# (train keeps circuit_fraction of each kind), so not DCM, whose masks choose their own kept set
LOCATORS: tuple[str, ...] = tuple(n for n in locator_names() if not LOCATORS_BY_NAME[n].own_keep)
SELECTORS: tuple[str, ...] = ("circuitseer", "ifd", "random")
UPDATES: tuple[str, ...] = ("sft", "cca")
STAGES: tuple[str, ...] = ("select", "locate", "before", "train", "after", "side_effects")


@dataclass
class TrainConfig:
    """Settings of :func:`train`. ``circuit_fraction``: share of each kind (q/k/v heads, MLP neurons)
    kept; ``lora_rank`` > 0 adds a LoRA branch to the circuit adapter; ``max_new_tokens`` caps
    generation at evaluation (the report gives the share of answers that hit it). ``update``: ``"sft"``
    (pivotal-weighted SFT on the gold solutions, the default) or ``"cca"`` (the CCA update: logit
    difference on mined digit pivots, ``update_steps`` SGD steps at the paper's lr 1e-4; ``cca_kept_step``: the last
    step kept, or ``"best_validated"``: the best on ``validation_fraction`` of the training rows held back).
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
    cca_kept_step: str = "last"  # update='cca': "last" step, or "best_validated" on validation_fraction held back

    @property
    def holds_validation(self) -> bool:
        """Whether ``validation_fraction`` of the training rows is held back (a rate grid, or a validated CCA step)."""
        return bool(self.learning_rates) or (self.update == "cca" and self.cca_kept_step == "best_validated")

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
        if self.cca_kept_step not in ("last", "best_validated"):
            raise ValueError(f"cca_kept_step must be 'last' or 'best_validated', got {self.cca_kept_step!r}")
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


def _check_answer_settings(cfg: TrainConfig) -> None:
    """``cfg.answer`` names a checker; ``"none"`` (no generation) refuses what needs a checked answer."""
    from ..evaluate.answers import ANSWER_CHECKERS

    if cfg.answer not in ANSWER_CHECKERS:
        raise ValueError(f"answer must be one of {tuple(ANSWER_CHECKERS)}, got {cfg.answer!r}")
    if cfg.answer != "none":
        return
    needs = {"update='cca' (--update cca)": cfg.update == "cca",
             f"locate={cfg.locate!r} (--locate {cfg.locate})":  # mined pivots: a locator of contrastive records
                 getattr(LOCATORS_BY_NAME.get(cfg.locate), "reads", "") == "records",
             "learning_rates (--lrs)": bool(cfg.learning_rates), "controls (--controls)": bool(cfg.controls)}
    refused = [name for name, on in needs.items() if on]
    if refused:
        raise ValueError(f"answer='none' (--answer none) checks no answers, and {', '.join(refused)} need checked "
                         "answers (mined pivotal tokens, or accuracy to compare): choose --answer number|choice|exact, "
                         "or drop " + ", ".join(refused))


def checker(cfg: TrainConfig):
    """The answer checker ``cfg.answer`` names, reading ``cfg``'s fields."""
    from ..evaluate.answers import answer_checker

    return answer_checker(cfg.answer, cfg.answer_field, cfg.question_field)



# What a train folder is keyed by (circuit_peft.runs): controls are trained after the circuit (adding them reuses a
# finished run), the cap and grid search bounds only add measurements or rates; the other fields came later than
# the first folders and are keyed only away from the value those folders had.
TRAIN_SCHEMA = RunSchema("train", version=1, volatile=("controls", "max_new_tokens_limit", "max_cut_share",
                                                       "grid_extensions"),
                         added={"answer": "number", "cca_kept_step": "last", "learning_rates": ()})


def run_settings(model_name: str, cfg: TrainConfig, train_rows: list[dict[str, Any]],
                 heldout_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a run folder of :func:`~circuit_peft.recipe.pipeline.train` is keyed by (:data:`TRAIN_SCHEMA`): the
    model, ``cfg`` with the resolved dtype (not the device: a run may resume on another device), and the inputs'
    fingerprints. ``validation_fraction`` counts only when validation rows are held back."""
    from dataclasses import asdict

    from ..runs import fingerprint

    values = asdict(cfg)
    values.update(cfg.load.settings())
    values.pop("load")
    if not cfg.holds_validation:
        values.pop("validation_fraction")
    return TRAIN_SCHEMA.settings(values, model=model_name, train=fingerprint(train_rows),
                                 heldout=fingerprint(heldout_rows))


__all__ = ["LOCATORS", "SELECTORS", "STAGES", "TRAIN_SCHEMA", "UPDATES", "TrainConfig", "TrainResult", "checker",
           "run_settings"]
