"""Desiderata-based Component Masking (DCM, CCA stage 2): learn which components push the desired token.

One mask value ``m`` per query head, key head, value head and MLP neuron of every layer. At the
last context position each component's output is scaled by ``2*m`` (so ``m = 0.5`` is the
unmodified model, ``m = 0`` ablates; ``m`` starts at 1 and is clamped to [0, 1]). The loss is

    -mean(logit[desired] - logit[undesired]) + lambda * sum |m|

(``objective="logsigmoid"`` uses the bounded ``-log sigmoid(margin)`` instead; our option).
Adam on ``m`` (lr 5e-3), StepLR (step 5 epochs, gamma 0.9), batch 8, up to 50 epochs; the run
stops early once the kept set (``m >= 0.5``) has changed and then stayed the same for ``patience``
epochs (our reading of "stop when the kept count stops changing"). Our step schedule
(``steps=N``) replaces the epochs by a budget of N steps with a cosine lr, for small record sets.
:func:`circuit_margin` measures a circuit on (held-out) records. The model's weights are never changed.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Component, get_arch
from ..circuit import Circuit
from .registry import register_locator
from ..interventions import scale_components
from .firstorder import frozen_parameters
from ..batching import model_device, pad_token_id, to_device
from ..prefix import prefix_kv_cache, repeat_cache, sharable_prefix_ids
from ..taskdata.collate import model_inputs
from ..taskdata.losses import last_logits, logit_margins, margin_loss
from ..taskdata.records import collate_records, validate_records

DCM_KINDS: tuple[str, ...] = ("q", "k", "v", "mlp")
OBJECTIVES = ("logit_diff", "logsigmoid")


class NaNLossError(FloatingPointError, ValueError):
    """The DCM loss became NaN or infinite; the message names the epoch, step and batch."""


def learn_masks(
    model: nn.Module,
    records: Any,
    lambda_l1: float = 0.01,
    lr: float = 5e-3,
    step_size: int = 5,
    gamma: float = 0.9,
    batch_size: int = 8,
    epochs: int = 50,
    patience: int = 5,
    kinds: Iterable[str] = DCM_KINDS,
    objective: str = "logit_diff",
    seed: int = 0,
    pad_id: int | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    steps: int | None = None,
    check_every: int = 10,
    share_prompt_prefix: bool = True,
    min_shared_prefix: int = 16,
) -> Circuit:
    """Learn DCM masks on contrastive records and return the kept components (``m >= 0.5``).

    Two schedules. The paper's (``steps=None``): up to ``epochs`` passes over the records, StepLR
    every ``step_size`` epochs, a check per epoch. With few records an epoch is one or two steps, so
    Adam (which moves a mask by about ``lr`` per step) cannot take a mask from 1 below 0.5 in the
    budget. The step schedule (``steps=N``): exactly N optimiser steps (records reshuffled on every
    pass), cosine decay of ``lr`` to 0 over the N steps (``step_size``/``gamma`` unused), a check
    every ``check_every`` steps; with ``lr`` ~0.05 an unneeded mask falls below 0.5 in ~10 steps.

    Args:
        records: ``{"context_ids": list[int], "desired_id": int, "undesired_id": int,
            "problem_id": str}`` rows (list or ``datasets.Dataset``).
        lambda_l1: weight of the L1 penalty ``sum |m|`` over all masked components.
        lr / step_size / gamma: Adam learning rate and StepLR schedule (step in epochs).
        batch_size / epochs: records per step, maximum epochs (paper schedule).
        patience: checks without a change of the kept set that stop the run, counted once it first
            changed; 0 disables early stopping.
        kinds: which kinds get masks (default q, k, v heads and MLP neurons).
        objective: ``"logit_diff"`` (the paper's) or ``"logsigmoid"`` (bounded variant).
        seed: seeds the record shuffling; on CPU the run is deterministic.
        pad_id: padding id (default: the tokenizer's or model config's pad/eos id).
        steps / check_every: the step schedule (see above).
        share_prompt_prefix / min_shared_prefix: run the prompt prefix every record starts with (system
            message, few-shot examples; at least ``min_shared_prefix`` tokens) once, and continue each batch
            from its KV cache. Exact (the masks act only at the last position, after it; the same masks up to
            float rounding) and ~context/rest times less work per step.

    Returns:
        a :class:`Circuit` keeping components with ``m >= 0.5``; ``scores`` holds every final
        ``m``; ``meta["history"]`` has per-check loss, margin, kept count and lr.

    Raises:
        ValueError: bad records (equal desired/undesired, ids outside the vocabulary, empty data).
        NaNLossError: the loss became non-finite (names the epoch, step and batch's problem ids).
    """
    kinds = tuple(kinds)
    _check_settings(objective, batch_size, epochs, lr, lambda_l1, kinds)
    if steps is not None and (steps < 1 or check_every < 1):
        raise ValueError(f"steps and check_every must be >= 1 (got {steps}, {check_every})")
    arch = get_arch(model)
    rows = validate_records(records, arch.dims.vocab_size, model=model)
    pad = pad_token_id(model, tokenizer) if pad_id is None else int(pad_id)
    masks = {k: nn.Parameter(torch.ones(arch.dims.n_layers, arch.num_components(k), device=model_device(model)))
             for k in kinds}
    optimizer = torch.optim.Adam(list(masks.values()), lr=lr)
    per_epoch = math.ceil(len(rows) / batch_size)
    if steps is None:
        total, per_check = epochs * per_epoch, per_epoch
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    else:
        total, per_check = steps, check_every
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    was_training = model.training
    model.eval()
    try:
        prefix = _PromptPrefix(model, rows, share_prompt_prefix, min_shared_prefix)
        run = _MaskRun(model, arch, masks, optimizer, objective, lambda_l1,
                       _PatienceStop(patience, _kept_set(masks)), prefix)
        with frozen_parameters(model):
            run.train(_record_batches(rows, batch_size, seed, pad, prefix.length), total, per_check,
                      scheduler, step_scheduler=steps is not None, progress=progress)
    finally:
        model.train(was_training)
    settings = {"lambda_l1": lambda_l1, "lr": lr, "step_size": step_size, "gamma": gamma, "batch_size": batch_size,
                "epochs": epochs, "patience": patience, "kinds": list(kinds), "objective": objective, "seed": seed,
                "steps": steps, "check_every": check_every, "schedule": "paper" if steps is None else "steps",
                "shared_prefix": prefix.length}
    meta = {"score": "mask value m (kept: m >= 0.5)", "settings": settings, "records": len(rows), "steps": run.step,
            "epochs_run": math.ceil(run.step / per_epoch), "checks": len(run.history),
            "stopped_early": run.stop.stopped, "history": run.history}
    return _mask_circuit(masks, arch, meta)


class _PromptPrefix:
    """The prompt prefix every record starts with, run once without grad (the masks act only at the last
    position, after it) and its KV cache repeated for each batch; length 0 when not shared (also when sharing
    is inexact for ``model`` in its current mode, e.g. a dropout acting: :func:`~circuit_peft.prefix.sharing_is_exact`)."""

    def __init__(self, model: nn.Module, rows: list[dict[str, Any]], share: bool, min_length: int):
        ids = sharable_prefix_ids(model, [r["context_ids"] for r in rows], min_length) if share else []
        self.length, self.cache = len(ids), None
        if ids:
            with torch.no_grad():
                self.cache = prefix_kv_cache(model, torch.tensor([ids], device=model_device(model)))

    def inputs(self, rows: int) -> dict[str, Any]:
        """``past_key_values`` for a batch of ``rows`` rows continuing the prefix (a copy), or ``{}``."""
        return {} if self.cache is None else {"past_key_values": repeat_cache(self.cache, rows)}


def _record_batches(rows: list[dict[str, Any]], batch_size: int, seed: int, pad: int, prefix_length: int = 0):
    """Endless (epoch, batch index, record indices, their problem ids, collated batch), reshuffled every
    epoch; each batch holds the records after their first ``prefix_length`` ids."""
    generator = torch.Generator().manual_seed(seed)
    for epoch in itertools.count():
        order = torch.randperm(len(rows), generator=generator).tolist()
        for bi, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start : start + batch_size]
            batch = collate_records([rows[i] for i in idx], pad, prefix_length)
            yield epoch, bi, idx, [rows[i]["problem_id"] for i in idx], batch


class _MaskRun:
    """The optimisation loop of :func:`learn_masks`: steps, checks (history, early stop), NaN errors."""

    def __init__(self, model, arch, masks, optimizer, objective, lambda_l1, stop: "_PatienceStop",
                 prefix: _PromptPrefix):
        self.model, self.arch, self.masks, self.optimizer = model, arch, masks, optimizer
        self.objective, self.lambda_l1, self.stop, self.prefix = objective, lambda_l1, stop, prefix
        self.step, self.history = 0, []

    def train(self, batches, total: int, per_check: int, scheduler, step_scheduler: bool, progress: bool) -> None:
        """Run up to ``total`` steps; every ``per_check`` steps record a check and maybe stop."""
        losses, margins = [], []
        bar = tqdm(total=total, desc="DCM", disable=not progress)
        for epoch, bi, idx, problem_ids, batch in batches:
            loss, margin = _mask_loss(self.model, self.arch, self.masks, batch, self.objective, self.lambda_l1,
                                      self.prefix)
            if not torch.isfinite(loss):
                raise NaNLossError(
                    f"DCM loss is {float(loss.detach())} at epoch {epoch}, step {self.step} (batch {bi} of the epoch, "
                    f"records {idx}, problem ids {problem_ids}); check those records "
                    "and the model (a lower lr or the 'logsigmoid' objective may help)")
            _mask_step(self.optimizer, self.masks, loss)
            self.step += 1
            bar.update(1)
            losses.append(float(loss.detach()))
            margins.append(margin)
            if step_scheduler:
                scheduler.step()
            if self.step % per_check == 0 or self.step == total:
                if not step_scheduler:
                    scheduler.step()
                if self._check(epoch, losses, margins, bar) or self.step == total:
                    break
                losses, margins = [], []
        bar.close()

    def _check(self, epoch: int, losses: list[float], margins: list[float], bar) -> bool:
        kept = _kept_set(self.masks)
        self.history.append({"epoch": epoch, "step": self.step, "loss": sum(losses) / len(losses),
                             "margin": sum(margins) / len(margins), "kept": len(kept),
                             "lr": self.optimizer.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{self.history[-1]['loss']:.3f}", kept=len(kept))
        return self.stop.update(kept)


@torch.no_grad()
def circuit_margin(
    model: nn.Module, records: Any, circuit: Circuit | None = None, kinds: Iterable[str] = DCM_KINDS,
    batch_size: int = 8, pad_id: int | None = None, tokenizer: Any = None, share_prompt_prefix: bool = True,
    min_shared_prefix: int = 16,
) -> float:
    """Mean logit difference ``logit[desired] - logit[undesired]`` at each record's last position.

    With ``circuit``, every component of ``kinds`` that the circuit does not keep is zero-ablated at
    the last position (the kept ones run unmodified). Faithfulness is ``(circuit - empty) / (full -
    empty)`` of these margins (empty: a circuit keeping nothing), a share only when full > empty.
    The records' shared prompt prefix runs once when exact for the model as it is (see :func:`learn_masks`).
    """
    arch = get_arch(model)
    rows = validate_records(records, arch.dims.vocab_size, model=model)
    pad = pad_token_id(model, tokenizer) if pad_id is None else int(pad_id)
    device = model_device(model)
    scales: dict[str, torch.Tensor] = {}  # none: the unmodified model
    if circuit is not None:
        scales = {k: torch.zeros(arch.dims.n_layers, arch.num_components(k), device=device) for k in kinds}
        for c in circuit.components:
            if c.kind in scales:
                scales[c.kind][c.layer, c.index] = 1.0
    prefix, total = _PromptPrefix(model, rows, share_prompt_prefix, min_shared_prefix), 0.0
    for start in range(0, len(rows), batch_size):
        batch = to_device(collate_records(rows[start : start + batch_size], pad, prefix.length), device)
        total += float(_last_position_margins(model, arch, batch, scales, prefix).sum())
    return total / len(rows)


def _last_position_margins(model: nn.Module, arch, batch: dict[str, torch.Tensor],
                           scales: dict[str, torch.Tensor], prefix: _PromptPrefix | None = None) -> torch.Tensor:
    """(B,) ``logit[desired] - logit[undesired]`` at each row's last position, with components scaled
    there by ``scales`` (kind -> (n_layers, n) factors; empty: unmodified); ``batch`` continues ``prefix``'s
    cache when one is given."""
    n = batch["desired"].shape[0]
    last = torch.full((n,), -1, dtype=torch.long, device=batch["desired"].device)
    with scale_components(model, scales, positions=last, arch=arch):
        logits = last_logits(model, model_inputs(batch), 1, **(prefix.inputs(n) if prefix else {}))[:, -1].float()
    return logit_margins(logits, batch["desired"], batch["undesired"])


def _check_settings(objective: str, batch_size: int, epochs: int, lr: float, lambda_l1: float,
                    kinds: tuple[str, ...]) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1 (got {batch_size}, {epochs})")
    if lr <= 0 or lambda_l1 < 0:
        raise ValueError(f"lr must be > 0 and lambda_l1 >= 0 (got {lr}, {lambda_l1})")
    for k in kinds:
        if k not in DCM_KINDS:
            raise ValueError(f"DCM masks kinds {DCM_KINDS}; got {k!r}")


def _kept_set(masks: dict[str, torch.Tensor]) -> frozenset[tuple[str, int, int]]:
    """The kept components ``(kind, layer, index)`` (``m >= 0.5``)."""
    return frozenset((k, int(l), int(i)) for k, m in masks.items() for l, i in (m.detach() >= 0.5).nonzero().tolist())


def _mask_loss(model: nn.Module, arch, masks: dict[str, nn.Parameter], batch: dict[str, torch.Tensor],
               objective: str, lambda_l1: float, prefix: _PromptPrefix | None = None) -> tuple[torch.Tensor, float]:
    """The DCM loss of one collated batch (task term at the last position + ``lambda_l1 * sum |m|``) and
    the batch's mean logit margin (desired - undesired)."""
    batch = to_device(batch, model_device(model))
    margin = _last_position_margins(model, arch, batch, {k: 2 * m for k, m in masks.items()}, prefix)
    task = margin_loss(margin, objective).mean()
    penalty = sum(m.abs().sum() for m in masks.values())
    return task + lambda_l1 * penalty, float(margin.detach().mean())


def _mask_step(optimizer: torch.optim.Optimizer, masks: dict[str, nn.Parameter], loss: torch.Tensor) -> None:
    """One optimiser step on the masks, then clamp them to [0, 1]."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for m in masks.values():
            m.clamp_(0.0, 1.0)


class _PatienceStop:
    """Early stop: ``patience`` checks without a change of the kept set, counted once it first changed
    (0 disables)."""

    def __init__(self, patience: int, kept: frozenset):
        self.patience, self.last, self.changed_once, self.still, self.stopped = patience, kept, False, 0, False

    def update(self, kept: frozenset) -> bool:
        """Record a check's kept set; True when the run should stop."""
        if kept != self.last:
            self.changed_once, self.still = True, 0
        else:
            self.still += 1
        self.last = kept
        self.stopped = bool(self.patience and self.changed_once and self.still >= self.patience)
        return self.stopped


def _mask_circuit(masks: dict[str, torch.Tensor], arch, meta: dict[str, Any]) -> Circuit:
    """The components with ``m >= 0.5``; ``scores`` holds every final ``m``."""
    scores = {Component(k, l, i): float(v) for k, m in masks.items()
              for l in range(m.shape[0]) for i, v in enumerate(m.detach()[l].tolist())}
    kept = [c for c, v in scores.items() if v >= 0.5]
    return Circuit(kept, scores, arch.fingerprint(), method="dcm", meta=meta)


@register_locator("dcm", reads="records", kinds=DCM_KINDS, own_keep=True,
                  summary="DCM: a mask per component learned on contrastive records (logit difference + L1); "
                          "keeps m >= 0.5 unless keep says otherwise (the CCA paper's stage 2)")
def locate_by_dcm(model: nn.Module, tokenizer: Any, task_data: Any, keep: Any, **options: Any) -> Circuit:
    """Locator ``dcm``: :func:`learn_masks` (``options``: its settings); ``keep`` None keeps ``m >= 0.5``,
    else ranks the final mask values by it."""
    return learn_masks(model, task_data, tokenizer=tokenizer, **options).keep(keep)
