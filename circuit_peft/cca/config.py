"""The settings of :func:`~circuit_peft.cca.pipeline.amplify` beyond mining and the update: :class:`AmplifyConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..locate.registry import locator_names
from ..models import LoadSpec
from .fit import KEPT_STEPS

LOCATE_METHODS: tuple[str, ...] = locator_names(reads="records")  # attribution, dcm: the locators of records


@dataclass
class AmplifyConfig:
    """Settings of :func:`amplify` beyond mining (:class:`MiningConfig`) and update (:class:`UpdateConfig`).
    ``load``: where and in what dtype :func:`amplify` loads the model when given its name
    (:class:`~circuit_peft.models.LoadSpec`; a model given loaded is used as it is)."""

    locate: str = "attribution"  # our choice for speed; "dcm" is the paper's
    circuit_fraction: float | None = 0.02  # attribution: share of each kind kept; dcm: optional cap
    dcm_lambda: float = 0.01
    dcm_epochs: int = 50
    dcm_steps: int | None = None  # the step schedule of learn_masks (None: the paper's epochs)
    dcm_lr: float | None = None  # None: learn_masks' default (the paper's 5e-3)
    eval_max_new_tokens: int | None = None  # None: the mining max_new_tokens
    eval_batch_size: int = 16
    side_effects: tuple[str, ...] = ("mmlu", "truthfulqa", "kl")
    side_effect_data_dir: str | None = None  # None: skip side effects
    mmlu_subjects: tuple[str, ...] | None = None
    mmlu_limit: int | None = None
    truthfulqa_limit: int | None = None
    kl_chunks: int = 8
    load: LoadSpec = field(default_factory=LoadSpec)
    kept_step: str = "best_validated"  # the update's kept step (cca.fit.KEPT_STEPS): the best on val_problems, or "last"

    def __post_init__(self) -> None:
        self.load = LoadSpec.of(self.load)
        if self.kept_step not in KEPT_STEPS:
            raise ValueError(f"kept_step must be one of {KEPT_STEPS}, got {self.kept_step!r}")
        if self.locate not in LOCATE_METHODS:
            raise ValueError(f"locate must be one of {LOCATE_METHODS}, got {self.locate!r}")
        if self.circuit_fraction is not None and not 0 < self.circuit_fraction <= 1:
            raise ValueError(f"circuit_fraction must be in (0, 1], got {self.circuit_fraction}")


__all__ = ["LOCATE_METHODS", "AmplifyConfig"]
