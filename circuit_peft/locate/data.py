"""Turning locate inputs into padded batches.

* Probe rows ``{"prompt": str, "solution": str}`` (ablation scans, ablation attribution): the
  loss is measured on the solution tokens only.
* Contrastive records ``{"context_ids", "desired_id", "undesired_id", "problem_id"}`` (DCM,
  logit-difference attribution): the logit difference at the last context position.

Batches are left-padded, so every row ends at the last position, and carry ``position_ids``
counted from each row's first real token (a padded row computes what it would alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..batching import accepts_logits_to_keep, continue_after_prefix, left_pad
from ..errors import CircuitPeftError, located
from ..validation import integer, within_context
from ..evaluate.prompts import build_prompt_ids

RECORD_FIELDS = ("context_ids", "desired_id", "undesired_id")


# ----- shared --------------------------------------------------------------------------------


def _rows(data: Any) -> list[dict[str, Any]]:
    """A list of dicts from a list, a ``datasets.Dataset`` or any iterable of mappings."""
    if data is None:
        raise CircuitPeftError("no data given: pass a list of dicts or a datasets.Dataset")
    rows = [dict(r) for r in data]
    if not rows:
        raise CircuitPeftError("the data set is empty: give at least one row")
    return rows


# ----- contrastive records -------------------------------------------------------------------


def validate_records(data: Any, vocab_size: int, model: Any = None) -> list[dict[str, Any]]:
    """Check contrastive records; return them as a list of dicts.

    Raises :class:`~circuit_peft.errors.CircuitPeftError` (naming the record and problem) for a missing
    field, an empty context, a token id that is not an integer, equal desired and undesired tokens, an id
    outside ``[0, vocab_size)`` or (with ``model``) a context longer than the model's
    (``max_position_embeddings``).
    """
    rows = _rows(data)
    out = []
    for i, r in enumerate(rows):
        where = _record_name(i, r)
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
        out.append({"context_ids": ctx, "desired_id": d, "undesired_id": u, "problem_id": r.get("problem_id")})
    if model is not None:
        within_context([len(r["context_ids"]) for r in out], model, None, lambda i: _record_name(i, rows[i]),
                       what="context_ids", fix="were they mined with a model of a longer context? drop those records")
    return out


def _record_name(i: int, row: dict[str, Any]) -> str:
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


# ----- probe rows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSpec:
    """How probe rows become token ids, in one object: the rows' prompt and solution fields, whether the
    prompt is wrapped as a user turn with the tokenizer's chat template (None: if it has one), and the
    longest sequence in tokens (a longer row loses the end of its solution)."""

    prompt_field: str = "prompt"
    solution_field: str = "solution"
    chat_template: bool | None = None
    max_length: int | None = 1024  # None: no limit

    def __post_init__(self) -> None:
        if self.max_length is not None and (int(self.max_length) != self.max_length or self.max_length < 2):
            raise CircuitPeftError(f"max_length must be an integer >= 2 tokens or None, got {self.max_length!r}")

    @classmethod
    def resolve(cls, spec: "ProbeSpec | None", **fields: Any) -> "ProbeSpec":
        """``spec``, or one made of the loose keyword ``fields`` (a public function's ``prompt_field=`` ...);
        giving both a spec and a non-default loose field is refused."""
        if spec is None:
            return cls(**fields)
        default = cls()
        clash = [k for k, v in fields.items() if v != getattr(default, k)]
        if clash:
            raise CircuitPeftError(f"give either spec= or {', '.join(f'{k}=' for k in clash)}, not both")
        return spec


@dataclass
class EncodedProbe:
    """A probe row as token ids: ``ids`` = prompt + solution, the last ``n_solution`` are scored."""

    ids: list[int]
    n_solution: int


def encode_probe(tokenizer: Any, data: Any, prompt_field: str = "prompt", solution_field: str = "solution",
                 chat_template: bool | None = None, max_length: int | None = 1024, spec: ProbeSpec | None = None
                 ) -> list[EncodedProbe]:
    """Tokenise probe rows (prompt, solution) as ``spec`` (or the loose fields) says; rows with
    ``prompt_ids``/``solution_ids`` are used as given. The solution tokens follow the prompt tokens
    directly and end with EOS. Raises ``ValueError`` for an empty data set or a row without prompt or
    solution text.
    """
    spec = ProbeSpec.resolve(spec, prompt_field=prompt_field, solution_field=solution_field,
                             chat_template=chat_template, max_length=max_length)
    prompt_field, solution_field, chat_template, max_length = (spec.prompt_field, spec.solution_field,
                                                               spec.chat_template, spec.max_length)
    rows = _rows(data)
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat_template is None else chat_template
    out = []
    for i, r in enumerate(rows):
        if "prompt_ids" in r and "solution_ids" in r:  # already tokenised
            prompt_ids, sol_ids = [int(t) for t in r["prompt_ids"]], [int(t) for t in r["solution_ids"]]
            if not prompt_ids or not sol_ids:
                raise CircuitPeftError(f"probe row {i} has an empty prompt_ids or solution_ids list")
            ids = (prompt_ids + sol_ids)[:max_length]
            if len(ids) <= len(prompt_ids):
                raise CircuitPeftError(f"probe row {i}: the prompt alone fills max_length={max_length}; raise max_length")
            out.append(EncodedProbe(ids, len(ids) - len(prompt_ids)))
            continue
        if tokenizer is None:
            raise CircuitPeftError("probe rows (prompt, solution) are text: pass the model's tokenizer "
                             "(or give token ids as prompt_ids / solution_ids)")
        for field, what in ((prompt_field, "prompt"), (solution_field, "solution")):
            v = r.get(field)
            if not isinstance(v, str) or not v.strip():
                have = ", ".join(sorted(r)) or "nothing"
                raise CircuitPeftError(f"probe row {i} has no {what} text in field {field!r} (it has: {have}); "
                                 f"choose the field with {what}_field= / --{what}-field")
        if use_chat:
            prompt_ids = build_prompt_ids(tokenizer, r[prompt_field], style="chat")
        else:
            prompt_ids = tokenizer(r[prompt_field] + "\n")["input_ids"]
        sol_ids = tokenizer(r[solution_field], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            sol_ids = sol_ids + [tokenizer.eos_token_id]
        ids = (prompt_ids + sol_ids)[:max_length]
        n_sol = len(ids) - len(prompt_ids)
        if n_sol < 1:
            raise CircuitPeftError(f"probe row {i}: the prompt alone fills max_length={max_length}; raise max_length")
        out.append(EncodedProbe(ids, n_sol))
    return out


def collate_probe(rows: Sequence[EncodedProbe], pad_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch plus ``labels`` (B, T): next-token targets, -100 off the solution.

    ``labels[b, t]`` is the token at ``t + 1`` when that token is a solution token, so the
    cross-entropy of ``logits[:, t]`` against ``labels[:, t]`` is the solution loss.
    ``n_keep``: how many final positions carry logits that matter (for ``logits_to_keep``).
    """
    batch = left_pad([r.ids for r in rows], pad_id)
    T = batch["input_ids"].shape[1]
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
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


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in its own dtype when that is wider (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----- forward helpers -------------------------------------------------------------------------


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
    :func:`collate_probe` (the same for every group). One group at a time: the (n_valid, V) log-softmax of a
    group stays small (all groups at once is several times slower per element on a CPU).
    """
    K = logits.shape[1]
    lab = labels[:, -K:].to(logits.device)
    valid = lab != -100
    target = lab[valid]
    by_group = logits.view(groups, lab.shape[0], K, -1)
    return torch.stack([F.cross_entropy(at_least_float32(g[valid]), target, reduction="sum") for g in by_group])
