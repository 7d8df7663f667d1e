"""Trainers with pivotal-token loss weights built in (subclasses calling ``super()``, the way TRL's
own trainers extend ``Trainer``), for data from :func:`~circuit_peft.taskdata.examples.build_pivotal_dataset`.

* :class:`PivotalTrainer` (``transformers.Trainer``): runs the LM head only at positions that have a
  label (``logits_to_keep`` with the positions), so prompts cost no vocabulary projection, and runs the
  prompt prefix that every row of a batch shares (system message, few-shot examples) once, its KV cache
  repeated for the rows (the same loss and gradients up to float rounding; see
  :meth:`PivotalLossMixin.shared_prefix_length`);
* :class:`PivotalSFTTrainer` (``trl.SFTTrainer``): keeps TRL's own loss path (its fused, chunked LM
  head that never materialises full logits) and its logged metrics (mean token accuracy, entropy),
  and re-reduces TRL's per-token log-probabilities with the weights.

Each trainer (and any ``class MyTrainer(PivotalLossMixin, SFTTrainer)``) installs its weight columns
itself at ``__init__``: the collator pads them and ``remove_unused_columns`` keeps them. A batch whose
dataset has a weight column but that arrives without it raises :class:`~circuit_peft.errors.CircuitPeftError`
(naming the column) rather than training unweighted; data with no weight column at all train the
parent's loss. ``PivotalWeighting.attach`` stays as a thin convenience for an existing trainer instance.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DataCollatorWithPadding, Trainer, default_data_collator

from ..batching import accepts_logits_to_keep, pad_token_id
from ..errors import CircuitPeftError
from ..prefix import prefix_kv_cache, sharable_prefix_length
from ..compat import fused_head_outputs, keep_signature_columns
from ..taskdata.collate import PivotalCollator
from ..taskdata.examples import WEIGHT_COLUMNS
from ..taskdata.losses import IGNORE_INDEX, aligned_weighted_loss


def install_pivotal_columns(trainer) -> None:
    """Make ``trainer`` carry ``token_weights``/``undesired_ids`` to ``compute_loss``: wrap its collator
    in :class:`~circuit_peft.taskdata.collate.PivotalCollator` and keep the columns through ``remove_unused_columns``."""
    args = trainer.args
    if getattr(args, "packing", False) or getattr(args, "padding_free", False):
        raise ValueError("pivotal weighting needs packing=False and padding_free=False")
    pad = pad_token_id(trainer.model, getattr(trainer, "processing_class", None))
    base = trainer.data_collator
    if not isinstance(base, PivotalCollator):
        # Trainer's defaults pad no labels (or nothing): pad here instead
        if base is default_data_collator or isinstance(base, DataCollatorWithPadding):
            base = None
        trainer.data_collator = PivotalCollator(base, pad_token_id=pad,
                                                truncation_mode=getattr(args, "truncation_mode", "keep_start"))
    keep_signature_columns(trainer, WEIGHT_COLUMNS)  # a private Trainer list (circuit_peft.compat)


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions ``t`` (1-D, sorted) whose next token has a label in some row: the LM head's only work."""
    has = (labels[:, 1:] != IGNORE_INDEX).any(0)
    keep = has.nonzero().squeeze(-1)
    return keep if keep.numel() else torch.zeros(1, dtype=torch.long, device=labels.device)


class PivotalLossMixin:
    """Trainer mixin: the pivotal-weighted loss in ``compute_loss``, the LM head only where labels are.

    Compose it first: ``class MyTrainer(PivotalLossMixin, SFTTrainer)`` (or ``Trainer``; :class:`PivotalTrainer`
    is that for ``transformers.Trainer``). ``__init__`` takes ``unlikelihood_weight=`` (as in
    :class:`~circuit_peft.cca.weighting.PivotalWeighting`) and installs the weight columns (collator,
    ``remove_unused_columns``). Data without weight columns go to the parent's ``compute_loss``
    (``super()``); a batch that lost a column its dataset has raises (:func:`missing_weight_columns`).
    """

    unlikelihood_weight: float = 0.0
    share_prompt_prefix: bool = True  # run the batch's shared prompt prefix once (exact: see shared_prefix_length)
    min_shared_prefix: int = 16  # tokens: a shorter shared prefix is not worth the second forward call

    def __init__(self, *args: Any, unlikelihood_weight: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.unlikelihood_weight = unlikelihood_weight
        install_pivotal_columns(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        check_weight_columns(self, inputs)
        if "token_weights" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        weights, undesired = inputs.pop("token_weights"), inputs.pop("undesired_ids", None)
        labels = inputs.pop("labels")
        keep = labelled_positions(labels)
        outputs, logits = self._logits_at(model, inputs, keep)
        nxt = keep + 1
        loss = aligned_weighted_loss(logits, labels[:, nxt], weights[:, nxt],
                                     undesired[:, nxt] if undesired is not None else None,
                                     self.unlikelihood_weight, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer: DDP averages the gradients
        return (loss, outputs) if return_outputs else loss

    def _logits_at(self, model, inputs: dict[str, torch.Tensor], keep: torch.Tensor):
        """``(outputs, logits (B, len(keep), V))`` at positions ``keep``, the shared prefix run once if it can."""
        prefix = self.shared_prefix_length(model, inputs, int(keep[0]))
        shared = self._forward_after_prefix(model, inputs, keep, prefix) if prefix else None
        if shared is not None:
            return shared
        if accepts_logits_to_keep(model):
            outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
            return outputs, outputs.logits
        outputs = model(**inputs, use_cache=False)
        return outputs, outputs.logits[:, keep]

    def shared_prefix_length(self, model, inputs: dict[str, torch.Tensor], first_labelled: int) -> int:
        """Tokens of the prompt prefix every row of the batch shares and that this step may run once
        (0: run the batch as it is).

        Sharing is exact (the same loss and gradients as running every row, up to float rounding) when
        the prefix predicts no label (it ends at or before ``first_labelled``, the first position whose
        next token has a label) and :func:`~circuit_peft.prefix.sharing_is_exact` holds (no active dropout,
        a KV cache kept, no prompt learning, parameters whole in this process). Otherwise, or below
        ``min_shared_prefix`` tokens, 0.
        """
        ids = inputs.get("input_ids")
        if not self.share_prompt_prefix or ids is None or set(inputs) - {"input_ids", "attention_mask"}:
            return 0
        return sharable_prefix_length(model, ids, inputs.get("attention_mask"), first_labelled,
                                      self.min_shared_prefix, self.accelerator)

    def _forward_after_prefix(self, model, inputs: dict[str, torch.Tensor], keep: torch.Tensor, prefix: int):
        """The prefix through the model once (batch 1), its KV cache repeated per row, then every row's rest.
        The prefix goes through the unwrapped model so that a DDP wrapper runs its forward (and gradient
        sync) once a step; autograd carries the rows' gradients back through the repeated cache. None when the
        model returns no cache (it then runs the batch whole)."""
        ids = inputs["input_ids"]
        cache = prefix_kv_cache(self.accelerator.unwrap_model(model), ids[:1, :prefix], rows=ids.shape[0])
        if cache is None:
            return None
        rest = {"input_ids": ids[:, prefix:], "attention_mask": inputs.get("attention_mask", torch.ones_like(ids)),
                "past_key_values": cache, "use_cache": True}
        if accepts_logits_to_keep(model):
            outputs = model(**rest, logits_to_keep=keep - prefix)
            return outputs, outputs.logits
        outputs = model(**rest)
        return outputs, outputs.logits[:, keep - prefix]


def _dataset_columns(dataset: Any) -> set[str]:
    """Column names of a ``datasets`` dataset or a dict of them (empty when unknown, e.g. a torch Dataset)."""
    if isinstance(dataset, dict):
        return set().union(*(_dataset_columns(d) for d in dataset.values())) if dataset else set()
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # a DatasetDict
        return {c for cols in names.values() for c in cols}
    return set(names or ())


def missing_weight_columns(trainer: Any, inputs: dict[str, Any]) -> list[str]:
    """Weight columns the batch lacks although they were asked for: the dataset of the current mode
    (``train_dataset`` when the model trains, else ``eval_dataset``) has them, or ``undesired_ids`` when
    ``unlikelihood_weight > 0`` and the batch has ``token_weights``."""
    training = getattr(trainer.model, "training", True)
    columns = _dataset_columns(getattr(trainer, "train_dataset" if training else "eval_dataset", None))
    missing = [c for c in WEIGHT_COLUMNS if c in columns and c not in inputs]
    if "token_weights" in inputs and getattr(trainer, "unlikelihood_weight", 0.0) > 0 and "undesired_ids" not in inputs:
        missing.append("undesired_ids")
    return sorted(set(missing), key=WEIGHT_COLUMNS.index)


def check_weight_columns(trainer: Any, inputs: dict[str, Any]) -> None:
    """Raise :class:`CircuitPeftError` naming the weight columns ``inputs`` lost (see
    :func:`missing_weight_columns`) instead of silently training the unweighted loss."""
    missing = missing_weight_columns(trainer, inputs)
    if missing:
        raise CircuitPeftError(
            f"{type(trainer).__name__}: the batch has no {', '.join(repr(c) for c in missing)} column although "
            f"the {'train' if getattr(trainer.model, 'training', True) else 'eval'} dataset (or unlikelihood_weight) "
            f"asks for it; batch columns: {sorted(inputs)}. A collator or remove_unused_columns dropped it: build the "
            "trainer with PivotalLossMixin first in its bases (it installs the columns), or call "
            "circuit_peft.cca.trainers.install_pivotal_columns(trainer) after replacing the collator")


class PivotalTrainer(PivotalLossMixin, Trainer):
    """``transformers.Trainer`` with the pivotal-weighted loss (:class:`PivotalLossMixin`; ``unlikelihood_weight=``)."""


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
            check_weight_columns(self, inputs)
            if "token_weights" not in inputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            weights = inputs.pop("token_weights")
            inputs.pop("undesired_ids", None)
            # TRL's loss (it logs TRL's metrics) and its fused forward's per-token log-probs (circuit_peft.compat)
            outputs = fused_head_outputs(super().compute_loss, model, inputs, num_items_in_batch)
            log_probs = outputs.log_probs
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


__all__ = ["PivotalLossMixin", "PivotalSFTTrainer", "PivotalTrainer", "check_weight_columns", "install_pivotal_columns",
           "labelled_positions", "missing_weight_columns"]
