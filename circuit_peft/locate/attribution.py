"""Attribution: the logit difference on contrastive records, one forward + one backward per batch.

Gradient x activation of the logit difference ``logit[desired] - logit[undesired]`` at the last context position
(where DCM acts), summed over the component's width and averaged over records, for query/key/value heads and MLP
neurons: the first-order drop of the logit difference if the component were zeroed there. Higher scores mean more
important. This is the locator ``attribution`` (CCA stage 2).

:func:`attribution_scan` also takes ``target="ablation"`` on probe rows: the first-order estimate of the ablation
scan, the locator ``ablation_estimate`` (:mod:`circuit_peft.locate.estimate`).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_arch
from ..batching import length_batches, model_device, pad_token_id, to_device
from ..circuit import Circuit
from ..interventions import capture_components
from ..taskdata.collate import model_inputs
from ..taskdata.examples import ProbeSpec
from ..taskdata.losses import at_least_float32, logit_margins
from ..taskdata.records import collate_records, validate_records
from .ablation import DEFAULT_KEEP_FRACTION
from .estimate import ESTIMATE_KINDS, ablation_estimate_scan, check_estimate
from .firstorder import attribution_mode, forward_with_grad_inputs, frozen_parameters, scores_dict
from .registry import register_locator

TARGETS = ("ablation", "logit_diff")
_DEFAULT_KINDS = {"ablation": ESTIMATE_KINDS, "logit_diff": ("q", "k", "v", "mlp")}


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
    if target == "ablation":
        circuit = ablation_estimate_scan(model, tokenizer, data, method, kinds, batch_size, estimate, ig_steps,
                                         prompt_field, solution_field, chat_template, max_length, spec, progress)
    else:
        kinds = tuple(_DEFAULT_KINDS[target] if kinds is None else kinds)
        allowed = _DEFAULT_KINDS["logit_diff"]
        if [k for k in kinds if k not in allowed] or not kinds:
            raise ValueError(f"target {target!r} scores kinds {allowed}; got {list(kinds)}")
        check_estimate(target, ig_steps, estimate)
        with attribution_mode(model):
            scores, meta = _logit_diff_attribution(model, get_arch(model), tokenizer, data, kinds, batch_size,
                                                   progress)
        meta.update(target=target, kinds=list(kinds))
        circuit = Circuit.from_scores(model, scores, method="attribution", meta=meta)
    if keep_fraction is None:
        return circuit
    return circuit.top_each_kind(keep_fraction)


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
            logits = forward_with_grad_inputs(model, model_inputs(b), 1)[:, -1]
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
    return scores_dict(arch, totals), meta


@register_locator("attribution", reads="records", kinds=_DEFAULT_KINDS["logit_diff"],
                  summary="attribution of the logit difference desired - undesired on contrastive records "
                          "(activation x gradient at the last context position; CCA stage 2)")
def locate_by_attribution(model: nn.Module, tokenizer: Any, task_data: Any, keep: Any, **options: Any) -> Circuit:
    """Locator ``attribution``: :func:`attribution_scan` with ``target="logit_diff"``, then ``keep``."""
    return attribution_scan(model, tokenizer, task_data, target="logit_diff", keep_fraction=None, **options).keep(keep)


__all__ = ["TARGETS", "attribution_scan", "frozen_parameters", "locate_by_attribution"]
