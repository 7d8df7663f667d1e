"""Pivotal-token loss weighting for ordinary SFT with ``transformers.Trainer`` or ``trl.SFTTrainer``.

Transformers callbacks cannot change the loss, so the mechanism is one object that a user
attaches to a stock trainer::

    weighting = PivotalWeighting(pivotal_weight=5.0, unlikelihood_weight=0.5)
    trainer = weighting.attach(SFTTrainer(model=..., args=SFTConfig(...), train_dataset=ds))
    trainer.train()

``attach`` (1) wraps the trainer's data collator so that the ``token_weights`` and
``undesired_ids`` columns are padded beside ``input_ids`` (sliced to the truncated length first),
(2) keeps those columns through ``remove_unused_columns``, and (3) replaces the trainer's
``compute_loss`` on that instance by the weighted loss (batches without weights fall back to the
trainer's own loss). Data come from :func:`build_pivotal_dataset`.

Loss per batch (``w`` = token weight, ``u`` = undesired id at a pivotal position, ``N`` = number of
label tokens, as in TRL/Transformers)::

    L = [ sum_t w_t * -log p(y_t)  +  unlikelihood_weight * sum_{t: u_t set} -log(1 - p(u_t)) ] / N

With all weights 1 and no unlikelihood term this equals the trainer's own token-mean cross-entropy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, TrainerCallback, default_data_collator

from ..batching import pad_batch, pad_token_id
from ..compat import keep_signature_columns
from ..mixins import add_mixin
from ..evaluate.generation import last_token_logits

WEIGHT_COLUMNS: tuple[str, ...] = ("token_weights", "undesired_ids")
DEFAULT_PIVOTAL_WEIGHT = 5.0
IGNORE_INDEX = -100


# ----- data -----------------------------------------------------------------------------------


def _overlaps(offset: tuple[int, int], spans: Sequence[Sequence[int]]) -> int | None:
    """Index of the first span that the token's char ``offset`` overlaps, else None."""
    a, b = offset
    for k, (s, e) in enumerate(spans):
        if a < e and s < b and b > a:
            return k
    return None


def _encode_with_spans(tokenizer: PreTrainedTokenizerBase, text: str, spans: Sequence[Sequence[int]],
                       special: bool) -> tuple[list[int], list[int | None]]:
    """Token ids of ``text`` and, per token, the index of the pivotal char span it overlaps."""
    for s, e in spans:
        if not 0 <= s < e <= len(text):
            raise ValueError(f"pivotal span ({s}, {e}) is outside the text of length {len(text)}")
    if not spans:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"]), []
    try:
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise ValueError("char spans need a fast tokenizer (offset mapping); pass token positions instead") from err
    ids = list(enc["input_ids"])
    hits = [None if a == b else _overlaps((a, b), spans) for a, b in enc["offset_mapping"]]
    return ids, hits


def _row_from_record(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None, pivotal_weight: float,
                     add_eos: bool, special: bool) -> dict[str, list]:
    """One example as ``input_ids``, ``completion_mask``, ``token_weights``, ``undesired_ids``."""
    if "context_ids" in row:
        return _row_from_contrastive(row, pivotal_weight)
    if "input_ids" in row:
        return _row_from_token_ids(row, pivotal_weight)
    return _row_from_text(row, tokenizer, pivotal_weight, bool(row.get("add_eos", add_eos)), special)


def _row_from_contrastive(row: dict[str, Any], pivotal_weight: float) -> dict[str, list]:
    """A contrastive record: train the desired token after the context (weighted, its undesired twin)."""
    for key in ("desired_id", "undesired_id"):
        if key not in row:
            raise ValueError(f"contrastive record needs {key!r} (fields: {sorted(row)})")
    ctx = [int(t) for t in row["context_ids"]]
    if not ctx:
        raise ValueError("contrastive record has an empty context_ids")
    ids = ctx + [int(row["desired_id"])]
    start = int(row.get("prompt_length", len(ctx)))
    weights = [1.0] * (len(ids) - 1) + [pivotal_weight]
    undesired = [IGNORE_INDEX] * (len(ids) - 1) + [int(row["undesired_id"])]
    return {"input_ids": ids, "completion_mask": [0] * start + [1] * (len(ids) - start),
            "token_weights": weights, "undesired_ids": undesired}


def _row_from_token_ids(row: dict[str, Any], pivotal_weight: float) -> dict[str, list]:
    """A pre-tokenized row with pivotal token positions (and optional undesired ids, completion mask)."""
    ids = [int(t) for t in row["input_ids"]]
    positions = [int(p) for p in row.get("pivotal_positions", [])]
    if any(not 0 < p < len(ids) for p in positions):
        raise ValueError(f"pivotal_positions {positions} must lie in 1..{len(ids) - 1} (position 0 has no loss)")
    und_in = list(row.get("undesired_ids") or [])
    if und_in and len(und_in) != len(positions):
        raise ValueError("undesired_ids must give one token id per pivotal position")
    mask = [int(m) for m in row.get("completion_mask", [1] * len(ids))]
    if len(mask) != len(ids):
        raise ValueError("completion_mask must have the length of input_ids")
    weights = [1.0] * len(ids)
    undesired = [IGNORE_INDEX] * len(ids)
    for k, p in enumerate(positions):
        weights[p] = pivotal_weight
        if und_in:
            undesired[p] = int(und_in[k])
    return {"input_ids": ids, "completion_mask": mask, "token_weights": weights, "undesired_ids": undesired}


def _row_from_text(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None, pivotal_weight: float,
                   add_eos: bool, special: bool) -> dict[str, list]:
    """A ``prompt`` + ``completion`` or ``text`` row with character ``pivotal_spans``."""
    if tokenizer is None:
        raise ValueError("text examples need a tokenizer")
    spans = [tuple(s) for s in row.get("pivotal_spans", [])]
    und_in = list(row.get("undesired_ids") or [])
    if und_in and len(und_in) != len(spans):
        raise ValueError("undesired_ids must give one token id per pivotal span")
    ids, mask, hits = _encode_text_row(row, tokenizer, spans, add_eos, special)
    weights = [1.0] * len(ids)
    undesired = [IGNORE_INDEX] * len(ids)
    seen: set[int] = set()
    for t, k in enumerate(hits):
        if k is None or t == 0:
            continue
        weights[t] = pivotal_weight
        if und_in and k not in seen:  # the unlikelihood target is the span's first token
            undesired[t] = int(und_in[k])
        seen.add(k)
    if spans and not seen:
        raise ValueError(f"no token overlaps the pivotal spans {spans}")
    return {"input_ids": ids, "completion_mask": mask, "token_weights": weights, "undesired_ids": undesired}


def _encode_text_row(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, spans: list[tuple], add_eos: bool,
                     special: bool) -> tuple[list[int], list[int], list[int | None]]:
    """Token ids, completion mask and, per token, the index of the pivotal span it overlaps (or None)."""
    if "prompt" in row and "completion" in row:
        p_ids = list(tokenizer(row["prompt"], add_special_tokens=special)["input_ids"])
        c_ids, hits = _encode_with_spans(tokenizer, row["completion"], spans, special=False)
        hits = hits or [None] * len(c_ids)
        if add_eos and tokenizer.eos_token_id is not None:
            c_ids, hits = c_ids + [tokenizer.eos_token_id], hits + [None]
        return p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids), [None] * len(p_ids) + hits
    if "text" in row:
        ids, hits = _encode_with_spans(tokenizer, row["text"], spans, special=special)
        return ids, [1] * len(ids), hits or [None] * len(ids)
    raise ValueError("an example needs 'context_ids' (contrastive record), 'input_ids' (+ 'pivotal_positions'), "
                     f"'prompt'+'completion' or 'text' (+ 'pivotal_spans'); got fields {sorted(row)}")


def build_pivotal_dataset(
    examples: Iterable[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase | None = None,
    pivotal_weight: float = DEFAULT_PIVOTAL_WEIGHT,
    add_eos: bool = True,
    labels: bool = True,
    add_special_tokens: bool = True,
):
    """A pre-tokenized ``datasets.Dataset`` with aligned ``input_ids``, ``completion_mask``,
    ``token_weights`` (1, or ``pivotal_weight`` on pivotal tokens) and ``undesired_ids``
    (``-100``, or the undesired token id at a pivotal position), one entry per token.

    Each example is one of:

    - a contrastive record ``{"context_ids", "desired_id", "undesired_id"}`` (optional
      ``prompt_length``: tokens before it get no loss; default: only the desired token is trained);
    - ``{"input_ids", "pivotal_positions", "undesired_ids"?, "completion_mask"?}`` (token positions);
    - ``{"prompt", "completion", "pivotal_spans"?, "undesired_ids"?, "add_eos"?}``: char spans in the
      completion (EOS appended when the row's ``add_eos``, default ``add_eos``: a chat template's
      completion ends with its own end-of-turn text); prompt tokens get ``completion_mask`` 0;
    - ``{"text", "pivotal_spans"?, "undesired_ids"?}``: char spans in the text.

    ``undesired_ids`` gives one token id per position / span (spans: placed on the span's first
    token). ``labels`` (default) adds a ``labels`` column (``-100`` outside the completion):
    ``SFTTrainer`` takes it as is (it would ignore ``completion_mask`` on pre-tokenized data unless
    ``completion_only_loss=True``) and truncates it with ``input_ids``; plain ``Trainer`` needs it.
    ``add_special_tokens``: whether the tokenizer adds its special tokens (e.g. BOS) to prompts /
    texts; use False for chat-template prompts, which hold them already.
    """
    from datasets import Dataset

    if pivotal_weight < 0:
        raise ValueError("pivotal_weight must be >= 0")
    rows = [_row_from_record(dict(r), tokenizer, pivotal_weight, add_eos, add_special_tokens) for r in examples]
    if not rows:
        raise ValueError("no examples: the pivotal dataset would be empty")
    if labels:
        for r in rows:
            r["labels"] = [t if m else IGNORE_INDEX for t, m in zip(r["input_ids"], r["completion_mask"])]
    return Dataset.from_list(rows)


# ----- collator -------------------------------------------------------------------------------


class PivotalCollator:
    """Wraps a data collator: pads ``token_weights`` (with 0) and ``undesired_ids`` (with -100) to the
    batch's ``input_ids``, after slicing them to each example's (possibly truncated) ``input_ids``.

    ``base``: the trainer's collator (``None``: pad ``input_ids``/``labels`` here, right side).
    ``truncation_mode``: ``"keep_start"`` keeps the first weights, ``"keep_end"`` the last ones
    (TRL truncates ``input_ids`` in dataset preparation but not extra columns).
    """

    def __init__(self, base=None, pad_token_id: int = 0, truncation_mode: str = "keep_start"):
        if truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {truncation_mode!r}")
        self.base, self.pad_token_id, self.truncation_mode = base, pad_token_id, truncation_mode

    def _slice(self, values: list, n: int) -> list:
        return list(values[:n]) if self.truncation_mode == "keep_start" else list(values[len(values) - n :])

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        extra = {c: [] for c in WEIGHT_COLUMNS}
        stripped = []
        for ex in examples:
            ex = dict(ex)
            n = len(ex["input_ids"])
            for c in WEIGHT_COLUMNS:
                if c in ex:
                    extra[c].append(self._slice(ex.pop(c), n))
            stripped.append(ex)
        if self.base is not None:
            batch = self.base(stripped)
        else:
            ids, mask = pad_batch([e["input_ids"] for e in stripped], self.pad_token_id, side="right")
            batch = {"input_ids": ids, "attention_mask": mask}
            if all("labels" in e for e in stripped):
                batch["labels"], _ = pad_batch([e["labels"] for e in stripped], IGNORE_INDEX, side="right")
        if not any(extra.values()):
            return batch
        if "attention_mask" not in batch:
            raise ValueError("pivotal weighting needs padded batches with an attention_mask (padding_free/packing "
                             "drop per-token columns); set padding_free=False and packing=False")
        shape = batch["input_ids"].shape
        starts = batch["attention_mask"].long().argmax(-1).tolist()  # first real token (left or right padding)
        for c, fill in (("token_weights", 0.0), ("undesired_ids", IGNORE_INDEX)):
            if not extra[c]:
                continue
            if len(extra[c]) != len(examples):
                raise ValueError(f"column {c!r} is present in only some examples of the batch")
            out = torch.full(shape, fill, dtype=torch.float32 if c == "token_weights" else torch.long)
            for i, (values, start) in enumerate(zip(extra[c], starts)):
                n = len(stripped[i]["input_ids"])
                if len(values) != n:
                    raise ValueError(f"example {i}: {c} has {len(values)} entries for {n} input_ids")
                out[i, start : start + n] = torch.tensor(values, dtype=out.dtype)
            batch[c] = out
        return batch


# ----- loss -----------------------------------------------------------------------------------


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
        """:func:`build_pivotal_dataset` with this object's ``pivotal_weight``."""
        return build_pivotal_dataset(examples, tokenizer, pivotal_weight=self.pivotal_weight, **kwargs)

    def attach(self, trainer):
        """Give an existing ``trainer`` the weighted loss and the collator; returns it. A thin convenience
        over :class:`~circuit_peft.cca.trainers.PivotalLossMixin`: the trainer becomes an instance of
        ``PivotalLossMixin + its own class`` (``compute_loss`` through the class, ``super()`` kept).

        Call before ``trainer.train()``. Packing and padding-free batches are refused (they drop
        per-token columns).
        """
        from .trainers import PivotalLossMixin

        if getattr(trainer, "_pivotal_weighting", None) is not None:
            raise ValueError("a PivotalWeighting is already attached to this trainer")
        install_pivotal_columns(trainer)
        add_mixin(trainer, PivotalLossMixin, "Pivotal")
        trainer.unlikelihood_weight = self.unlikelihood_weight
        trainer._pivotal_weighting = self
        return trainer


def install_pivotal_columns(trainer) -> None:
    """Make ``trainer`` carry ``token_weights``/``undesired_ids`` to ``compute_loss``: wrap its collator
    in :class:`PivotalCollator` and keep the columns through ``remove_unused_columns``."""
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
    rows = torch.arange(len(records))
    diff = logits[rows, desired] - logits[rows, undesired]
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
            missing = [k for k in ("context_ids", "desired_id", "undesired_id") if k not in r]
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
