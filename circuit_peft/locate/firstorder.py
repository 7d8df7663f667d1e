"""The machinery the first-order locators share (``attribution``, ``ablation_estimate``): parameters frozen for
a call, a forward from embeddings that require grad (so activations are in the graph even when every parameter is
frozen), and scores per component."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..arch import Component, ModelArch
from ..taskdata.losses import last_logits


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter (restored on exit)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def forward_with_grad_inputs(model: nn.Module, inputs: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Forward from embeddings that require grad (so activations are in the graph even when every
    parameter is frozen); returns the logits of the last ``keep`` positions."""
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    return last_logits(model, {"inputs_embeds": embeds, **rest}, keep)


@contextmanager
def attribution_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, parameters frozen, gradients on (the previous mode restored on exit)."""
    was_training = model.training
    model.eval()
    try:
        with frozen_parameters(model), torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def scores_dict(arch: ModelArch, totals: dict[str, torch.Tensor]) -> dict[Component, float]:
    return {Component(kind, l, i): float(v) for kind, t in totals.items()
            for l in range(t.shape[0]) for i, v in enumerate(t[l].tolist())}



__all__ = ["attribution_mode", "forward_with_grad_inputs", "frozen_parameters", "scores_dict"]
