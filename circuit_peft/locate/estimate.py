"""The ablation estimate: a first-order estimate of the exact head ablation scan, one forward + one backward per batch.

On probe rows ``(prompt, solution)``: the estimated increase of the mean solution-token loss when a query head is
ablated (``uniform``/``zero``/``mean``, as in :func:`circuit_peft.locate.ablation.head_ablation_scan`) or an MLP
neuron is zeroed: ``sum_{rows, positions} (a_ablated - a) . dL/da``. Scores are in nats per solution token and
approximate the exact scan's. The locator ``ablation_estimate``; ``attribution_scan(target="ablation")`` runs it too.

``estimate="bound"`` scores each component instead by the Cauchy-Schwarz bound of its first-order term,
``sum_rows ||a_ablated - a|| ||dL/da||`` (norms over the row's positions and the component's width): how far its
ablation *could* move the loss to first order. It is large where the signed sum cancels across positions or where a
big change meets a sensitive loss, which is where the first-order estimate misses heads whose exact ablation matters
(:func:`~circuit_peft.locate.refine.refined_head_scan` uses it to add candidates).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_arch
from ..circuit import Circuit
from ..interventions import (
    ABLATION_METHODS, capture_components, edit_components, head_output_means, uniform_attention_output,
)
from ..taskdata.collate import model_inputs
from ..taskdata.examples import ProbeSpec
from ..taskdata.losses import at_least_float32, solution_loss_sums
from .ablation import probe_batches
from .firstorder import attribution_mode, forward_with_grad_inputs, scores_dict
from .registry import register_locator

ESTIMATES = ("first_order", "bound")
ESTIMATE_KINDS = ("q", "mlp")


def ablation_estimates(model: nn.Module, tokenizer: Any, data: Any, method: str, kinds: Iterable[str],
                       batch_size: int, spec: ProbeSpec, progress: bool = True,
                       ig_steps: int = 0) -> dict[str, Circuit]:
    """Both ablation-target estimates of every component in ``kinds`` from the same passes:
    ``{"first_order": ..., "bound": ...}`` (circuits of all scored components; nats per solution token;
    with ``ig_steps`` the first is integrated gradients and the bound is left out)."""
    if method not in ABLATION_METHODS:
        raise ValueError(f"unknown ablation method {method!r}; use one of {ABLATION_METHODS}")
    with attribution_mode(model):
        batches = probe_batches(model, tokenizer, data, batch_size, spec=spec)
        by_estimate, meta = _ablation_attribution(model, get_arch(model), batches, method, kinds, progress,
                                                  ig_steps)
    meta.update(target="ablation", kinds=list(kinds))
    return {name: Circuit.from_scores(model, scores, method="ablation_estimate", meta=dict(meta, estimate=name))
            for name, scores in by_estimate.items()}


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
        return {"first_order": scores_dict(arch, totals)}, meta
    meta["base_loss"] = clean_loss
    return {"first_order": scores_dict(arch, totals), "bound": scores_dict(arch, bounds)}, meta


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
        logits = forward_with_grad_inputs(model, model_inputs(batch), int(batch["n_keep"]))
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


def check_estimate(target: str, ig_steps: int, estimate: str) -> None:
    """``ig_steps`` (>= 0) and ``estimate="bound"`` (without ``ig_steps``) work with the ablation target only."""
    if ig_steps < 0 or (ig_steps and target != "ablation"):
        raise ValueError(f"ig_steps must be >= 0 and works with target='ablation' only (got {ig_steps}, {target!r})")
    if estimate not in ESTIMATES or (estimate == "bound" and (target != "ablation" or ig_steps)):
        raise ValueError(f"estimate must be one of {ESTIMATES}; 'bound' works with target='ablation' and "
                         f"ig_steps=0 only (got {estimate!r}, {target!r}, ig_steps={ig_steps})")


def ablation_estimate_scan(
    model: nn.Module,
    tokenizer: Any,
    probe: Any,
    method: str = "uniform",
    kinds: Iterable[str] | None = None,
    batch_size: int = 4,
    estimate: str = "first_order",
    ig_steps: int = 0,
    prompt_field: str = "prompt",
    solution_field: str = "solution",
    chat_template: bool | None = None,
    max_length: int | None = 1024,
    spec: ProbeSpec | None = None,
    progress: bool = True,
) -> Circuit:
    """Every query head's (``"q"``) and MLP neuron's (``"mlp"``) estimated solution-loss increase under ablation
    on ``probe`` rows, in nats per solution token: the first-order estimate (``estimate="first_order"``), its bound
    (``"bound"``), or integrated gradients over ``ig_steps`` points of the joint ablation path (module docstring).
    ``method``: the head ablation operator; the probe fields or ``spec`` say how rows become ids. A :class:`Circuit`
    of every scored component (``method="ablation_estimate"``)."""
    kinds = tuple(ESTIMATE_KINDS if kinds is None else kinds)
    bad = [k for k in kinds if k not in ESTIMATE_KINDS]
    if bad or not kinds:
        raise ValueError(f"target 'ablation' scores kinds {ESTIMATE_KINDS}; got {list(kinds)}")
    check_estimate("ablation", ig_steps, estimate)
    spec = ProbeSpec.resolve(spec, prompt_field=prompt_field, solution_field=solution_field,
                             chat_template=chat_template, max_length=max_length)
    return ablation_estimates(model, tokenizer, probe, method, kinds, batch_size, spec, progress, ig_steps)[estimate]


@register_locator("ablation_estimate", reads="probe", kinds=ESTIMATE_KINDS, heads=True,
                  summary="a first-order estimate of the ablation scan on probe rows, one backward pass (or its "
                          "bound, or integrated gradients with ig_steps)")
def locate_by_ablation_estimate(model: nn.Module, tokenizer: Any, task_data: Any, keep: Any, **options: Any) -> Circuit:
    """Locator ``ablation_estimate``: :func:`ablation_estimate_scan` (``options``: its settings), then ``keep``."""
    return ablation_estimate_scan(model, tokenizer, task_data, **options).keep(keep)


__all__ = ["ESTIMATES", "ESTIMATE_KINDS", "check_estimate", "ablation_estimate_scan", "ablation_estimates", "locate_by_ablation_estimate"]
