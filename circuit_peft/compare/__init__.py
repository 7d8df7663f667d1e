"""Accuracy against drift: every arm over learning rates, checkpoints and seeds, and one verdict.

:mod:`.arms` (what each arm trains; :func:`~.arms.register_arm_kind` adds one; :mod:`.cca_arms` adds CCA's), :mod:`.grid` (the
resumable (arm, rate, seed) stages with measurements at checkpoints), :mod:`.verdict` (test accuracy at a
drift budget, paired t over seeds, Holm), :mod:`.plot` (frontier.png), :mod:`.report` (:func:`compare`:
all of it in one run folder; ``circuit-peft compare``). Guide: ``docs/compare.md``.
"""

from . import cca_arms  # registers cca_mask, cca_nomask, cca_twin, cca_sft
from .arms import ARM_KINDS, ArmContext, ArmKind, ArmSpec, default_comparisons, parse_arms, register_arm_kind
from .grid import CompareConfig, run_grid
from .report import compare
from .verdict import best_at_budget, holm, paired_t, verdict

__all__ = ["ARM_KINDS", "ArmContext", "ArmKind", "ArmSpec", "CompareConfig", "best_at_budget", "compare",
           "default_comparisons", "holm", "paired_t", "parse_arms", "register_arm_kind", "run_grid", "verdict"]
