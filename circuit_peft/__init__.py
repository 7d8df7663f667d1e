"""circuit-peft: find the circuit inside a language model that does a task, and train only it.

Importing this package registers the ``CIRCUIT`` PEFT type (idempotent), so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` know ``CircuitConfig``.

The names below are the stable core (``__all__``); research helpers (single locators, CCA pieces,
CircuitSeer's parts) live in :mod:`circuit_peft.research`.
"""

__version__ = "0.1.0"

import circuit_peft_autoload as _autoload

_autoload.quiet_bitsandbytes_kernel_notice()  # before peft imports bitsandbytes (see circuit_peft_autoload)

from .errors import CircuitPeftError  # noqa: E402
from .arch import Component, UnsupportedArchitectureError, get_arch, supported_families  # noqa: E402
from .models import LoadSpec, load_model, load_tokenizer, tiny_model  # noqa: E402

# --- the adapter (tuner/; importing it registers the CIRCUIT PEFT type) and the circuit it trains ---
from .tuner import CircuitConfig, CircuitModel, circuit_size  # noqa: E402
from .circuit import Circuit  # noqa: E402
from .locate.registry import register_locator, run_locator  # noqa: E402  (every locator by name: LOCATORS there)

# --- the main entry points: the one-call recipe, CCA, pivotal-weighted training, data selection, evaluation ---
from .recipe import SFTSettings, TrainConfig, TrainResult, train  # noqa: E402
from .cca import AmplifyConfig, amplify, make_problems  # noqa: E402
from .cca.trainers import PivotalTrainer  # noqa: E402  (PivotalSFTTrainer: circuit_peft.cca.trainers)
from .select import CircuitSeerSampler, select_data  # noqa: E402
from .evaluate import evaluate_accuracy  # noqa: E402

__all__ = [
    "CircuitPeftError", "UnsupportedArchitectureError", "Component", "get_arch", "supported_families",
    "LoadSpec", "load_model", "load_tokenizer", "tiny_model",
    "CircuitConfig", "CircuitModel", "circuit_size", "Circuit", "run_locator", "register_locator",
    "SFTSettings", "TrainConfig", "TrainResult", "train",
    "AmplifyConfig", "amplify", "make_problems", "PivotalTrainer",
    "CircuitSeerSampler", "select_data", "evaluate_accuracy",
]


def __getattr__(name: str):
    """A name that left the top level says where it went (``circuit_peft.research``) instead of a bare error."""
    import importlib

    research = importlib.import_module(f"{__name__}.research")  # (``from . import`` would call back here)
    if name == "research":
        return research
    if name in research.__all__:
        raise AttributeError(f"circuit_peft.{name} moved to circuit_peft.research.{name} "
                             f"(from circuit_peft.research import {name})")
    raise AttributeError(f"module 'circuit_peft' has no attribute {name!r}")
