"""The losses of task data, each written once: the pivotal-weighted causal-LM loss, the per-row mean answer
loss, the solution loss of probe batches and the contrastive margin of records.

Pivotal-weighted loss per batch (``w`` = token weight, ``u`` = undesired id at a pivotal position, ``N`` =
number of label tokens, as in TRL/Transformers)::

    L = [ sum_t w_t * -log p(y_t)  +  unlikelihood_weight * sum_{t: u_t set} -log(1 - p(u_t)) ] / N

With all weights 1 and no unlikelihood term this equals a trainer's own token-mean cross-entropy.

Contrastive margin of a record: ``logit[desired] - logit[undesired]`` at its last context position (DCM,
logit-difference attribution, the CCA update and the pivotal metrics all read it from :func:`logit_margins`), and
its losses (the CCA update's, DCM's task term) come from :func:`margin_loss`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..batching import accepts_logits_to_keep

IGNORE_INDEX = -100


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in its own dtype when that is wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logit_margins(logits: torch.Tensor, desired: torch.Tensor, undesired: torch.Tensor) -> torch.Tensor:
    """The contrastive margin ``logits[b, desired[b]] - logits[b, undesired[b]]`` (B,) of last-position
    ``logits`` (B, V), in the logits' dtype."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, desired] - logits[rows, undesired]


MARGIN_LOSSES: tuple[str, ...] = ("logit_diff", "logsigmoid", "capped")


def margin_loss(margin: torch.Tensor, loss: str, margin_cap: float = 5.0) -> torch.Tensor:
    """Per-record loss (B,) from margins ``z_desired - z_undesired`` (B,): ``"logit_diff"`` ``-margin`` (the CCA
    paper's, unbounded), ``"logsigmoid"`` ``-log sigmoid(margin)``, ``"capped"`` ``-min(margin, margin_cap)``
    (bounded variants, our choice). The CCA update and DCM's task term both take it."""
    if loss == "logit_diff":
        return -margin
    if loss == "logsigmoid":
        return -torch.nn.functional.logsigmoid(margin)
    if loss == "capped":
        return -margin.clamp(max=margin_cap)
    raise ValueError(f"loss must be one of {MARGIN_LOSSES}, got {loss!r}")


def last_logits(model: Any, inputs: dict[str, torch.Tensor], keep: int, **kwargs: Any) -> torch.Tensor:
    """Logits (B, keep, V) of the last ``keep`` positions (the LM head runs only there when the
    model supports ``logits_to_keep``)."""
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = int(keep)
    kwargs.setdefault("use_cache", kwargs.get("past_key_values") is not None)
    logits = model(**inputs, **kwargs).logits
    return logits[:, -int(keep):]


def solution_loss_sums(logits: torch.Tensor, labels: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Summed cross-entropy over solution tokens, per group of rows: (groups,).

    ``logits`` (groups*B, K, V) are the last K positions; ``labels`` (B, T) from
    :func:`~circuit_peft.taskdata.collate.collate_probe` (the same for every group). One group at a time: the
    (n_valid, V) log-softmax of a group stays small (all groups at once is several times slower per element on
    a CPU).
    """
    K = logits.shape[1]
    lab = labels[:, -K:].to(logits.device)
    valid = lab != IGNORE_INDEX
    target = lab[valid]
    by_group = logits.view(groups, lab.shape[0], K, -1)
    return torch.stack([F.cross_entropy(at_least_float32(g[valid]), target, reduction="sum") for g in by_group])


def mean_label_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per labelled token) of each row: (B,). ``logits`` (B, T, V) and
    ``labels`` (B, T) are aligned with ``input_ids`` (shifted here); -100 marks a token without loss."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (target != IGNORE_INDEX).float()
    return (nll * valid).sum(1) / valid.sum(1).clamp_min(1)


def pivotal_weighted_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    undesired_ids: torch.Tensor | None = None,
    unlikelihood_weight: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted causal-LM loss (see the module docstring). Shapes: ``logits (B, T, V)``,
    ``labels``/``token_weights``/``undesired_ids`` ``(B, T)`` aligned with ``input_ids`` (shifted here).

    Normalised by ``num_items_in_batch`` (label tokens across the accumulated batch) or, if None,
    by this batch's label tokens.
    """
    und = undesired_ids[:, 1:] if undesired_ids is not None else None
    return aligned_weighted_loss(logits[:, :-1], labels[:, 1:], token_weights[:, 1:], und, unlikelihood_weight,
                                 num_items_in_batch)


def aligned_weighted_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    undesired_ids: torch.Tensor | None = None,
    unlikelihood_weight: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`pivotal_weighted_loss` on already-aligned tensors: ``logits[:, t]`` predicts ``labels[:, t]``
    (shapes ``(B, K, V)`` and ``(B, K)``; ``K`` may be a subset of positions)."""
    logits = logits.float()
    weights = token_weights.to(logits.dtype)
    valid = labels != IGNORE_INDEX
    nll = F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~valid, 0), reduction="none")
    total = (nll * weights * valid).sum()
    if undesired_ids is not None and unlikelihood_weight > 0:
        und = undesired_ids
        has = (und != IGNORE_INDEX) & valid
        if has.any():
            logp_u = torch.log_softmax(logits[has], dim=-1).gather(-1, und[has].unsqueeze(-1)).squeeze(-1)
            # -log(1 - p) computed stably from log p
            total = total + unlikelihood_weight * (-torch.log1p(-logp_u.exp().clamp(max=1 - 1e-6))).sum()
    denom = valid.sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(denom, device=total.device).clamp(min=1)


__all__ = ["IGNORE_INDEX", "MARGIN_LOSSES", "aligned_weighted_loss", "at_least_float32", "last_logits", "logit_margins",
           "margin_loss", "mean_label_losses", "pivotal_weighted_loss", "solution_loss_sums"]
