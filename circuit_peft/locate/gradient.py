"""Gradient locating: score each head and neuron by the norm of the SFT loss gradient on its weights.

The circuit is chosen for what training will do to it: the components whose trainable slices
(``projections``, default the CCA paper's: q/k/v rows of heads, ``up_proj`` rows of neurons) get
the largest gradient of the (pivotal-weighted) completion loss, summed over the training set.
Scores are L2 norms of that gradient (per kind; kinds are ranked separately).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import PROJECTION_PRESETS, Component, ModelArch, get_arch
from ..circuit import Circuit
from ..batching import model_device, to_device

GRADIENT_KINDS: tuple[str, ...] = ("q", "k", "v", "mlp")


def _feature_sq_norms(module: nn.Module, axis: str) -> torch.Tensor:
    """Squared L2 norm of ``module.weight.grad`` per feature on ``axis``, shape ``(features,)``."""
    g = module.weight.grad.detach().double().pow(2)
    dim = ModelArch.weight_dim(module, axis)
    return g.sum(1 - dim)


def _component_scores(model: nn.Module, arch: ModelArch, kinds: tuple[str, ...], projections: str
                      ) -> dict[Component, float]:
    scores: dict[Component, float] = {}
    for layer in range(arch.dims.n_layers):
        for kind in kinds:
            n = arch.num_components(kind)
            sq = torch.zeros(n, dtype=torch.float64)
            for p in arch.projections_for(kind, PROJECTION_PRESETS[projections][kind]):
                feats = _feature_sq_norms(arch.projection_module(model, layer, p), arch.axis(p))
                start, _ = arch.feature_range(kind, 0, p)
                _, stop = arch.feature_range(kind, n - 1, p)
                sq += feats[start:stop].reshape(n, -1).sum(1)
            scores.update({Component(kind, layer, i): v for i, v in enumerate(sq.sqrt().tolist())})
    return scores


def gradient_scan(
    model: nn.Module,
    dataset: Iterable[dict[str, Any]],
    kinds: Iterable[str] = GRADIENT_KINDS,
    projections: str = "paper",
    keep_fraction: float | None = 0.02,
    batch_size: int = 8,
    pad_token_id: int = 0,
    progress: bool = True,
) -> Circuit:
    """Score components by the gradient norm of the pivotal-weighted SFT loss on their weight slices.

    Args:
        dataset: rows of :func:`circuit_peft.cca.weighting.build_pivotal_dataset` (``input_ids``,
            ``labels``, ``token_weights``), e.g. gold solutions with the answer weighted.
        projections: ``"paper"`` or ``"all"`` (which slices of a component count; use the ones you train).
        keep_fraction: the returned circuit keeps this share of each kind (None: keep all).

    The model's parameters are left as they were (``requires_grad`` flags and ``.grad`` restored).
    """
    from ..cca.weighting import PivotalCollator, pivotal_weighted_loss

    kinds = tuple(kinds)
    arch = get_arch(model)
    rows = [dict(r) for r in dataset]
    if not rows:
        raise ValueError("gradient_scan needs at least one training example")
    modules = {arch.projection_module(model, layer, p) for layer in range(arch.dims.n_layers) for k in kinds
               for p in arch.projections_for(k, PROJECTION_PRESETS[projections][k])}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    collate = PivotalCollator(None, pad_token_id=pad_token_id)
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for m in modules:
            m.weight.requires_grad_(True)
        model.eval()
        device = model_device(model)
        starts = range(0, len(rows), batch_size)
        for s in tqdm(starts, desc="gradient scan", disable=not progress):
            batch = to_device(collate(rows[s : s + batch_size]), device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss = pivotal_weighted_loss(logits, batch["labels"], batch["token_weights"])
            (loss * len(rows[s : s + batch_size]) / len(rows)).backward()
        scores = _component_scores(model, arch, kinds, projections)
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    meta = {"score": "L2 norm of the pivotal-weighted SFT loss gradient on the component's slices",
            "projections": projections, "examples": len(rows), "kinds": list(kinds)}
    circuit = Circuit.from_scores(model, scores, method="gradient", meta=meta)
    return circuit if keep_fraction is None else circuit.top_each_kind(keep_fraction)


__all__ = ["GRADIENT_KINDS", "gradient_scan"]
