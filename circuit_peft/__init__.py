"""circuit-peft: find the circuit inside a language model that does a task, and train only it.

Importing this package registers the ``CIRCUIT`` PEFT type (idempotent), so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` know ``CircuitConfig``.
"""

__version__ = "0.1.0"

import circuit_peft_autoload as _autoload

_autoload.quiet_bitsandbytes_kernel_notice()  # before peft imports bitsandbytes (see circuit_peft_autoload)

from .errors import CircuitPeftError  # noqa: F401
from .arch import Component, ModelArch, UnsupportedArchitectureError, get_arch, supported_families  # noqa: F401
from .models import LoadSpec, load_model, load_tokenizer, tiny_model  # noqa: F401

# --- adapter (tuner/) ---
from .tuner import CircuitConfig, CircuitModel, circuit_size  # noqa: F401  (registers the CIRCUIT PEFT type)

# --- locate (circuit.py, locate/) ---
from .circuit import Circuit  # noqa: F401,E402
from .locate import (  # noqa: F401,E402
    NaNLossError, ProbeSpec, attribution_scan, circuit_margin, head_ablation_scan, learn_masks, refined_head_scan,
)

# --- CCA (cca/, evaluate/) ---
from .cca import (  # noqa: F401,E402
    AmplifyConfig, MiningConfig, UpdateConfig, amplify, amplify_update, load_records, make_problems,
    mine_pivotal_tokens,
)
from .cca.weighting import PivotalMetricsCallback, PivotalWeighting, build_pivotal_dataset  # noqa: F401,E402
from .cca.trainers import PivotalTrainer  # noqa: F401,E402  (PivotalSFTTrainer: circuit_peft.cca.trainers)
from .evaluate import build_prompt, evaluate_accuracy, side_effects  # noqa: F401,E402

# --- the one-call recipe (recipe/) ---
from .recipe import SFTSettings, TrainConfig, TrainResult, train, train_sft  # noqa: F401,E402
from .locate import gradient_scan, random_circuit  # noqa: F401,E402

# --- CircuitSeer (select/) ---
from .select import (  # noqa: F401
    CircuitSeerSampler, CircuitSeerSamplerMixin, CircuitSeerScorer, ReasoningHeads, find_reasoning_heads, select_data,
    select_indices, select_subset, use_sampler,
)

__all__ = [
    "CircuitPeftError",
    "Component", "ModelArch", "UnsupportedArchitectureError", "get_arch", "supported_families",
    "LoadSpec", "load_model", "load_tokenizer", "tiny_model",
    "CircuitConfig", "CircuitModel", "circuit_size",
    "Circuit", "NaNLossError", "ProbeSpec", "attribution_scan", "circuit_margin", "head_ablation_scan", "learn_masks",
    "refined_head_scan",
    "AmplifyConfig", "MiningConfig", "UpdateConfig", "amplify", "amplify_update", "load_records", "make_problems",
    "mine_pivotal_tokens", "PivotalMetricsCallback", "PivotalWeighting", "build_pivotal_dataset", "PivotalTrainer",
    "build_prompt", "evaluate_accuracy", "side_effects",
    "SFTSettings", "TrainConfig", "TrainResult", "train", "train_sft", "gradient_scan", "random_circuit",
    "CircuitSeerSampler", "CircuitSeerSamplerMixin", "CircuitSeerScorer", "ReasoningHeads", "find_reasoning_heads",
    "select_data", "select_indices", "select_subset", "use_sampler",
]
