"""The ``CIRCUIT`` PEFT method (PEFT's tuner layout: config, layer, model).

Importing this package registers the method with PEFT (idempotent), so ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and ``PeftConfig.from_pretrained``
know ``CircuitConfig``; saved model cards gain a section listing the trained components; saves of a
circuit adapter survive a kill and a broken adapter folder is refused naming its file (``saving.py``). The
patches of PEFT this needs are installed through ``circuit_peft.compat`` (their version bounds are there).
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, register_peft_method

from .. import compat
from . import saving
from .config import CircuitConfig, ensure_peft_type
from .layer import CircuitLayer, CircuitLinear
from .model import CircuitModel, ModulePlan, add_model_card_sections, build_plan, circuit_size, model_card_section

__all__ = [
    "CircuitConfig",
    "CircuitLayer",
    "CircuitLinear",
    "CircuitModel",
    "ModulePlan",
    "build_plan",
    "circuit_size",
    "model_card_section",
    "register",
]


def register() -> None:
    """Register the ``CIRCUIT`` type with PEFT (safe to call more than once)."""
    ensure_peft_type()  # compat.extend_peft_type: PEFT's closed enum gains CIRCUIT
    if PeftType.CIRCUIT not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="circuit", config_cls=CircuitConfig, model_cls=CircuitModel, prefix="circuit_")
    compat.patch_model_card(add_model_card_sections)
    saving.install()  # atomic weights and config in save_pretrained; a broken folder refused naming its file


register()
