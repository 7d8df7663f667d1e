"""Head ablation scan (CircuitSeer stage 1): how much the solution loss rises when one head is ablated.

For a probe set of (prompt, solution) rows, the score of query head ``h`` of layer ``l`` is
``loss(head ablated) - loss(model)``, the mean cross-entropy over all solution tokens of the
probe set (nats per token). Ablation operators: ``uniform`` (default; the head attends
uniformly to positions <= i), ``zero`` and ``mean`` (the head's mean output over the probe's
real tokens), all from :func:`circuit_peft.interventions.ablate_heads`.

The exact scan does not pay a full forward per head: per probe batch one plain forward caches
the residual stream entering every layer; the heads of layer ``l`` then run only layers >= ``l``
from that cache, several heads per pass (the batch is replicated, each copy ablates one head).
``naive=True`` runs one full forward per head instead (for tests and benchmarks); both give
the same numbers.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batching import length_batches, model_device, pad_token_id, to_device
from ..arch import Component, get_arch
from ..circuit import Circuit
from ..interventions import (
    ABLATION_METHODS, HeadAblation, ablate_heads, capture_layer_input, head_output_means, start_at_layer,
)
from .data import ProbeSpec, collate_probe, encode_probe, last_logits, model_inputs, solution_loss_sums

DEFAULT_KEEP_FRACTION = 0.05


def probe_batches(
    model: nn.Module, tokenizer: Any, probe: Any, batch_size: int = 8, prompt_field: str = "prompt",
    solution_field: str = "solution", chat_template: bool | None = None, max_length: int | None = 1024,
    spec: ProbeSpec | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Encode probe rows (``spec``, or the loose fields) and group them into left-padded batches of
    similar length (on the model's device)."""
    encoded = encode_probe(tokenizer, probe, prompt_field, solution_field, chat_template, max_length, spec)
    pad = pad_token_id(model, tokenizer)
    device = model_device(model)
    return [to_device(collate_probe([encoded[i] for i in idx], pad), device)
            for idx in length_batches([len(e.ids) for e in encoded], batch_size)]


def _select_heads(arch, layers: Iterable[int] | None, heads: Iterable[tuple[int, int]] | None) -> list[tuple[int, int]]:
    if heads is not None:
        out = [(int(l), int(h)) for l, h in heads]
        for l, h in out:
            arch.validate("q", l, h)
        return out
    layer_list = range(arch.dims.n_layers) if layers is None else list(layers)
    for l in layer_list:
        arch.validate("q", l, 0)
    return [(l, h) for l in layer_list for h in range(arch.dims.n_heads)]


@torch.no_grad()
def solution_losses(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], ablations: Sequence[tuple[int, int]] = (),
    method: str = "uniform", means: dict[int, torch.Tensor] | None = None,
) -> float:
    """Mean solution-token loss over ``batches`` with the given heads ablated together (nats/token)."""
    total, count = 0.0, 0
    for b in batches:
        with ablate_heads(model, list(ablations), method, b["attention_mask"], means):
            logits = last_logits(model, model_inputs(b), int(b["n_keep"]))
        total += float(solution_loss_sums(logits, b["labels"])[0])
        count += int((b["labels"] != -100).sum())
    return total / count


def head_ablation_scan(
    model: nn.Module,
    tokenizer: Any,
    probe: Any,
    method: str = "uniform",
    batch_size: int = 8,
    layers: Iterable[int] | None = None,
    heads: Iterable[tuple[int, int]] | None = None,
    heads_per_pass: int | None = None,
    max_pass_tokens: int = 8192,
    naive: bool = False,
    keep_fraction: float | None = DEFAULT_KEEP_FRACTION,
    prompt_field: str = "prompt",
    solution_field: str = "solution",
    chat_template: bool | None = None,
    max_length: int = 1024,
    progress: bool = True,
    spec: ProbeSpec | None = None,
) -> Circuit:
    """Score every query head by the loss increase on solution tokens when it alone is ablated.

    Args:
        probe: rows ``{prompt_field: str, solution_field: str}`` (list or ``datasets.Dataset``).
        method: ``"uniform"`` (default), ``"zero"`` or ``"mean"``.
        batch_size: probe rows per forward.
        layers / heads: scan only these layers, or only these ``(layer, head)`` pairs (default: all).
        heads_per_pass: ablated heads batched into one forward (default: as many of the layer's
            heads as fit ``max_pass_tokens`` = replicated rows x sequence length).
        naive: one full forward per head (slow reference path).
        keep_fraction: the returned circuit keeps this share of the scanned heads (top scores);
            None keeps all; use ``circuit.top(...)`` for other choices.
        prompt_field / solution_field / chat_template / max_length: how rows become token ids, or
            all four at once as ``spec`` (a :class:`~circuit_peft.locate.data.ProbeSpec`).

    Returns:
        a :class:`Circuit` with kind ``"q"`` components (query head ``h`` of layer ``l``) whose
        scores are loss increases in nats per solution token; ``meta["base_loss"]`` is the
        unablated loss.
    """
    if method not in ABLATION_METHODS:
        raise ValueError(f"unknown ablation method {method!r}; use one of {ABLATION_METHODS}")
    arch = get_arch(model)
    scan = _select_heads(arch, layers, heads)
    if not scan:
        raise ValueError("no heads to scan: layers/heads selected nothing")
    spec = ProbeSpec.resolve(spec, prompt_field=prompt_field, solution_field=solution_field,
                             chat_template=chat_template, max_length=max_length)
    batches = probe_batches(model, tokenizer, probe, batch_size, spec=spec)
    n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    means = head_output_means(model, [model_inputs(b) for b in batches], arch) if method == "mean" else None

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if naive:
                base_sum, sums = _naive(model, batches, scan, method, means, progress)
            else:
                base_sum, sums = _cached(model, arch, batches, scan, method, means, heads_per_pass,
                                         max_pass_tokens, progress)
    finally:
        model.train(was_training)
    base = base_sum / n_tokens
    scores = {Component("q", l, h): sums[(l, h)] / n_tokens - base for l, h in scan}
    meta = {"base_loss": base, "ablation": method, "probe_rows": sum(len(b["input_ids"]) for b in batches),
            "solution_tokens": n_tokens, "naive": naive, "score": "loss increase (nats per solution token)"}
    circuit = Circuit.from_scores(model, scores, method="ablation", meta=meta)
    return circuit.top(fraction=keep_fraction) if keep_fraction is not None else circuit


def _naive(model, batches, scan, method, means, progress) -> tuple[float, dict[tuple[int, int], float]]:
    base = 0.0
    for b in batches:
        base += float(solution_loss_sums(last_logits(model, model_inputs(b), int(b["n_keep"])), b["labels"])[0])
    sums: dict[tuple[int, int], float] = {}
    for l, h in tqdm(scan, desc="ablation scan (naive)", disable=not progress):
        total = 0.0
        for b in batches:
            with ablate_heads(model, [HeadAblation(l, h)], method, b["attention_mask"], means):
                logits = last_logits(model, model_inputs(b), int(b["n_keep"]))
            total += float(solution_loss_sums(logits, b["labels"])[0])
        sums[(l, h)] = total
    return base, sums


def _cached(model, arch, batches, scan, method, means, heads_per_pass, max_pass_tokens, progress):
    by_layer: dict[int, list[int]] = {}
    for l, h in scan:
        by_layer.setdefault(l, []).append(h)
    base = 0.0
    sums = {lh: 0.0 for lh in scan}
    bar = tqdm(total=len(scan) * len(batches), desc="ablation scan", disable=not progress)
    for b in batches:
        inputs = model_inputs(b)
        keep = int(b["n_keep"])
        with ExitStack() as stack:
            cached = {l: stack.enter_context(capture_layer_input(model, l, arch)) for l in by_layer}
            base += float(solution_loss_sums(last_logits(model, inputs, keep), b["labels"])[0])
        B, T = b["input_ids"].shape
        g_max = heads_per_pass or max(1, max_pass_tokens // (B * T))
        for l, layer_heads in by_layer.items():
            hidden = cached[l]["hidden"]
            for start in range(0, len(layer_heads), g_max):
                group = layer_heads[start : start + g_max]
                g = len(group)
                ablations = [HeadAblation(l, h, rows=slice(j * B, (j + 1) * B)) for j, h in enumerate(group)]
                rep = model_inputs(b, repeat=g)
                with start_at_layer(model, l, hidden.repeat(g, 1, 1), arch), \
                        ablate_heads(model, ablations, method, rep["attention_mask"], means, arch):
                    logits = last_logits(model, rep, keep)
                group_sums = solution_loss_sums(logits, b["labels"], groups=g)
                for j, h in enumerate(group):
                    sums[(l, h)] += float(group_sums[j])
                bar.update(g)
    bar.close()
    return base, sums
