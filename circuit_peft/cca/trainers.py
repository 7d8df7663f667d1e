"""Trainers with pivotal-token loss weights built in (subclasses calling ``super()``, the way TRL's
own trainers extend ``Trainer``), for data from :func:`~circuit_peft.cca.weighting.build_pivotal_dataset`.

* :class:`PivotalTrainer` (``transformers.Trainer``): runs the LM head only at positions that have a
  label (``logits_to_keep`` with the positions), so prompts cost no vocabulary projection;
* :class:`PivotalSFTTrainer` (``trl.SFTTrainer``): keeps TRL's own loss path (its fused, chunked LM
  head that never materialises full logits) and its logged metrics (mean token accuracy, entropy),
  and re-reduces TRL's per-token log-probabilities with the weights.

Batches without ``token_weights`` fall back to the parent's loss. ``PivotalWeighting.attach`` stays
as a thin convenience for an existing trainer instance.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ..batching import accepts_logits_to_keep
from .weighting import IGNORE_INDEX, aligned_weighted_loss, install_pivotal_columns


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions ``t`` (1-D, sorted) whose next token has a label in some row: the LM head's only work."""
    has = (labels[:, 1:] != IGNORE_INDEX).any(0)
    keep = has.nonzero().squeeze(-1)
    return keep if keep.numel() else torch.zeros(1, dtype=torch.long, device=labels.device)


class PivotalLossMixin:
    """Trainer mixin: the pivotal-weighted loss in ``compute_loss``, the LM head only where labels are.

    Batches without ``token_weights`` go to the parent's ``compute_loss`` (``super()``). Compose it
    first: ``class MyTrainer(PivotalLossMixin, Trainer)``; :class:`PivotalTrainer` is that for
    ``transformers.Trainer``. ``unlikelihood_weight`` as in :class:`~circuit_peft.cca.weighting.PivotalWeighting`.
    """

    unlikelihood_weight: float = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "token_weights" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        weights, undesired = inputs.pop("token_weights"), inputs.pop("undesired_ids", None)
        labels = inputs.pop("labels")
        keep = labelled_positions(labels)
        if accepts_logits_to_keep(model):
            outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
            logits = outputs.logits
        else:
            outputs = model(**inputs, use_cache=False)
            logits = outputs.logits[:, keep]
        nxt = keep + 1
        loss = aligned_weighted_loss(logits, labels[:, nxt], weights[:, nxt],
                                     undesired[:, nxt] if undesired is not None else None,
                                     self.unlikelihood_weight, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer: DDP averages the gradients
        return (loss, outputs) if return_outputs else loss


class PivotalTrainer(PivotalLossMixin, Trainer):
    """``transformers.Trainer`` with the pivotal-weighted loss (:class:`PivotalLossMixin`)."""

    def __init__(self, *args: Any, unlikelihood_weight: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.unlikelihood_weight = unlikelihood_weight
        install_pivotal_columns(self)


def _sft_trainer_class():
    from trl import SFTTrainer

    class PivotalSFTTrainer(SFTTrainer):
        """``trl.SFTTrainer`` with pivotal weights on TRL's own per-token log-probabilities (TRL's
        metrics stay). Needs TRL's default loss (``loss_type="nll"``, no ``compute_loss_func``,
        no label smoothing); the unlikelihood term needs logits, so it is :class:`PivotalTrainer`'s."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if getattr(self.args, "loss_type", "nll") != "nll" or self.compute_loss_func is not None:
                raise ValueError("PivotalSFTTrainer weights TRL's nll loss: use loss_type='nll' and no "
                                 "compute_loss_func (or PivotalTrainer)")
            install_pivotal_columns(self)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "token_weights" not in inputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            weights = inputs.pop("token_weights")
            inputs.pop("undesired_ids", None)
            captured: dict[str, Any] = {}

            def keep_outputs(_module, _args, out):  # TRL's fused forward output (per-token log-probs)
                captured["out"] = out

            handle = model.register_forward_hook(keep_outputs)
            try:
                super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)  # logs TRL's metrics
            finally:
                handle.remove()
            outputs = captured.get("out")
            log_probs = getattr(outputs, "log_probs", None)
            if log_probs is None:
                raise ValueError("PivotalSFTTrainer needs TRL's fused LM head outputs (per-token log_probs); "
                                 "label smoothing and sequence parallelism are not supported: use PivotalTrainer")
            count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -(log_probs * weights[:, 1:].to(log_probs.dtype)).sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return (loss, outputs) if return_outputs else loss

    return PivotalSFTTrainer


def __getattr__(name: str):  # TRL is imported only when PivotalSFTTrainer is asked for
    if name == "PivotalSFTTrainer":
        cls = _sft_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


__all__ = ["PivotalLossMixin", "PivotalSFTTrainer", "PivotalTrainer", "labelled_positions"]
