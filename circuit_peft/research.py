"""Research helpers: the individual locators, the CCA building blocks, the pivotal-weighting pieces and
CircuitSeer's parts, for people composing their own pipeline. The stable core (the adapter, ``Circuit``,
the one-call ``train``/``amplify``, data selection, loading) is ``circuit_peft`` itself; the names here
may change between minor versions.
"""

from .arch import ModelArch
from .cca import MiningConfig, UpdateConfig, amplify_update, load_records, mine_pivotal_tokens
from .cca.weighting import PivotalMetricsCallback, PivotalWeighting
from .evaluate import build_prompt, side_effects
from .locate import (
    LOCATORS, NaNLossError, attribution_scan, circuit_margin, gradient_scan, head_ablation_scan, learn_masks,
    random_circuit, refined_head_scan,
)
from .locate.estimate import ablation_estimate_scan
from .circuits.selection import Keep
from .recipe import train_sft
from .taskdata import ProbeSpec, build_pivotal_dataset
from .select import (
    CircuitSeerSamplerMixin, CircuitSeerScorer, ReasoningHeads, find_reasoning_heads, select_indices, select_subset,
    use_sampler,
)

__all__ = [
    "ModelArch",
    # locating a circuit (locate/)
    "LOCATORS", "Keep", "NaNLossError", "ProbeSpec", "ablation_estimate_scan", "attribution_scan", "circuit_margin",
    "gradient_scan", "head_ablation_scan", "learn_masks", "random_circuit", "refined_head_scan",
    # CCA pieces (cca/)
    "MiningConfig", "UpdateConfig", "amplify_update", "load_records", "mine_pivotal_tokens",
    "PivotalMetricsCallback", "PivotalWeighting", "build_pivotal_dataset",
    # evaluation and the SFT recipe's parts
    "build_prompt", "side_effects", "train_sft",
    # CircuitSeer's parts (select/)
    "CircuitSeerSamplerMixin", "CircuitSeerScorer", "ReasoningHeads", "find_reasoning_heads", "select_indices",
    "select_subset", "use_sampler",
]
