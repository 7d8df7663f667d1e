"""Constructive Circuit Amplification: pivotal-token mining, the amplification update, the
end-to-end pipeline, the built-in arithmetic problems, and pivotal-weighted SFT (``weighting``)."""

from .mining import MiningConfig, MiningResult, first_wrong_digit, load_records, mine_pivotal_tokens
from .pipeline import AmplifyConfig, AmplifyResult, amplify, locate_circuit
from .presets import PAPER_LRS, PRESETS, CCAPreset, cca_preset
from .problems import (
    ARITHMETIC_SHOTS, COMPARISON_SHOTS, MULTIPLICATION_SHOTS, TASKS, demo_problems, make_problems, problem_split,
)
from .update import (
    UpdateConfig, UpdateResult, accuracy_validator, amplify_update, circuit_config_for, margin_loss, margin_validator,
    measure_update_speedup,
)
from .weighting import PivotalMetricsCallback, PivotalWeighting, pivotal_metrics
from ..taskdata import PivotalCollator, build_pivotal_dataset  # the task-data layer's; kept public here

__all__ = [
    "ARITHMETIC_SHOTS", "CCAPreset", "COMPARISON_SHOTS", "MULTIPLICATION_SHOTS", "PAPER_LRS", "PRESETS", "TASKS", "cca_preset", "AmplifyConfig", "MiningConfig", "MiningResult", "PivotalCollator", "PivotalMetricsCallback",
    "AmplifyResult", "PivotalWeighting", "UpdateConfig", "UpdateResult", "accuracy_validator", "amplify", "amplify_update",
    "build_pivotal_dataset", "circuit_config_for", "demo_problems", "first_wrong_digit", "load_records",
    "locate_circuit", "make_problems", "margin_loss", "margin_validator", "measure_update_speedup",
    "mine_pivotal_tokens", "pivotal_metrics", "problem_split",
]
