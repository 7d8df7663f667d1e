"""Controls trained beside the located circuit: did *locating* earn the gain on your task?

``circuit-peft train --controls random_layer,lora`` trains, after the located circuit, each control with
the same data, recipe (:func:`~circuit_peft.recipe.sft.train_sft`, answer weights included) and held-out
rows, and reports located minus control, paired over the held-out problems:

* ``random_layer``: a random circuit with the located one's kinds and counts in the same layers;
* ``random_anywhere``: the same kinds and counts in random layers;
* ``lora``: LoRA r=16, alpha 32 on every linear layer (what most users train instead), dropout
  :data:`LORA_DROPOUT`;
* ``lora_matched``: LoRA with the rank whose trainable parameters come closest to the circuit's.

The paired standard error covers the draw of held-out problems only: one training run per arm cannot
show how much another training seed would move either; ``--seeds 0,1,2`` (:mod:`.seeds`) repeats the run
and gives the standard error over seeds.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..stats import mean_se

CONTROLS: tuple[str, ...] = ("random_layer", "random_anywhere", "lora", "lora_matched")
LORA_RANK = 16
# PEFT's own default. Without dropout the pivotal trainer runs the prompt prefix every row shares once (with
# dropout it must run rows whole, ~3x slower on chat prompts); benchmarks/README.md compares 0.0 with the 0.1
# the controls used before (session 18) on the same seeds.
LORA_DROPOUT = 0.0


def matched_lora_rank(model: nn.Module, trainable_params: int) -> int:
    """The LoRA rank (>= 1) on every linear layer but the LM head whose trainable parameters come closest
    to ``trainable_params``: each rank adds ``in_features + out_features`` per layer."""
    head = model.get_output_embeddings()
    per_rank = sum(m.in_features + m.out_features for m in model.modules()
                   if isinstance(m, nn.Linear) and m is not head)
    return max(1, round(trainable_params / per_rank))


def control_model(name: str, model: nn.Module, circuit: Any, adapter_config: Any, seed: int,
                  lora_dropout: float = LORA_DROPOUT) -> tuple[nn.Module, dict]:
    """``model`` (a fresh base model) prepared for control ``name`` and what it trains.

    Args:
        circuit: the located :class:`~circuit_peft.circuit.Circuit` (random controls copy its kinds and counts).
        adapter_config: ``circuit -> CircuitConfig``, the located adapter's own recipe (a LoRA branch included).
        seed: the random circuits' draw and the LoRA controls' initialisation.
        lora_dropout: the LoRA controls' dropout on their branch input.
    """
    from peft import LoraConfig

    from ..locate import random_circuit
    from ..tuner import circuit_size

    if name not in CONTROLS:
        raise ValueError(f"unknown control {name!r}; choose from {CONTROLS}")
    if name.startswith("random_"):
        config = adapter_config(random_circuit(circuit, name.removeprefix("random_"), seed))
        peft_model = seeded_peft_model(model, config, seed)
        return peft_model, {"trainable_params": circuit_size(config, peft_model)["trainable_params"]}
    rank = LORA_RANK
    if name == "lora_matched":
        rank = matched_lora_rank(model, circuit_size(adapter_config(circuit), model)["trainable_params"])
    peft_model = seeded_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=lora_dropout,
                                                      target_modules="all-linear"), seed)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return peft_model, {"trainable_params": trainable, "lora_rank": rank, "lora_dropout": lora_dropout}


def seeded_peft_model(model: nn.Module, config: Any, seed: int) -> nn.Module:
    """``get_peft_model`` with the adapter's random initialisation (LoRA's A) drawn from ``seed``, not from
    whatever the process drew before; the global random state is left as it was."""
    from peft import get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def paired_gap(a: Sequence[int], b: Sequence[int]) -> tuple[float, float | None]:
    """Mean and standard error of ``a[i] - b[i]`` (per-problem correctness, 0/1, of two arms on the same
    held-out problems)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_gap needs two equal, non-empty lists (got {len(a)} and {len(b)})")
    return mean_se([float(x) - float(y) for x, y in zip(a, b)])


__all__ = ["CONTROLS", "LORA_DROPOUT", "LORA_RANK", "control_model", "matched_lora_rank", "paired_gap",
           "seeded_peft_model"]
