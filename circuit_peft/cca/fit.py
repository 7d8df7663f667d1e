"""THE CCA update as the orchestrators run it: ``train --update cca`` (:mod:`circuit_peft.recipe.stages.fit`),
``amplify`` (:mod:`.pipeline`) and the benchmarks all call :func:`cca_update`. Which step it keeps is chosen by
an explicit field, :attr:`CCAUpdateSpec.kept_step`, never by which caller runs it:

- ``"last"``: the last step (no selection; a validator, when given, is only recorded in the history);
- ``"best_validated"``: the step with the best validation score (a validator is required; step 0 is a
  candidate unless ``update.keep_start`` is False, as in the paper's code).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..errors import CircuitPeftError
from .update import UpdateConfig, UpdateResult, amplify_update

KEPT_STEPS: tuple[str, ...] = ("last", "best_validated")


@dataclass
class CCAUpdateSpec:
    """One CCA update: ``update`` (:class:`~circuit_peft.cca.update.UpdateConfig`: steps, lr, loss, target ...)
    and ``kept_step`` (one of :data:`KEPT_STEPS`), which sets ``update.keep_best``."""

    update: UpdateConfig = field(default_factory=UpdateConfig)
    kept_step: str = "last"

    def __post_init__(self) -> None:
        if self.kept_step not in KEPT_STEPS:
            raise CircuitPeftError(f"kept_step must be one of {KEPT_STEPS}, got {self.kept_step!r}")
        self.update = replace(self.update, keep_best=self.kept_step == "best_validated")


def cca_update(model, records, circuit, spec: CCAUpdateSpec, validate: Callable[[Any], float] | None = None,
               tokenizer: Any = None, progress: bool = True,
               on_step: Callable[[Any, int], None] | None = None) -> UpdateResult:
    """The CCA update (:func:`~circuit_peft.cca.update.amplify_update`) of ``circuit`` in ``model`` (None with a
    ``PeftModel``: its active circuit adapter, trained in place) on contrastive ``records``, keeping the step
    ``spec.kept_step`` names; ``validate`` (``model -> score``, higher is better) is required for
    ``"best_validated"``; ``on_step(model, k)`` is called after the k-th step (e.g. to measure checkpoints)."""
    if spec.kept_step == "best_validated" and validate is None:
        raise CircuitPeftError("kept_step='best_validated' needs validation rows to choose the step on: give them "
                               "(a validator), or kept_step='last'")
    return amplify_update(model, records, circuit, validate, spec.update, tokenizer=tokenizer, progress=progress,
                          on_step=on_step)


__all__ = ["KEPT_STEPS", "CCAUpdateSpec", "cca_update"]
