"""Attribution: first-order estimates of every head's and neuron's effect, one forward + one backward per batch.

Two targets:

* ``target="ablation"`` on probe rows ``(prompt, solution)``: the estimated increase of the mean
  solution-token loss when a query head is ablated (``uniform``/``zero``/``mean``, as in
  :func:`circuit_peft.locate.ablation.head_ablation_scan`) or an MLP neuron is zeroed:
  ``sum_{rows, positions} (a_ablated - a) . dL/da``. Scores are in nats per solution token and
  approximate the exact scan's.
* ``target="logit_diff"`` on contrastive records: gradient x activation of the logit difference
  ``logit[desired] - logit[undesired]`` at the last context position (where DCM acts), summed
  over the component's width and averaged over records, for query/key/value heads and MLP
  neurons: the first-order drop of the logit difference if the component were zeroed there.

Higher scores mean more important in both cases.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batching import length_batches, model_device, pad_token_id, to_device
from ..arch import Component, ModelArch, get_arch
from ..circuit import Circuit
from ..interventions import ABLATION_METHODS, uniform_attention_output, capture_components, head_output_means
from .ablation import DEFAULT_KEEP_FRACTION, probe_batches
from .data import (
    ProbeSpec, at_least_float32, collate_records, last_logits, model_inputs, solution_loss_sums, validate_records,
)

TARGETS = ("ablation", "logit_diff")
_DEFAULT_KINDS = {"ablation": ("q", "mlp"), "logit_diff": ("q", "k", "v", "mlp")}


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


def _forward_with_grad_inputs(model: nn.Module, inputs: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Forward from embeddings that require grad (so activations are in the graph even when every
    parameter is frozen); returns the logits of the last ``keep`` positions."""
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    return last_logits(model, {"inputs_embeds": embeds, **rest}, keep)


def attribution_scan(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    target: str = "ablation",
    method: str = "uniform",
    kinds: Iterable[str] | None = None,
    batch_size: int = 4,
    keep_fraction: float | None = DEFAULT_KEEP_FRACTION,
    prompt_field: str = "prompt",
    solution_field: str = "solution",
    chat_template: bool | None = None,
    max_length: int = 1024,
    progress: bool = True,
    spec: ProbeSpec | None = None,
) -> Circuit:
    """Score heads and neurons by a first-order (gradient) estimate of their effect.

    Args:
        tokenizer: needed for text probe rows (``target="ablation"``); may be None for
            contrastive records or pre-tokenised probe rows.
        data: probe rows ``{prompt, solution}`` for ``"ablation"``; contrastive records
            ``{context_ids, desired_id, undesired_id, problem_id}`` for ``"logit_diff"``.
        method: head ablation operator for ``"ablation"`` (``uniform``, ``zero``, ``mean``).
        kinds: component kinds to score. ``"ablation"``: ``"q"`` (a query head's output) and
            ``"mlp"`` (default both); ``"logit_diff"``: any of ``q k v mlp`` (default all).
        keep_fraction: the returned circuit keeps this share of each scored kind (top scores);
            None keeps all.
        prompt_field / solution_field / chat_template / max_length: how probe rows become token ids
            (``"ablation"``), or all four at once as ``spec`` (a :class:`~circuit_peft.locate.data.ProbeSpec`).

    Returns:
        a :class:`Circuit` with every scored component's estimate in ``scores``.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown attribution target {target!r}; use one of {TARGETS}")
    if method not in ABLATION_METHODS:
        raise ValueError(f"unknown ablation method {method!r}; use one of {ABLATION_METHODS}")
    kinds = tuple(_DEFAULT_KINDS[target] if kinds is None else kinds)
    allowed = ("q", "mlp") if target == "ablation" else ("q", "k", "v", "mlp")
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds:
        raise ValueError(f"target {target!r} scores kinds {allowed}; got {list(kinds)}")
    arch = get_arch(model)
    was_training = model.training
    model.eval()
    try:
        with frozen_parameters(model), torch.enable_grad():
            if target == "ablation":
                spec = ProbeSpec.resolve(spec, prompt_field=prompt_field, solution_field=solution_field,
                                         chat_template=chat_template, max_length=max_length)
                batches = probe_batches(model, tokenizer, data, batch_size, spec=spec)
                scores, meta = _ablation_attribution(model, arch, batches, method, kinds, progress)
            else:
                scores, meta = _logit_diff_attribution(model, arch, tokenizer, data, kinds, batch_size, progress)
    finally:
        model.train(was_training)
    meta.update(target=target, kinds=list(kinds))
    circuit = Circuit.from_scores(model, scores, method="attribution", meta=meta)
    if keep_fraction is None:
        return circuit
    return circuit.top_each_kind(keep_fraction)


def _scores_dict(arch: ModelArch, totals: dict[str, torch.Tensor]) -> dict[Component, float]:
    return {Component(kind, l, i): float(v) for kind, t in totals.items()
            for l in range(t.shape[0]) for i, v in enumerate(t[l].tolist())}


def _ablation_attribution(model, arch, batches, method, kinds, progress):
    n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    layers = range(arch.dims.n_layers)
    means = None
    if method == "mean" and "q" in kinds:
        with torch.no_grad():
            means = head_output_means(model, [model_inputs(b) for b in batches], arch)
    # "q" scores are read at the head's output (the input of o_proj).
    site = {"q": "o", "mlp": "mlp"}
    totals = {k: torch.zeros(arch.dims.n_layers, arch.num_components(k), dtype=torch.float64) for k in kinds}
    base = 0.0
    for b in tqdm(batches, desc="attribution (ablation)", disable=not progress):
        inputs = model_inputs(b)
        with ExitStack() as stack:
            acts = {k: stack.enter_context(capture_components(model, site[k], layers, detach=False, arch=arch))
                    for k in kinds}
            values = (stack.enter_context(capture_components(model, "v", layers, arch=arch))
                      if "q" in kinds and method == "uniform" else None)
            logits = _forward_with_grad_inputs(model, inputs, int(b["n_keep"]))
        loss = solution_loss_sums(logits, b["labels"])[0] / n_tokens
        base += float(loss.detach())
        flat = [(k, l) for k in kinds for l in layers]
        grads = torch.autograd.grad(loss, [acts[k][l] for k, l in flat], allow_unused=True)
        real = b["attention_mask"][:, :, None, None]
        for (k, l), g in zip(flat, grads):
            if g is None:
                continue
            a = at_least_float32(acts[k][l].detach())
            if k == "mlp":
                replaced = torch.zeros_like(a)
            elif method == "zero":
                replaced = torch.zeros_like(a)
            elif method == "mean":
                replaced = at_least_float32(means[l])[None, None].expand_as(a)
            else:
                uniform = uniform_attention_output(at_least_float32(values[l]), b["attention_mask"])
                replaced = uniform.repeat_interleave(arch.dims.group_size, dim=2)
            totals[k][l] += ((replaced - a) * at_least_float32(g) * real).sum((0, 1, 3)).double().cpu()
    meta = {"base_loss": base, "ablation": method, "solution_tokens": n_tokens,
            "score": "estimated loss increase (nats per solution token)"}
    return _scores_dict(arch, totals), meta


def _logit_diff_attribution(model, arch, tokenizer, data, kinds, batch_size, progress):
    records = validate_records(data, arch.dims.vocab_size)
    pad = pad_token_id(model, tokenizer)
    layers = range(arch.dims.n_layers)
    totals = {k: torch.zeros(arch.dims.n_layers, arch.num_components(k), dtype=torch.float64) for k in kinds}
    margin = 0.0
    for idx in tqdm(length_batches([len(r["context_ids"]) for r in records], batch_size),
                    desc="attribution (logit diff)", disable=not progress):
        b = to_device(collate_records([records[i] for i in idx], pad), model_device(model))
        with ExitStack() as stack:
            acts = {k: stack.enter_context(capture_components(model, k, layers, detach=False, arch=arch))
                    for k in kinds}
            logits = _forward_with_grad_inputs(model, model_inputs(b), 1)[:, -1]
        rows = torch.arange(len(idx), device=logits.device)
        diff = at_least_float32(logits[rows, b["desired"]] - logits[rows, b["undesired"]])
        total = diff.sum() / len(records)
        margin += float(total.detach())
        flat = [(k, l) for k in kinds for l in layers]
        grads = torch.autograd.grad(total, [acts[k][l] for k, l in flat], allow_unused=True)
        for (k, l), g in zip(flat, grads):
            if g is None:
                continue
            a = at_least_float32(acts[k][l].detach()[:, -1])  # last position: (B, n, w)
            totals[k][l] += (a * at_least_float32(g[:, -1])).sum((0, 2)).double().cpu()
    meta = {"mean_logit_diff": margin, "records": len(records),
            "score": "activation x gradient of logit[desired] - logit[undesired] at the last position"}
    return _scores_dict(arch, totals), meta


__all__ = ["attribution_scan", "frozen_parameters", "TARGETS"]
