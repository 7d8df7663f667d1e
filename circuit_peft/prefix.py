"""Shared prompt prefixes: the ids every row of a batch starts with (system message, few-shot examples)
run through the model once, and their KV cache serves every row.

One rule decides when that is allowed, :func:`sharing_is_exact`: the rows then compute what they would
compute whole (the same logits, losses and gradients up to float rounding). Every user asks it through
:func:`sharable_prefix_length` (a padded batch) or :func:`sharable_prefix_ids` (id lists): the pivotal
trainers (``cca/trainers.py``), the contrastive update (``cca/update.py``), DCM (``locate/dcm.py``), the
head ablation scan (``locate/ablation.py``) and evaluation decoding (``evaluate/generation.py``). What a caller passes in
keeps the other half of exactness: only positions whose next token is not scored (the prompt, not the
answer; ``limit`` before the first labelled position) may be shared.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from .batching import accepts_logits_to_keep, pad_batch


def batch_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, limit: int) -> int:
    """Number of leading positions (at most ``limit``) where every row of ``input_ids`` (B, T) holds the same
    real (unmasked) token: the prompt prefix a batch can run once (system message, few-shot examples)."""
    same = (input_ids == input_ids[:1]).all(0)
    if attention_mask is not None:
        same &= (attention_mask == 1).all(0)
    return int(same[: max(limit, 0)].long().cumprod(0).sum())


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest id prefix that every sequence starts with, leaving each at least one id."""
    if not sequences:
        return 0
    ids, mask = pad_batch(sequences, 0, side="right")
    return batch_prefix_length(ids, mask, min(len(s) for s in sequences) - 1)


def shared_prefix_ids(sequences: Sequence[Sequence[int]], min_length: int = 1) -> list[int]:
    """The ids every sequence starts with, leaving each at least one (:func:`shared_prefix_length`); ``[]`` when
    that is shorter than ``min_length`` (a prompt prefix too short to be worth running once on its own)."""
    length = shared_prefix_length(sequences)
    return list(sequences[0][:length]) if length >= max(min_length, 1) else []


def sharing_is_exact(model: torch.nn.Module, accelerator: Any = None, in_eval: bool = False,
                     slots: int | None = None) -> bool:
    """THE exactness rule: whether running a shared prefix once computes what running every row whole does.

    True when nothing random acts on the prefix (no active dropout: LoRA's ``lora_dropout`` would otherwise
    draw one mask for all rows), the model keeps a KV cache (no activation checkpointing), the adapter adds no
    key/value prefix of its own (no prompt learning) and the parameters are whole in this process (one
    process or DDP, not FSDP or DeepSpeed; judged from ``accelerator`` when given, else from the parameters).
    ``in_eval``: the rows will run in eval mode whatever mode the model is in now (no dropout acts).
    ``slots``: for rows left-padded after the prefix, the most cache positions one will use; sharing then also
    needs them inside any sliding attention window (:func:`fits_sliding_window`).
    """
    inner = accelerator.unwrap_model(model) if accelerator is not None else getattr(model, "module", model)
    config = getattr(inner, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):  # prefix tuning & co. bring their own KV cache
        return False
    return _whole_parameters(model, accelerator) and not checkpoints_activations(model) \
        and (in_eval or not has_active_dropout(model)) and (slots is None or fits_sliding_window(model, slots))


def fits_sliding_window(model: torch.nn.Module, slots: int) -> bool:
    """Whether ``slots`` cache positions (prefix + the longest padded rest + any generated tokens) stay inside the
    model's sliding attention window (Gemma-2/3, Mistral; True without one). Past it, a row left-padded between
    the shared prefix and its rest would see fewer real tokens than the same row run alone: sharing is then
    inexact. (Right-padded rows, as the pivotal trainers run them, have no padding inside the window.)"""
    from .arch import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return True
    return slots <= int(window)


def _whole_parameters(model: torch.nn.Module, accelerator: Any) -> bool:
    """Whether every parameter is whole in this process (one process or DDP; not FSDP / DeepSpeed / TP)."""
    if accelerator is not None:
        from accelerate.utils import DistributedType

        return accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                DistributedType.MULTI_GPU)
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", ())
    return not any(isinstance(p, dtensor) or hasattr(p, "ds_id") for p in model.parameters())


def checkpoints_activations(model: torch.nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on: the model then keeps no KV cache in training."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether a dropout (a module with ``p > 0`` in training mode, or the config's attention dropout) acts."""
    from .arch import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    if model.training and float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in model.modules())


def sharable_prefix_length(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           limit: int, min_length: int = 1, accelerator: Any = None) -> int:
    """Leading positions (at most ``limit``) of the padded batch ``input_ids`` (B, T) to run once: the real ids
    every row shares, when there are at least two rows, :func:`sharing_is_exact` and it is ``min_length`` long;
    else 0 (run the rows whole)."""
    if input_ids.shape[0] < 2 or not sharing_is_exact(model, accelerator):  # right-padded rows: no window check
        return 0
    length = batch_prefix_length(input_ids, attention_mask, limit)
    return length if length >= max(min_length, 1) else 0


def sharable_prefix_ids(model: torch.nn.Module | None, sequences: Sequence[Sequence[int]], min_length: int = 1,
                        accelerator: Any = None, in_eval: bool = False, slots: int | None = None) -> list[int]:
    """:func:`sharable_prefix_length` for id lists: the ids every sequence starts with (leaving each at least
    one), or ``[]``. ``model=None`` skips the model check (the caller runs nothing random, cached, sharded).
    ``slots``: the most cache positions a row will use (default: the longest sequence; add generated tokens or
    the part of a row that follows the sequence given), checked against a sliding window."""
    longest = slots if slots is not None else max((len(s) for s in sequences), default=0)
    if len(sequences) < 2 or (model is not None and not sharing_is_exact(model, accelerator, in_eval, longest)):
        return []
    return shared_prefix_ids(sequences, min_length)


def prefix_kv_cache(model: Any, input_ids: torch.Tensor, rows: int = 1) -> Any:
    """The KV cache of ``input_ids`` (1, P) run through ``model`` (the LM head only on the last position when
    the model takes ``logits_to_keep``), each row repeated ``rows`` times in place (None when the model returns
    no cache). Differentiable under grad: autograd carries the rows' gradients back through the repeats."""
    keep = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    cache = model(input_ids=input_ids, use_cache=True, **keep).past_key_values
    if cache is not None and rows > 1:
        cache.batch_repeat_interleave(rows)
    return cache


def repeat_cache(cache: Any, times: int) -> Any:
    """A copy of a KV cache (e.g. a shared prompt prefix's) with each row repeated ``times`` times in a row,
    for a batch that continues it; the original is left as it was."""
    out = copy.deepcopy(cache)
    if times > 1:
        out.batch_repeat_interleave(times)
    return out


__all__ = ["batch_prefix_length", "checkpoints_activations", "has_active_dropout", "prefix_kv_cache",
           "repeat_cache", "sharable_prefix_ids", "sharable_prefix_length", "shared_prefix_ids",
           "shared_prefix_length", "sharing_is_exact"]
