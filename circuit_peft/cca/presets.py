"""Named settings of a whole CCA run (mining, locating, update): ``"paper"`` is CCA as its paper runs it.

``cca_preset("paper")`` (arXiv 2512.16914 and its public code, ``../shared/METHODS.md``):

- mining: one greedy trace and 10 sampled ones per problem, T = 1.2 when greedy is right, 0.8 when wrong;
  token pivots by the branching method (``method="prefix"``: the paper's other one);
- locating: DCM masks on every q/k/v head and MLP neuron, lambda 0.01, Adam 5e-3, StepLR (5 epochs,
  gamma 0.9), batch 8, up to 50 epochs, no cap on the kept count (lambda sets the size);
- update: :meth:`~circuit_peft.cca.update.UpdateConfig.paper`: full-batch gradient descent at 1e-4 on the
  logit difference, 50 steps, validation after steps 2, 4, 6, 8 and every 5th, the best validated step
  kept, ``projections="paper"``; ``target``: ``"circuit"`` (with mask), ``"all_weights"`` (without mask,
  the paper's ``update_using_mask=False``) or ``"twin"`` (the mask's layer-matched random twin).

Where we deviate from the paper and why: ``docs/cca.md`` ("CCA as the paper runs it").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import CircuitPeftError
from .mining import MiningConfig
from .config import AmplifyConfig
from .update import UpdateConfig

PRESETS: tuple[str, ...] = ("paper",)
PAPER_LRS: tuple[float, ...] = (1e-4, 1e-3)  # the paper's rate and the second one


@dataclass(frozen=True)
class CCAPreset:
    """The three configs of :func:`~circuit_peft.cca.pipeline.amplify` for one named setting."""

    mining: MiningConfig
    update: UpdateConfig
    amplify: AmplifyConfig


def cca_preset(name: str = "paper", method: str = "branching", lr: float = 1e-4, target: str = "circuit",
               mining: dict[str, Any] | None = None, amplify: dict[str, Any] | None = None) -> CCAPreset:
    """The configs of preset ``name`` (only ``"paper"``), with the pivot ``method``, update ``lr`` and ``target``;
    ``mining`` / ``amplify``: fields that do not change the method (prompt, shots, token cap, side effects)."""
    if name not in PRESETS:
        raise CircuitPeftError(f"preset must be one of {PRESETS}, got {name!r}")
    mining_cfg = MiningConfig(**{**(mining or {}), "method": method, "pivot": "token", "n_samples": 10,
                                 "temperature_if_right": 1.2, "temperature_if_wrong": 0.8})
    amplify_cfg = AmplifyConfig(**{**(amplify or {}), "locate": "dcm", "circuit_fraction": None, "dcm_lambda": 0.01,
                                   "dcm_epochs": 50, "dcm_steps": None, "dcm_lr": 5e-3})
    return CCAPreset(mining_cfg, UpdateConfig.paper(lr=lr, target=target), amplify_cfg)
