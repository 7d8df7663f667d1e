"""Head ablation scan (CircuitSeer stage 1): how much the solution loss rises when one head is ablated.

For a probe set of (prompt, solution) rows, the score of query head ``h`` of layer ``l`` is
``loss(head ablated) - loss(model)``, the mean cross-entropy over all solution tokens of the
probe set (nats per token). Ablation operators: ``uniform`` (default; the head attends
uniformly to positions <= i), ``zero`` and ``mean`` (the head's mean output over the probe's
real tokens), all from :func:`circuit_peft.interventions.ablate_heads`.

The exact scan does not pay a full forward per head: per probe batch one plain forward caches
the residual stream entering every layer; the heads of layer ``l`` then run only layers >= ``l``
from that cache, several heads per pass (the batch is replicated, each copy ablates one head).
When every probe row's prompt starts with the same ids (system message, worked examples), that prefix
runs once per group of ablated heads and its KV cache serves every row. ``naive=True`` runs one full
forward per head instead (for tests and benchmarks); all paths give the same numbers up to float rounding.
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
from ..prefix import prefix_kv_cache, repeat_cache, sharable_prefix_ids
from .registry import register_locator
from ..interventions import (
    ABLATION_METHODS, HeadAblation, ablate_heads, capture_components, capture_layer_input, head_output_means,
    start_at_layer,
)
from ..taskdata.collate import collate_probe_after_prefix, model_inputs
from ..taskdata.examples import EncodedProbe, ProbeSpec, encode_probe
from ..taskdata.losses import last_logits, solution_loss_sums

DEFAULT_KEEP_FRACTION = 0.05


def probe_batches(
    model: nn.Module, tokenizer: Any, probe: Any, batch_size: int = 8, prompt_field: str = "prompt",
    solution_field: str = "solution", chat_template: bool | None = None, max_length: int | None = 1024,
    spec: ProbeSpec | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Encode probe rows (``spec``, or the loose fields) and group them into left-padded batches of
    similar length (on the model's device)."""
    encoded = encode_probe(tokenizer, probe, prompt_field, solution_field, chat_template, max_length, spec)
    return _collate_batches(model, encoded, batch_size, pad_token_id(model, tokenizer))


def _collate_batches(model: nn.Module, encoded: list[EncodedProbe], batch_size: int, pad: int,
                     prefix_length: int = 0) -> list[dict[str, torch.Tensor]]:
    """Encoded probe rows in left-padded batches of similar length on the model's device; with
    ``prefix_length`` the rows' first ``prefix_length`` ids (a prompt prefix they all share) are left out
    of every batch, to run once (:func:`~circuit_peft.taskdata.collate.collate_probe_after_prefix`)."""
    device = model_device(model)
    rest = [EncodedProbe(e.ids[prefix_length:], e.n_solution) for e in encoded]
    return [to_device(collate_probe_after_prefix([rest[i] for i in idx], prefix_length, pad), device)
            for idx in length_batches([len(e.ids) for e in rest], batch_size)]


def _shared_prompt_prefix(model: nn.Module, encoded: list[EncodedProbe], min_length: int) -> list[int]:
    """The ids every probe row's prompt starts with (leaving each prompt at least one id, so no shared
    position predicts a solution token); empty when shorter than ``min_length`` or where sharing would not be
    exact for ``model`` run in eval mode, as the scan runs it (:func:`~circuit_peft.prefix.sharable_prefix_ids`)."""
    return sharable_prefix_ids(model, [e.ids[: len(e.ids) - e.n_solution] for e in encoded], min_length, in_eval=True,
                               slots=max(len(e.ids) for e in encoded))


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
    share_prompt_prefix: bool = True,
    min_shared_prefix: int = 16,
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
        share_prompt_prefix: run the prompt prefix every probe row starts with (system message, few-shot
            examples), when it is at least ``min_shared_prefix`` tokens, once per ablated head instead of
            once per row; the scores equal the whole rows' up to float rounding.
        keep_fraction: the returned circuit keeps this share of the scanned heads (top scores);
            None keeps all; use ``circuit.top(...)`` for other choices.
        prompt_field / solution_field / chat_template / max_length: how rows become token ids, or
            all four at once as ``spec`` (a :class:`~circuit_peft.taskdata.examples.ProbeSpec`).

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
    encoded = encode_probe(tokenizer, probe, spec=spec)
    pad = pad_token_id(model, tokenizer)
    prefix = _shared_prompt_prefix(model, encoded, min_shared_prefix) if share_prompt_prefix and not naive else []
    whole = _collate_batches(model, encoded, batch_size, pad)
    batches = _collate_batches(model, encoded, batch_size, pad, len(prefix)) if prefix else whole
    n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    means = head_output_means(model, [model_inputs(b) for b in whole], arch) if method == "mean" else None

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if naive:
                base_sum, sums = _naive(model, batches, scan, method, means, progress)
            elif prefix:
                prefix_ids = torch.tensor([prefix], device=model_device(model))
                base_sum, sums = _cached_after_prefix(model, arch, prefix_ids, batches, scan, method, means,
                                                      heads_per_pass, max_pass_tokens, progress)
            else:
                base_sum, sums = _cached(model, arch, batches, scan, method, means, heads_per_pass,
                                         max_pass_tokens, progress)
    finally:
        model.train(was_training)
    base = base_sum / n_tokens
    scores = {Component("q", l, h): sums[(l, h)] / n_tokens - base for l, h in scan}
    meta = {"base_loss": base, "ablation": method, "probe_rows": len(encoded), "solution_tokens": n_tokens,
            "naive": naive, "shared_prefix": len(prefix), "score": "loss increase (nats per solution token)"}
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


def _by_layer(scan: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for l, h in scan:
        by_layer.setdefault(l, []).append(h)
    return by_layer


def _group_losses(model, arch, batch, layer, group, hidden, method, means, prefix_values=None,
                  **forward_kwargs) -> torch.Tensor:
    """Summed solution loss (len(group),) of ``batch`` with each head of ``group`` (of ``layer``) ablated in its
    own copy of the batch; only layers >= ``layer`` run, from ``hidden`` (B, T, D), the batch's residual entering
    it. ``prefix_values`` / ``forward_kwargs`` (``past_key_values``) when the batch continues a cached prefix."""
    B, T = batch["input_ids"].shape
    ablations = [HeadAblation(layer, h, rows=slice(j * B, (j + 1) * B)) for j, h in enumerate(group)]
    rep = model_inputs(batch, repeat=len(group))
    with start_at_layer(model, layer, hidden.repeat(len(group), 1, 1), arch), \
            ablate_heads(model, ablations, method, rep["attention_mask"][:, -T:], means, arch,
                         prefix_values=prefix_values):
        logits = last_logits(model, rep, int(batch["n_keep"]), **forward_kwargs)
    return solution_loss_sums(logits, batch["labels"], groups=len(group))


def _cached(model, arch, batches, scan, method, means, heads_per_pass, max_pass_tokens, progress):
    by_layer = _by_layer(scan)
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
                for h, loss in zip(group, _group_losses(model, arch, b, l, group, hidden, method, means)):
                    sums[(l, h)] += float(loss)
                bar.update(len(group))
    bar.close()
    return base, sums


def _cached_after_prefix(model, arch, prefix_ids, batches, scan, method, means, heads_per_pass, max_pass_tokens,
                         progress):
    """:func:`_cached` for batches that continue the shared ``prefix_ids`` (1, P). Per group of ablated heads
    the prefix runs once (one row per head, the head ablated there too; layers >= l only, from the base
    prefix pass's residual stream) and its KV cache serves every batch; the batches' rows run only layers >= l
    after it, from their cached residual stream."""
    by_layer = _by_layer(scan)
    with capture_components(model, "v", list(by_layer), arch=arch) as prefix_v, ExitStack() as stack:
        prefix_in = {l: stack.enter_context(capture_layer_input(model, l, arch)) for l in by_layer}
        base_cache = _prefix_cache(model, prefix_ids, 1)
    base, hidden = 0.0, []
    for b in batches:
        with ExitStack() as stack:
            cached = {l: stack.enter_context(capture_layer_input(model, l, arch)) for l in by_layer}
            logits = last_logits(model, model_inputs(b), int(b["n_keep"]),
                                 past_key_values=repeat_cache(base_cache, len(b["input_ids"])))
        base += float(solution_loss_sums(logits, b["labels"])[0])
        hidden.append({l: c["hidden"] for l, c in cached.items()})
    sums = {lh: 0.0 for lh in scan}
    widest = max(b["input_ids"].numel() for b in batches)
    g_max = heads_per_pass or max(1, max_pass_tokens // widest)
    bar = tqdm(total=len(scan) * len(batches), desc="ablation scan (shared prefix)", disable=not progress)
    for l, layer_heads in by_layer.items():
        for start in range(0, len(layer_heads), g_max):
            group = layer_heads[start : start + g_max]
            g = len(group)
            with start_at_layer(model, l, prefix_in[l]["hidden"].repeat(g, 1, 1), arch), \
                    ablate_heads(model, [HeadAblation(l, h, rows=slice(j, j + 1)) for j, h in enumerate(group)],
                                 method, None, means, arch):
                cache = _prefix_cache(model, prefix_ids, g, below=(base_cache, l))
            for b, h_in in zip(batches, hidden):
                losses = _group_losses(model, arch, b, l, group, h_in[l], method, means,
                                       prefix_values={l: prefix_v[l]},
                                       past_key_values=repeat_cache(cache, len(b["input_ids"])))
                for h, loss in zip(group, losses):
                    sums[(l, h)] += float(loss)
                bar.update(g)
    bar.close()
    return base, sums


def _prefix_cache(model: nn.Module, prefix_ids: torch.Tensor, rows: int, below: tuple[Any, int] | None = None):
    """KV cache of ``prefix_ids`` (1, P) run as ``rows`` identical rows (each may ablate its own head).

    ``below=(base_cache, l)``: the forward runs only layers >= l (under :func:`start_at_layer`); the cache's
    layers < l are taken from ``base_cache`` (the rows after the prefix skip those layers too: only their
    length, P, is read, for positions and masks)."""
    cache = prefix_kv_cache(model, prefix_ids.repeat(rows, 1))
    if below is not None:
        base_cache, layer = below
        for i in range(layer):
            cache.layers[i] = base_cache.layers[i]
    return cache


@register_locator("ablation", reads="probe", kinds=("q",), heads=True,
                  summary="the exact head ablation scan: each query head's solution-loss increase when it alone is "
                          "ablated (nats per solution token)")
def locate_by_ablation(model: nn.Module, tokenizer: Any, task_data: Any, keep: Any, **options: Any) -> Circuit:
    """Locator ``ablation``: :func:`head_ablation_scan` of the probe rows (``options``: its settings), then ``keep``."""
    return head_ablation_scan(model, tokenizer, task_data, keep_fraction=None, **options).keep(keep)
