"""Hooks on whole modules: what a module returns, and the weight gradient of modules whose weight holds none."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn


@contextmanager
def capture_module_output(module: nn.Module) -> Iterator[dict[str, Any]]:
    """Record what ``module``'s forward returns, as ``store["out"]`` (the last call's output, as is)."""
    store: dict[str, Any] = {}

    def hook(_m, _args, out):
        store["out"] = out

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def accumulate_weight_grads(modules: Iterable[nn.Module]) -> Iterator[dict[nn.Module, torch.Tensor]]:
    """The gradient each linear module's weight would get, summed over the backward passes run inside:
    ``store[module]`` = sum of ``grad_output^T @ input``, (out, in) float32, for weights that cannot hold a
    ``.grad`` themselves (a bitsandbytes 4-bit weight). A module counts only where its output requires
    grad (make the input embeddings trainable, say)."""
    store: dict[nn.Module, torch.Tensor] = {}

    def hook(module, args, out):
        if not out.requires_grad:
            return
        x = args[0].detach()

        def on_grad(grad):
            g = grad.reshape(-1, grad.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            store[module] = g if module not in store else store[module] + g

        out.register_hook(on_grad)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
