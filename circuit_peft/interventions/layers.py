"""Layer-level control of a forward pass: cache the residual stream entering a layer, restart from it,
stop after a layer, and cut the backward pass below a layer (the circuit tuner's gradient cut).

Shapes: ``B`` batch, ``T`` sequence, ``D`` hidden size.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..arch import ModelArch, get_arch


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (caught by :func:`forward_until`)."""


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def capture_layer_input(model: nn.Module, layer: int, arch: ModelArch | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the residual stream entering ``layer`` as ``store["hidden"]`` (B, T, D)."""
    arch = arch or get_arch(model)
    store: dict[str, torch.Tensor] = {}

    def pre_hook(_m, args, kwargs):
        store["hidden"] = _hidden_arg(args, kwargs).detach()

    handle = arch.layers(model)[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


class _SkipLayer(nn.Module):
    """Stands in for a decoder layer below the restart point: returns its input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def start_at_layer(model: nn.Module, layer: int, hidden: torch.Tensor, arch: ModelArch | None = None) -> Iterator[None]:
    """Run only layers >= ``layer``, feeding them ``hidden`` (B, T, D) instead of recomputing it.

    Pass the same ``input_ids``/``attention_mask`` as when ``hidden`` was captured (positions
    and masks still come from them; the embeddings are computed but discarded).
    """
    arch = arch or get_arch(model)
    layers = arch.layers(model)
    saved = [layers[i] for i in range(layer)]
    skip = _SkipLayer()
    for i in range(layer):
        layers[i] = skip

    def pre_hook(_m, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    handle = layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, original in enumerate(saved):
            layers[i] = original


@contextmanager
def stop_after_layer(model: nn.Module, layer: int, arch: ModelArch | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Raise :class:`StopForward` right after ``layer`` runs; its output lands in ``store["hidden"]``.

    Use :func:`forward_until`, which catches the exception, rather than this directly.
    """
    arch = arch or get_arch(model)
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _args, output):
        store["hidden"] = output[0] if isinstance(output, tuple) else output
        raise StopForward

    handle = arch.layers(model)[layer].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def forward_until(model: nn.Module, layer: int, arch: ModelArch | None = None, **inputs: Any) -> torch.Tensor:
    """Run ``model(**inputs)`` only up to and including ``layer``; return its output (B, T, D).

    Layers above ``layer``, the final norm and the LM head are never run.
    """
    with stop_after_layer(model, layer, arch) as store:
        try:
            model(**inputs, use_cache=False)
        except StopForward:
            pass
    return store["hidden"]


def stop_gradient_below(
    model: nn.Module, layer: int, watch: Iterable[nn.Parameter] = (), arch: ModelArch | None = None
) -> torch.utils.hooks.RemovableHandle:
    """Detach the residual stream entering ``layer`` so no gradient is computed below it.

    Installed persistently (returns the handle; call ``.remove()``), not as a context manager.
    ``watch``: parameters below ``layer`` (embeddings, lower layers); if any of them requires grad
    at forward time the hook does nothing, so unfreezing them later still trains them.
    With gradient checkpointing the detached input is marked ``requires_grad`` again: reentrant
    checkpointing needs a grad-requiring input to backpropagate into ``layer``'s own parameters.
    """
    arch = arch or get_arch(model)
    block = arch.layers(model)[layer]
    watched = list(watch)

    def pre_hook(module, args, kwargs):
        if not torch.is_grad_enabled() or any(p.requires_grad for p in watched):
            return None
        hidden = _hidden_arg(args, kwargs)
        if not hidden.requires_grad:
            return None
        cut = hidden.detach()
        if module.training and getattr(module, "gradient_checkpointing", False):
            cut.requires_grad_(True)
        if args:
            return (cut, *args[1:]), kwargs
        kwargs["hidden_states"] = cut
        return args, kwargs

    return block.register_forward_pre_hook(pre_hook, with_kwargs=True)
