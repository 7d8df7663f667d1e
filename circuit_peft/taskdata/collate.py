"""Tokenized task examples -> padded batches (built on :mod:`circuit_peft.batching`).

* :class:`PivotalCollator`: SFT rows (``input_ids``, ``labels``, ``token_weights``, ``undesired_ids``),
  right-padded, or a trainer's own collator with the weight columns padded beside it;
* :func:`collate_probe`: probe rows, left-padded (every row ends at the last position, where the scored
  logits are kept), ``labels`` already shifted to next-token targets;
* :func:`model_inputs`: the tensors of a batch that a model forward takes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..batching import continue_after_prefix, left_pad, pad_batch
from .examples import WEIGHT_COLUMNS, EncodedProbe
from .losses import IGNORE_INDEX


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

def collate_probe(rows: Sequence[EncodedProbe], pad_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch plus ``labels`` (B, T): next-token targets, -100 off the solution.

    ``labels[b, t]`` is the token at ``t + 1`` when that token is a solution token, so the
    cross-entropy of ``logits[:, t]`` against ``labels[:, t]`` is the solution loss.
    ``n_keep``: how many final positions carry logits that matter (for ``logits_to_keep``).
    """
    batch = left_pad([r.ids for r in rows], pad_id)
    T = batch["input_ids"].shape[1]
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        labels[i, T - 1 - r.n_solution : T - 1] = batch["input_ids"][i, T - r.n_solution :]
    batch["labels"] = labels
    batch["n_keep"] = torch.tensor(max(r.n_solution for r in rows) + 1)
    return batch


def collate_probe_after_prefix(rows: Sequence[EncodedProbe], prefix_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """:func:`collate_probe` for rows that continue a cached prompt prefix of ``prefix_length`` tokens: ``rows``
    hold the ids after it (see :func:`~circuit_peft.batching.continue_after_prefix`)."""
    return continue_after_prefix(collate_probe(rows, pad_id), prefix_length)


def model_inputs(batch: dict[str, torch.Tensor], repeat: int = 1) -> dict[str, torch.Tensor]:
    """The tensors a model forward takes, optionally repeated ``repeat`` times along the batch."""
    out = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if repeat > 1:
        out = {k: v.repeat(repeat, *([1] * (v.dim() - 1))) for k, v in out.items()}
    return out


__all__ = ["PivotalCollator", "collate_probe", "collate_probe_after_prefix", "model_inputs"]
