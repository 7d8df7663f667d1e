"""Contrastive records ``{"context_ids", "desired_id", "undesired_id", "problem_id"}`` (mined pivots; DCM,
logit-difference attribution, the CCA update, the pivotal metrics): checked once, collated once.

Batches are left-padded, so every row ends at the last position, and carry ``position_ids`` counted from each
row's first real token (a padded row computes what it would alone). The margin of a batch is
:func:`~circuit_peft.taskdata.losses.logit_margins` of its last-position logits.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..batching import continue_after_prefix, left_pad
from ..errors import located
from ..validation import integer, within_context
from .examples import as_rows

RECORD_FIELDS = ("context_ids", "desired_id", "undesired_id")


def validate_records(data: Any, vocab_size: int, model: Any = None) -> list[dict[str, Any]]:
    """Check contrastive records; return them as a list of dicts.

    Raises :class:`~circuit_peft.errors.CircuitPeftError` (naming the record and problem) for a missing
    field, an empty context, a token id that is not an integer, equal desired and undesired tokens, an id
    outside ``[0, vocab_size)`` or (with ``model``) a context longer than the model's
    (``max_position_embeddings``).
    """
    rows = as_rows(data)
    out = [_checked_record(i, r, vocab_size) for i, r in enumerate(rows)]
    if model is not None:
        within_context([len(r["context_ids"]) for r in out], model, None, lambda i: record_name(i, rows[i]),
                       what="context_ids", fix="were they mined with a model of a longer context? drop those records")
    return out


def _checked_record(i: int, r: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Record ``i`` checked (see :func:`validate_records`), as plain ints."""
    where = record_name(i, r)
    missing = [f for f in RECORD_FIELDS if f not in r]
    if missing:
        raise located(where, f"lacks {missing}; a contrastive record is "
                             "{'context_ids': [...], 'desired_id': int, 'undesired_id': int, 'problem_id': str}")
    if isinstance(r["context_ids"], (str, bytes)) or not hasattr(r["context_ids"], "__iter__"):
        raise located(f"{where}: context_ids", f"expected a list of token ids, got {r['context_ids']!r}")
    at = f"{where}: context_ids"
    ctx = [integer(t, at, "token id") for t in r["context_ids"]]
    if not ctx:
        raise located(f"{where}: context_ids", "the list is empty")
    d, u = (integer(r[f], f"{where}: {f}", "token id") for f in ("desired_id", "undesired_id"))
    if d == u:
        raise located(where, f"desired_id and undesired_id are both {d}; a record must contrast two "
                             "different tokens (drop it)")
    bad = [t for t in (d, u, *ctx) if not 0 <= t < vocab_size]
    if bad:
        raise located(where, f"token id {bad[0]} is outside the model's vocabulary [0, {vocab_size}); "
                             "were the records mined with another tokenizer?")
    return {"context_ids": ctx, "desired_id": d, "undesired_id": u, "problem_id": r.get("problem_id")}


def record_name(i: int, row: dict[str, Any]) -> str:
    """``record i`` and its problem id, as refusals name a record."""
    return f"record {i}" + (f" (problem_id {row['problem_id']!r})" if row.get("problem_id") is not None else "")


def collate_records(rows: Sequence[dict[str, Any]], pad_id: int, prefix_length: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch plus ``desired``/``undesired`` (B,) id tensors. ``prefix_length``: the first that many
    ids of every context are a shared prefix run (and cached) separately; the batch holds the rest, continuing
    it (:func:`~circuit_peft.batching.continue_after_prefix`)."""
    batch = left_pad([r["context_ids"][prefix_length:] for r in rows], pad_id)
    if prefix_length:
        batch = continue_after_prefix(batch, prefix_length)
    batch["desired"] = torch.tensor([r["desired_id"] for r in rows], dtype=torch.long)
    batch["undesired"] = torch.tensor([r["undesired_id"] for r in rows], dtype=torch.long)
    return batch


__all__ = ["RECORD_FIELDS", "collate_records", "record_name", "validate_records"]
