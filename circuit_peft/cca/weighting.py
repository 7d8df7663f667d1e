"""Pivotal-token loss weighting for ordinary SFT with ``transformers.Trainer`` or ``trl.SFTTrainer``.

Transformers callbacks cannot change the loss, so the mechanism is one object that a user
attaches to a stock trainer::

    weighting = PivotalWeighting(pivotal_weight=5.0, unlikelihood_weight=0.5)
    trainer = weighting.attach(SFTTrainer(model=..., args=SFTConfig(...), train_dataset=ds))
    trainer.train()

``attach`` (1) wraps the trainer's data collator so that the ``token_weights`` and
``undesired_ids`` columns are padded beside ``input_ids`` (sliced to the truncated length first),
(2) keeps those columns through ``remove_unused_columns``, and (3) gives the trainer the weighted
loss (:class:`~circuit_peft.cca.trainers.PivotalLossMixin`; batches without weights fall back to the
trainer's own loss). Data come from :func:`~circuit_peft.taskdata.examples.build_pivotal_dataset`, the
collator and the loss from :mod:`circuit_peft.taskdata` (the loss formula: :mod:`circuit_peft.taskdata.losses`).
:func:`pivotal_metrics` / :class:`PivotalMetricsCallback` measure held-out contrastive records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from ..evaluate.generation import last_token_logits
from ..mixins import add_mixin
from ..taskdata.examples import DEFAULT_PIVOTAL_WEIGHT, build_pivotal_dataset
from ..taskdata.losses import logit_margins
from ..taskdata.records import RECORD_FIELDS
from .trainers import PivotalLossMixin, install_pivotal_columns


@dataclass
class PivotalWeighting:
    """Pivotal-token loss weighting for a stock ``Trainer``/``SFTTrainer``: ``weighting.attach(trainer)``.

    ``pivotal_weight`` (our choice, default 5) is used by :meth:`build_dataset`; the loss reads the
    weights from the data. ``unlikelihood_weight`` (default 0 = off) scales -log(1 - p(undesired))
    at pivotal positions that carry an undesired token id.
    """

    pivotal_weight: float = DEFAULT_PIVOTAL_WEIGHT
    unlikelihood_weight: float = 0.0

    def build_dataset(self, examples: Iterable[dict[str, Any]], tokenizer: PreTrainedTokenizerBase | None = None,
                      **kwargs: Any):
        """:func:`~circuit_peft.taskdata.examples.build_pivotal_dataset` with this object's ``pivotal_weight``."""
        return build_pivotal_dataset(examples, tokenizer, pivotal_weight=self.pivotal_weight, **kwargs)

    def attach(self, trainer):
        """Give an existing ``trainer`` the weighted loss and the collator; returns it. A thin convenience
        over :class:`~circuit_peft.cca.trainers.PivotalLossMixin`: the trainer becomes an instance of
        ``PivotalLossMixin + its own class`` (``compute_loss`` through the class, ``super()`` kept).

        Call before ``trainer.train()``. Packing and padding-free batches are refused (they drop
        per-token columns).
        """
        if getattr(trainer, "_pivotal_weighting", None) is not None:
            raise ValueError("a PivotalWeighting is already attached to this trainer")
        install_pivotal_columns(trainer)
        add_mixin(trainer, PivotalLossMixin, "Pivotal")
        trainer.unlikelihood_weight = self.unlikelihood_weight
        trainer._pivotal_weighting = self
        return trainer


# ----- metrics callback ----------------------------------------------------------------------


def pivotal_metrics(model, tokenizer: PreTrainedTokenizerBase, records: Sequence[dict[str, Any]],
                    batch_size: int = 16) -> dict[str, float]:
    """On contrastive records: ``pivotal_accuracy`` (fraction where the desired token is the model's
    top next token), ``pivotal_pair_accuracy`` (desired logit > undesired logit) and
    ``pivotal_logit_diff`` (mean desired - undesired logit at the last context position)."""
    if not records:
        raise ValueError("no records: the held-out pivotal set is empty")
    logits = last_token_logits(model, tokenizer, [r["context_ids"] for r in records], batch_size)
    desired = torch.tensor([int(r["desired_id"]) for r in records])
    undesired = torch.tensor([int(r["undesired_id"]) for r in records])
    diff = logit_margins(logits, desired, undesired)
    return {
        "pivotal_accuracy": float((logits.argmax(-1) == desired).float().mean()),
        "pivotal_pair_accuracy": float((diff > 0).float().mean()),
        "pivotal_logit_diff": float(diff.mean()),
    }


class PivotalMetricsCallback(TrainerCallback):
    """Logs :func:`pivotal_metrics` on held-out contrastive ``records`` every ``every_n_steps``
    optimizer steps (default: at each logging step), at the start and at the end of training.

    Values go into the current log entry (``trainer.state.log_history``, console) under
    ``eval_pivotal_*`` and into :attr:`history`. Loggers such as W&B that run before this callback
    would miss them: add it with ``PivotalMetricsCallback.install(trainer, ...)`` to run it first.
    """

    def __init__(self, records: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase | None = None,
                 every_n_steps: int | None = None, batch_size: int = 16):
        self.records = [dict(r) for r in records]
        if not self.records:
            raise ValueError("PivotalMetricsCallback needs at least one held-out record (the set is empty)")
        for i, r in enumerate(self.records):
            missing = [k for k in RECORD_FIELDS if k not in r]
            if missing:
                raise ValueError(f"record {i} lacks {missing}")
        self.tokenizer, self.every_n_steps, self.batch_size = tokenizer, every_n_steps, batch_size
        self.history: list[dict[str, float]] = []
        self._pending: dict[str, float] | None = None

    @classmethod
    def install(cls, trainer, records: Sequence[dict[str, Any]], **kwargs: Any) -> PivotalMetricsCallback:
        """Create the callback and put it first in ``trainer``'s callbacks (before loggers)."""
        cb = cls(records, tokenizer=kwargs.pop("tokenizer", None) or trainer.processing_class, **kwargs)
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    def _measure(self, model, tokenizer, step: int) -> dict[str, float]:
        tok = self.tokenizer or tokenizer
        if tok is None:
            raise ValueError("PivotalMetricsCallback needs a tokenizer (pass tokenizer=...)")
        metrics = {f"eval_{k}": v for k, v in pivotal_metrics(model, tok, self.records, self.batch_size).items()}
        self.history.append({"step": step, **metrics})
        return metrics

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._pending = self._measure(model, processing_class, state.global_step)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        every = self.every_n_steps or args.logging_steps
        if every and state.global_step % int(every) == 0:
            self._pending = self._measure(model, processing_class, state.global_step)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self.history or self.history[-1]["step"] != state.global_step:
            metrics = self._measure(model, processing_class, state.global_step)
            state.log_history.append({**metrics, "step": state.global_step})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)  # seen by later callbacks (console)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)  # Trainer.log stored a copy of logs
            self._pending = None


__all__ = ["PivotalMetricsCallback", "PivotalWeighting", "pivotal_metrics"]
