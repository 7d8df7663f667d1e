"""The ``CIRCUIT`` PEFT method (PEFT's tuner layout: config, layer, model).

Importing this package registers the method with PEFT (idempotent), so ``get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and ``PeftConfig.from_pretrained``
know ``CircuitConfig``; saved model cards gain a section listing the trained components; saves of a
circuit adapter survive a kill and a broken adapter folder is refused naming its file (``saving.py``).
"""

from __future__ import annotations

import functools

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, register_peft_method

from . import saving
from .config import CircuitConfig, ensure_peft_type
from .layer import CircuitLayer, CircuitLinear
from .model import CircuitModel, ModulePlan, build_plan, circuit_size, model_card_section

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

_CARD_MARKER = "## Circuit adapter ("


def _patch_model_card() -> None:
    """Make ``PeftModel.create_or_update_model_card`` add a circuit section (for CIRCUIT adapters only)."""
    original = PeftModel.create_or_update_model_card
    if getattr(original, "_circuit_peft", False):
        return

    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str) -> None:
        original(self, output_dir)
        circuits = {n: c for n, c in self.peft_config.items() if isinstance(c, CircuitConfig)}
        if not circuits:
            return
        import os

        from huggingface_hub import ModelCard

        path = os.path.join(output_dir, "README.md")
        card = ModelCard.load(path)
        tags = set(card.data.get("tags") or []) | {"circuit-peft", "circuit"}
        card.data["tags"] = sorted(tags)
        text = card.text
        for name, config in circuits.items():
            marker = f"{_CARD_MARKER}`{name}`)"
            if marker in text:  # replace a previous save's section
                head, _, rest = text.partition(marker)
                nxt = rest.find("\n## ")
                text = head.rstrip("\n") + ("\n" + rest[nxt + 1 :] if nxt >= 0 else "")
            text = text.rstrip("\n") + "\n\n" + model_card_section(config, name)
        card.text = text
        card.save(path)

    create_or_update_model_card._circuit_peft = True
    PeftModel.create_or_update_model_card = create_or_update_model_card


def register() -> None:
    """Register the ``CIRCUIT`` type with PEFT (safe to call more than once)."""
    ensure_peft_type()
    if PeftType.CIRCUIT not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="circuit", config_cls=CircuitConfig, model_cls=CircuitModel, prefix="circuit_")
    _patch_model_card()
    saving.install()  # atomic weights and config in save_pretrained; a broken folder refused naming its file


register()
