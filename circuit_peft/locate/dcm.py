"""Desiderata-based Component Masking (DCM, CCA stage 2): learn which components push the desired token.

One mask value ``m`` per query head, key head, value head and MLP neuron of every layer. At the
last context position each component's output is scaled by ``2*m`` (so ``m = 0.5`` is the
unmodified model, ``m = 0`` ablates; ``m`` starts at 1 and is clamped to [0, 1]). The loss is

    -mean(logit[desired] - logit[undesired]) + lambda * sum |m|

(``objective="logsigmoid"`` uses the bounded ``-log sigmoid(margin)`` instead; our option).
Adam on ``m`` (lr 5e-3), StepLR (step 5 epochs, gamma 0.9), batch 8, up to 50 epochs; the run
stops early once the number of kept components (``m >= 0.5``) has changed and then stayed the
same for ``patience`` epochs (our reading of "stop when the kept count stops changing").
The model's weights are never changed.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Component, get_arch
from ..circuit import Circuit
from ..interventions import scale_components
from .attribution import frozen_parameters
from ..batching import model_device, pad_token_id, to_device
from .data import collate_records, last_logits, model_inputs, validate_records

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
) -> Circuit:
    """Learn DCM masks on contrastive records and return the kept components (``m >= 0.5``).

    Args:
        records: ``{"context_ids": list[int], "desired_id": int, "undesired_id": int,
            "problem_id": str}`` rows (list or ``datasets.Dataset``).
        lambda_l1: weight of the L1 penalty ``sum |m|`` over all masked components.
        lr / step_size / gamma: Adam learning rate and StepLR schedule (step in epochs).
        batch_size / epochs: records per step, maximum epochs.
        patience: epochs without a change of the kept count (after it first changed) that stop
            the run; 0 disables early stopping.
        kinds: which kinds get masks (default q, k, v heads and MLP neurons).
        objective: ``"logit_diff"`` (the paper's) or ``"logsigmoid"`` (bounded variant).
        seed: seeds the record shuffling; on CPU the run is deterministic.
        pad_id: padding id (default: the tokenizer's or model config's pad/eos id).

    Returns:
        a :class:`Circuit` keeping components with ``m >= 0.5``; ``scores`` holds every final
        ``m``; ``meta["history"]`` has per-epoch loss, margin and kept count.

    Raises:
        ValueError: bad records (equal desired/undesired, ids outside the vocabulary, empty data).
        NaNLossError: the loss became non-finite (names the epoch, step and batch's problem ids).
    """
    kinds = tuple(kinds)
    _check_settings(objective, batch_size, epochs, lr, lambda_l1, kinds)
    arch = get_arch(model)
    rows = validate_records(records, arch.dims.vocab_size)
    pad = pad_token_id(model, tokenizer) if pad_id is None else int(pad_id)
    device = model_device(model)
    masks = {k: nn.Parameter(torch.ones(arch.dims.n_layers, arch.num_components(k), device=device)) for k in kinds}
    optimizer = torch.optim.Adam(list(masks.values()), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    stop = _PatienceStop(patience, _kept_count(masks))
    step = 0
    was_training = model.training
    model.eval()
    try:
        with frozen_parameters(model):
            bar = tqdm(range(epochs), desc="DCM", disable=not progress)
            for epoch in bar:
                order = torch.randperm(len(rows), generator=generator).tolist()
                losses, margins = [], []
                for bi, start in enumerate(range(0, len(order), batch_size)):
                    batch_rows = [rows[i] for i in order[start : start + batch_size]]
                    loss, margin = _mask_loss(model, arch, masks, collate_records(batch_rows, pad), objective, lambda_l1)
                    if not torch.isfinite(loss):
                        raise NaNLossError(
                            f"DCM loss is {float(loss.detach())} at epoch {epoch}, step {step} (batch {bi} of the epoch, "
                            f"records {order[start : start + batch_size]}, problem ids "
                            f"{[r['problem_id'] for r in batch_rows]}); check those records "
                            "and the model (a lower lr or the 'logsigmoid' objective may help)")
                    _mask_step(optimizer, masks, loss)
                    step += 1
                    losses.append(float(loss.detach()))
                    margins.append(margin)
                scheduler.step()
                history.append({"epoch": epoch, "loss": sum(losses) / len(losses),
                                "margin": sum(margins) / len(margins), "kept": _kept_count(masks),
                                "lr": optimizer.param_groups[0]["lr"]})
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", kept=history[-1]["kept"])
                if stop.update(history[-1]["kept"]):
                    break
            bar.close()
    finally:
        model.train(was_training)
    settings = {"lambda_l1": lambda_l1, "lr": lr, "step_size": step_size, "gamma": gamma, "batch_size": batch_size,
                "epochs": epochs, "patience": patience, "kinds": list(kinds), "objective": objective, "seed": seed}
    meta = {"score": "mask value m (kept: m >= 0.5)", "settings": settings, "records": len(rows), "steps": step,
            "epochs_run": len(history), "stopped_early": stop.stopped, "history": history}
    return _mask_circuit(masks, arch, meta)


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


def _kept_count(masks: dict[str, torch.Tensor]) -> int:
    return int(sum((m.detach() >= 0.5).sum() for m in masks.values()))


def _mask_loss(model: nn.Module, arch, masks: dict[str, nn.Parameter], batch: dict[str, torch.Tensor],
               objective: str, lambda_l1: float) -> tuple[torch.Tensor, float]:
    """The DCM loss of one collated batch (task term at the last position + ``lambda_l1 * sum |m|``) and
    the batch's mean logit margin (desired - undesired)."""
    device = model_device(model)
    batch = to_device(batch, device)
    n = batch["desired"].shape[0]
    last = torch.full((n,), -1, dtype=torch.long, device=device)
    with scale_components(model, {k: 2 * m for k, m in masks.items()}, positions=last, arch=arch):
        logits = last_logits(model, model_inputs(batch), 1)[:, -1].float()
    r = torch.arange(n, device=device)
    margin = logits[r, batch["desired"]] - logits[r, batch["undesired"]]
    task = -margin.mean() if objective == "logit_diff" else -nn.functional.logsigmoid(margin).mean()
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
    """Early stop: ``patience`` epochs without a change of the kept count, counted once it first changed
    (0 disables)."""

    def __init__(self, patience: int, kept: int):
        self.patience, self.last, self.changed_once, self.still, self.stopped = patience, kept, False, 0, False

    def update(self, kept: int) -> bool:
        """Record an epoch's kept count; True when the run should stop."""
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
