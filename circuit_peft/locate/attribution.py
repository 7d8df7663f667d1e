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

``estimate="bound"`` (ablation target) scores each component instead by the Cauchy-Schwarz bound of its
first-order term, ``sum_rows ||a_ablated - a|| ||dL/da||`` (norms over the row's positions and the
component's width): how far its ablation *could* move the loss to first order. It is large where the signed
sum cancels across positions or where a big change meets a sensitive loss, which is where the first-order
estimate misses heads whose exact ablation matters (:func:`~circuit_peft.locate.refine.refined_head_scan`
uses it to add candidates).
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
from .registry import register_locator
from ..interventions import (
    ABLATION_METHODS, capture_components, edit_components, head_output_means, uniform_attention_output,
)
from .ablation import DEFAULT_KEEP_FRACTION, probe_batches
from ..taskdata.collate import model_inputs
from ..taskdata.examples import ProbeSpec
from ..taskdata.losses import at_least_float32, last_logits, logit_margins, solution_loss_sums
from ..taskdata.records import collate_records, validate_records

TARGETS = ("ablation", "logit_diff")
ESTIMATES = ("first_order", "bound")
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
    ig_steps: int = 0,
    estimate: str = "first_order",
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
            (``"ablation"``), or all four at once as ``spec`` (a :class:`~circuit_peft.taskdata.examples.ProbeSpec`).
        ig_steps: ``"ablation"`` only. 0 (default): first-order scores at the clean model. ``m > 0``:
            integrated gradients: every scored component is moved part of the way to its ablation at once,
            ``alpha = (i + 1/2) / m`` for ``i < m`` (m forwards + backwards per batch), and
            ``(a' - a) . dL/dy`` is averaged over the path; the scores then sum to the loss increase of
            ablating all of them together (exactly as ``m`` grows) and see effects a first-order score
            misses where the loss is flat at the clean model.
        estimate: ``"first_order"`` (default) or, ablation target without ``ig_steps``, ``"bound"``:
            ``sum_rows ||a' - a|| ||dL/da||``, an upper bound of the first-order term's size (module docstring).

    Returns:
        a :class:`Circuit` with every scored component's estimate in ``scores``.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown attribution target {target!r}; use one of {TARGETS}")
    kinds = tuple(_DEFAULT_KINDS[target] if kinds is None else kinds)
    allowed = ("q", "mlp") if target == "ablation" else ("q", "k", "v", "mlp")
    bad = [k for k in kinds if k not in allowed]
    if bad or not kinds:
        raise ValueError(f"target {target!r} scores kinds {allowed}; got {list(kinds)}")
    if ig_steps < 0 or (ig_steps and target != "ablation"):
        raise ValueError(f"ig_steps must be >= 0 and works with target='ablation' only (got {ig_steps}, {target!r})")
    if estimate not in ESTIMATES or (estimate == "bound" and (target != "ablation" or ig_steps)):
        raise ValueError(f"estimate must be one of {ESTIMATES}; 'bound' works with target='ablation' and "
                         f"ig_steps=0 only (got {estimate!r}, {target!r}, ig_steps={ig_steps})")
    if target == "ablation":
        spec = ProbeSpec.resolve(spec, prompt_field=prompt_field, solution_field=solution_field,
                                 chat_template=chat_template, max_length=max_length)
        circuit = ablation_estimates(model, tokenizer, data, method, kinds, batch_size, spec, progress,
                                     ig_steps)[estimate]
    else:
        with _attribution_mode(model):
            scores, meta = _logit_diff_attribution(model, get_arch(model), tokenizer, data, kinds, batch_size,
                                                   progress)
        meta.update(target=target, kinds=list(kinds))
        circuit = Circuit.from_scores(model, scores, method="attribution", meta=meta)
    if keep_fraction is None:
        return circuit
    return circuit.top_each_kind(keep_fraction)


def ablation_estimates(model: nn.Module, tokenizer: Any, data: Any, method: str, kinds: Iterable[str],
                       batch_size: int, spec: ProbeSpec, progress: bool = True,
                       ig_steps: int = 0) -> dict[str, Circuit]:
    """Both ablation-target estimates of every component in ``kinds`` from the same passes:
    ``{"first_order": ..., "bound": ...}`` (circuits of all scored components; nats per solution token;
    with ``ig_steps`` the first is integrated gradients and the bound is left out)."""
    if method not in ABLATION_METHODS:
        raise ValueError(f"unknown ablation method {method!r}; use one of {ABLATION_METHODS}")
    with _attribution_mode(model):
        batches = probe_batches(model, tokenizer, data, batch_size, spec=spec)
        by_estimate, meta = _ablation_attribution(model, get_arch(model), batches, method, kinds, progress,
                                                  ig_steps)
    meta.update(target="ablation", kinds=list(kinds))
    return {name: Circuit.from_scores(model, scores, method="ablation_estimate", meta=dict(meta, estimate=name))
            for name, scores in by_estimate.items()}


@contextmanager
def _attribution_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, parameters frozen, gradients on (the previous mode restored on exit)."""
    was_training = model.training
    model.eval()
    try:
        with frozen_parameters(model), torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def _scores_dict(arch: ModelArch, totals: dict[str, torch.Tensor]) -> dict[Component, float]:
    return {Component(kind, l, i): float(v) for kind, t in totals.items()
            for l in range(t.shape[0]) for i, v in enumerate(t[l].tolist())}


def _ablation_attribution(model, arch, batches, method, kinds, progress, ig_steps=0):
    n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    means = None
    if method == "mean" and "q" in kinds:
        with torch.no_grad():
            means = head_output_means(model, [model_inputs(b) for b in batches], arch)
    alphas = [0.0] if ig_steps == 0 else [(i + 0.5) / ig_steps for i in range(ig_steps)]
    totals = {k: torch.zeros(arch.dims.n_layers, arch.num_components(k), dtype=torch.float64) for k in kinds}
    bounds = {k: torch.zeros_like(t) for k, t in totals.items()}  # read only without ig_steps (alpha 0)
    clean_loss = 0.0  # read only without ig_steps, where the one alpha is 0
    for b in tqdm(batches, desc="attribution (ablation)", disable=not progress):
        for alpha in alphas:
            loss, terms, bound_terms = _partly_ablated_terms(model, arch, b, method, kinds, means, alpha, n_tokens)
            clean_loss += loss
            for (k, l), t in terms.items():
                totals[k][l] += t / len(alphas)
                bounds[k][l] += bound_terms[k, l]
    meta = {"ablation": method, "solution_tokens": n_tokens,
            "score": "estimated loss increase (nats per solution token)"}
    if ig_steps:
        meta.update(ig_steps=ig_steps, score="integrated gradients along the joint ablation path "
                    "(nats per solution token; the scores sum to the loss increase of ablating them all)")
        return {"first_order": _scores_dict(arch, totals)}, meta
    meta["base_loss"] = clean_loss
    return {"first_order": _scores_dict(arch, totals), "bound": _scores_dict(arch, bounds)}, meta


def _partly_ablated_terms(model, arch, batch, method, kinds, means, alpha, n_tokens):
    """One forward + backward with every scored component moved ``alpha`` of the way to its ablation
    (``y = a + alpha (a' - a)``, ``a'`` computed from the same forward); returns the loss and, per
    (kind, layer), ``sum_{rows, positions} (a' - a) . dL/dy`` and the bound ``sum_rows ||a' - a|| ||dL/dy||``
    as CPU float64 vectors over components. At ``alpha = 0`` the first is first-order attribution; averaged
    over ``alpha`` it is integrated gradients."""
    layers = range(arch.dims.n_layers)
    outputs, deltas = {}, {}
    with ExitStack() as stack:
        for k in kinds:
            for l in layers:
                replacement = _replacement(stack, model, arch, k, l, method, means, batch["attention_mask"])

                def move(block, k=k, l=l, replacement=replacement):
                    delta = replacement(block) - at_least_float32(block)  # float32 at least, as the scores
                    deltas[k, l] = delta.detach()
                    outputs[k, l] = block + (alpha * delta).to(block.dtype) if alpha else block.view_as(block)
                    return outputs[k, l]

                stack.enter_context(edit_components(model, "o" if k == "q" else "mlp", l, move, arch))
        logits = _forward_with_grad_inputs(model, model_inputs(batch), int(batch["n_keep"]))
    loss = solution_loss_sums(logits, batch["labels"])[0] / n_tokens
    keys = list(outputs)
    grads = torch.autograd.grad(loss, [outputs[key] for key in keys], allow_unused=True)
    real = batch["attention_mask"][:, :, None, None]
    terms, bounds = {}, {}
    for key, g in zip(keys, grads):
        if g is None:
            continue
        g, delta = at_least_float32(g) * real, deltas[key] * real  # (rows, positions, components, width)
        terms[key] = (delta * g).sum((0, 1, 3)).double().cpu()
        bounds[key] = (g.square().sum((1, 3)) * delta.square().sum((1, 3))).sqrt().sum(0).double().cpu()
    return float(loss.detach()), terms, bounds


def _replacement(stack, model, arch, kind, layer, method, means, attention_mask):
    """``block -> its ablated value`` (float32 at least) at ``layer``: neurons 0; query heads by ``method``
    (``uniform``: the mean of the head's V over positions <= i, read from the same forward)."""
    if kind == "mlp" or method == "zero":
        return lambda block: torch.zeros_like(at_least_float32(block))
    if method == "mean":
        return lambda block: at_least_float32(means[layer])[None, None].expand(block.shape)
    values = stack.enter_context(capture_components(model, "v", [layer], detach=False, arch=arch))
    return lambda block: uniform_attention_output(at_least_float32(values[layer]), attention_mask).repeat_interleave(
        arch.dims.group_size, dim=2)


def _logit_diff_attribution(model, arch, tokenizer, data, kinds, batch_size, progress):
    records = validate_records(data, arch.dims.vocab_size, model=model)
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
        diff = at_least_float32(logit_margins(logits, b["desired"], b["undesired"]))
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


@register_locator("attribution", reads="records", kinds=_DEFAULT_KINDS["logit_diff"],
                  summary="attribution of the logit difference desired - undesired on contrastive records "
                          "(activation x gradient at the last context position; CCA stage 2)")
def locate_by_attribution(model: nn.Module, tokenizer: Any, task_data: Any, keep: Any, **options: Any) -> Circuit:
    """Locator ``attribution``: :func:`attribution_scan` with ``target="logit_diff"``, then ``keep``."""
    return attribution_scan(model, tokenizer, task_data, target="logit_diff", keep_fraction=None, **options).keep(keep)


@register_locator("ablation_estimate", reads="probe", kinds=_DEFAULT_KINDS["ablation"], heads=True,
                  summary="a first-order estimate of the ablation scan on probe rows, one backward pass (or its "
                          "bound, or integrated gradients with ig_steps)")
def locate_by_ablation_estimate(model: nn.Module, tokenizer: Any, task_data: Any, keep: Any, **options: Any) -> Circuit:
    """Locator ``ablation_estimate``: :func:`attribution_scan` with ``target="ablation"``, then ``keep``."""
    return attribution_scan(model, tokenizer, task_data, target="ablation", keep_fraction=None, **options).keep(keep)


__all__ = ["attribution_scan", "frozen_parameters", "locate_by_ablation_estimate", "locate_by_attribution", "TARGETS"]
