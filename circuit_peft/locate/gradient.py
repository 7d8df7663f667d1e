"""Gradient locating: score each head and neuron by the norm of the SFT loss gradient on its weights.

The circuit is chosen for what training will do to it: the components whose trainable slices
(``projections``, default the CCA paper's: q/k/v rows of heads, ``up_proj`` rows of neurons) get
the largest gradient of the (pivotal-weighted) completion loss, summed over the training set.
Scores are L2 norms of that gradient (per kind; kinds are ranked separately). On a bfloat16/float16
model each batch's weight gradient is added into a float32 sum (the scored weights' size in float32), so
many batches do not add up in bfloat16; the norms are taken in float64.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import PROJECTION_PRESETS, Component, ModelArch, get_arch
from ..circuit import Circuit
from .registry import register_locator
from ..batching import model_device, to_device
from ..interventions import accumulate_weight_grads
from ..tuner.layer import is_4bit

GRADIENT_KINDS: tuple[str, ...] = ("q", "k", "v", "mlp")


def _feature_sq_norms(module: nn.Module, axis: str, sums: dict[nn.Parameter, torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of ``module.weight``'s gradient (its float32 sum in ``sums``, else ``.grad``) per feature
    on ``axis``, shape ``(features,)`` (float64, CPU)."""
    g = sums.get(module.weight, module.weight.grad).detach().double().pow(2)
    dim = ModelArch.weight_dim(module, axis)
    return g.sum(1 - dim).cpu()


def _component_scores(model: nn.Module, arch: ModelArch, kinds: tuple[str, ...], projections: str,
                      sums: dict[nn.Parameter, torch.Tensor]) -> dict[Component, float]:
    scores: dict[Component, float] = {}
    for layer in range(arch.dims.n_layers):
        for kind in kinds:
            n = arch.num_components(kind)
            sq = torch.zeros(n, dtype=torch.float64)
            for p in arch.projections_for(kind, PROJECTION_PRESETS[projections][kind]):
                feats = _feature_sq_norms(arch.projection_module(model, layer, p), arch.axis(p), sums)
                start, _ = arch.feature_range(kind, 0, p)
                _, stop = arch.feature_range(kind, n - 1, p)
                sq += feats[start:stop].reshape(n, -1).sum(1)
            scores.update({Component(kind, layer, i): v for i, v in enumerate(sq.sqrt().tolist())})
    return scores


def _gradient_norms(model: nn.Module, arch: ModelArch, rows: list[dict[str, Any]], kinds: tuple[str, ...],
                    projections: str, batch_size: int, pad_token_id: int, progress: bool, desc: str,
                    quantized: frozenset[nn.Module] = frozenset()) -> dict[Component, float]:
    """Per-component L2 norm of the mean pivotal-weighted loss gradient over ``rows`` (``.grad`` cleared first)."""
    from ..taskdata.collate import PivotalCollator
    from ..taskdata.losses import pivotal_weighted_loss

    for p in model.parameters():
        p.grad = None
    sums: dict[nn.Parameter, torch.Tensor] = {}
    collate = PivotalCollator(None, pad_token_id=pad_token_id)
    device = model_device(model)
    with accumulate_weight_grads(quantized) as grads:  # a 4-bit weight holds no .grad: hooks sum its gradient
        for s in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress):
            batch = to_device(collate(rows[s : s + batch_size]), device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss = pivotal_weighted_loss(logits, batch["labels"], batch["token_weights"])
            (loss * len(rows[s : s + batch_size]) / len(rows)).backward()
            add_low_precision_grads(model, sums)
    sums.update({m.weight: g for m, g in grads.items()})
    return _component_scores(model, arch, kinds, projections, sums)


def add_low_precision_grads(model: nn.Module, sums: dict[nn.Parameter, torch.Tensor]) -> None:
    """Move every bfloat16/float16 ``.grad`` of ``model`` into its float32 sum in ``sums`` (``.grad`` cleared),
    so that gradients of many batches add up in float32 on a low-precision model."""
    for p in model.parameters():
        if p.grad is not None and p.grad.dtype in (torch.bfloat16, torch.float16):
            g = p.grad.float()
            sums[p] = sums[p].add_(g) if p in sums else g
            p.grad = None


def gradient_scan(
    model: nn.Module,
    dataset: Iterable[dict[str, Any]],
    kinds: Iterable[str] = GRADIENT_KINDS,
    projections: str = "paper",
    keep_fraction: float | None = 0.02,
    batch_size: int = 8,
    pad_token_id: int = 0,
    progress: bool = True,
    reference: Iterable[dict[str, Any]] | None = None,
) -> Circuit:
    """Score components by the gradient norm of the pivotal-weighted SFT loss on their weight slices.

    Args:
        dataset: rows of :func:`circuit_peft.taskdata.examples.build_pivotal_dataset` (``input_ids``,
            ``labels``, ``token_weights``), e.g. gold solutions with the answer weighted.
        projections: ``"paper"`` or ``"all"`` (which slices of a component count; use the ones you train).
        keep_fraction: the returned circuit keeps this share of each kind (None: keep all).
        reference: rows of the same shape on general text (see :func:`general_text_rows`). When given, a
            component's score is its task-gradient norm divided by its reference-gradient norm: what
            the task moves more than it moves everything else (``method="gradient_contrast"``).

    The model's parameters are left as they were (``requires_grad`` flags and ``.grad`` restored).
    """
    kinds = tuple(kinds)
    arch = get_arch(model)
    rows = [dict(r) for r in dataset]
    ref_rows = None if reference is None else [dict(r) for r in reference]
    if not rows:
        raise ValueError("gradient_scan needs at least one training example")
    if ref_rows is not None and not ref_rows:
        raise ValueError("gradient_scan: reference is empty; give general-text rows or reference=None")
    modules = {arch.projection_module(model, layer, p) for layer in range(arch.dims.n_layers) for k in kinds
               for p in arch.projections_for(k, PROJECTION_PRESETS[projections][k])}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    was_training = model.training
    quantized = frozenset(m for m in modules if is_4bit(m))
    norms = partial(_gradient_norms, model, arch, kinds=kinds, projections=projections, batch_size=batch_size,
                    pad_token_id=pad_token_id, progress=progress, quantized=quantized)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in modules - quantized:
            m.weight.requires_grad_(True)
        if quantized:  # a 4-bit weight cannot require grad: gradients flow from the embeddings instead
            model.get_input_embeddings().weight.requires_grad_(True)
        model.eval()
        scores = norms(rows, desc="gradient scan")
        if ref_rows is not None:
            ref = norms(ref_rows, desc="gradient scan (reference)")
            scores = {c: v / max(ref[c], 1e-30) for c, v in scores.items()}
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    return _gradient_circuit(model, scores, projections, kinds, len(rows), ref_rows, keep_fraction)


def _gradient_circuit(model, scores, projections, kinds, n_rows, ref_rows, keep_fraction) -> Circuit:
    meta = {"score": "L2 norm of the pivotal-weighted SFT loss gradient on the component's slices",
            "projections": projections, "examples": n_rows, "kinds": list(kinds)}
    method = "gradient"
    if ref_rows is not None:
        method = "gradient_contrast"
        meta["score"] += ", divided by the same norm of the LM loss gradient on general text"
        meta["reference_rows"] = len(ref_rows)
    circuit = Circuit.from_scores(model, scores, method=method, meta=meta)
    return circuit if keep_fraction is None else circuit.top_each_kind(keep_fraction)


def general_text_rows(chunks: Iterable[Sequence[int]]) -> list[dict[str, Any]]:
    """General-text token chunks as rows for :func:`gradient_scan`'s ``reference`` (every token weighted 1)."""
    return [{"input_ids": list(c), "labels": list(c), "token_weights": [1.0] * len(c)} for c in chunks]


def reference_rows(tokenizer: Any, text: str, n_chunks: int = 32, chunk_length: int = 128) -> list[dict[str, Any]]:
    """General-text rows for ``gradient_contrast``: the last ``n_chunks`` ``chunk_length``-token chunks of
    ``text`` (a side-effect KL measurement reads the first ones, so the two do not overlap on a long text)."""
    from ..evaluate.side_effects import text_chunks

    return general_text_rows(text_chunks(tokenizer, text, chunk_length, None)[-n_chunks:])


def task_rows(model: nn.Module, tokenizer: Any, task_data: Any, spec: Any = None) -> list[dict[str, Any]]:
    """``task_data`` as rows :func:`gradient_scan` trains on: tokenized task rows (``input_ids``, ``labels``,
    ``token_weights``, e.g. pivotal SFT rows) as given; probe rows encoded (:func:`encode_probe`, loss and
    weight 1 on every solution token)."""
    from ..taskdata.examples import answer_example, as_rows, encode_probe

    rows = as_rows(task_data)
    if rows and {"input_ids", "labels", "token_weights"} <= set(rows[0]):
        return rows
    out = []
    for e in encode_probe(tokenizer, rows, spec=spec):
        prompt = len(e.ids) - e.n_solution
        out.append({**answer_example(e.ids[:prompt], e.ids[prompt:]), "token_weights": [1.0] * len(e.ids)})
    return out


@register_locator("gradient", reads="probe", kinds=GRADIENT_KINDS, heads=True,
                  summary="the norm of the (answer-weighted) SFT-loss gradient on each component's trained slices")
def locate_by_gradient(model: nn.Module, tokenizer: Any, task_data: Any, keep: Any, spec: Any = None,
                       **options: Any) -> Circuit:
    """Locator ``gradient``: :func:`gradient_scan` of :func:`task_rows` (``options``: its settings), then ``keep``."""
    from ..batching import pad_token_id

    rows = task_rows(model, tokenizer, task_data, spec)
    return gradient_scan(model, rows, keep_fraction=None, pad_token_id=pad_token_id(model, tokenizer),
                         **options).keep(keep)


@register_locator("gradient_contrast", reads="probe", kinds=GRADIENT_KINDS, heads=True,
                  summary="gradient's norm divided by the same norm of the LM loss on general text (reference=: "
                          "a text, or general_text_rows)")
def locate_by_gradient_contrast(model: nn.Module, tokenizer: Any, task_data: Any, keep: Any, reference: Any = None,
                                **options: Any) -> Circuit:
    """Locator ``gradient_contrast``: :func:`locate_by_gradient` with ``reference`` (a text: its
    :func:`reference_rows`; or rows) as the general text the task gradient is divided by."""
    from ..errors import CircuitPeftError

    if reference is None:
        raise CircuitPeftError("reference: the gradient_contrast locator needs general text (a text, or "
                               "general_text_rows); got none")
    rows = reference_rows(tokenizer, reference) if isinstance(reference, str) else reference
    return locate_by_gradient(model, tokenizer, task_data, keep, reference=rows, **options)


__all__ = ["GRADIENT_KINDS", "gradient_scan", "general_text_rows", "reference_rows", "task_rows"]
