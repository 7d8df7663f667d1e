"""The bottom layer every wing batches through: padding, the pad-id rule, length buckets, devices.

Nothing here knows about prompts, circuits or tasks; ``evaluate/``, ``locate/``, ``select/`` and
``cca/`` all pad and place tensors with these functions, so one rule holds everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def model_device(model: Any) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the (unwrapped) model's forward takes ``logits_to_keep`` (LM head only on the last positions)."""
    import inspect

    from .arch import unwrap_model

    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Every tensor of ``batch`` moved to ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def pad_token_id(model: Any = None, tokenizer: Any = None) -> int:
    """The pad id: the tokenizer's pad, else its EOS, else the model config's pad, else its EOS.

    Padded positions are always masked, so any id works; this rule makes them the same everywhere.
    Raises ``ValueError`` when neither the tokenizer nor the config names one.
    """
    for source in (tokenizer, getattr(model, "config", None)):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    raise ValueError("neither the tokenizer nor the model config has a pad or EOS token id; "
                     "set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token)")


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape ``(B, max_len)`` padded on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if not s:
            raise ValueError(f"sequence {i} is empty; every prompt needs at least one token")
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` (B, T) for left-padded ``seqs``; positions
    count from each row's first real token, so a padded row computes what it would alone."""
    ids, mask = pad_batch(seqs, int(pad_id), side="left")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def continue_after_prefix(batch: dict[str, torch.Tensor], prefix_length: int) -> dict[str, torch.Tensor]:
    """A left-padded ``batch`` (from :func:`left_pad`) of rows that continue a cached prefix of ``prefix_length``
    ids: ``position_ids`` count on from the prefix and ``attention_mask`` becomes (B, prefix + T), covering the
    prefix (the padding sits between prefix and rest, masked). A new dict; other keys are kept."""
    out = dict(batch)
    mask = batch["attention_mask"]
    out["position_ids"] = batch["position_ids"] + prefix_length
    out["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], prefix_length), mask], 1)
    return out


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (less padding); deterministic."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


__all__ = ["accepts_logits_to_keep", "continue_after_prefix", "left_pad", "length_batches", "model_device", "pad_batch",
           "pad_token_id", "to_device"]
