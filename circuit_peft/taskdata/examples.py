"""Task examples as token ids: THE encoder of "prompt + answer" (one truncation policy), the pivotal-weighted
rows SFT trains on, and the probe rows the locators score.

A tokenized example is ``input_ids`` (prompt, then answer), its loss mask (``labels``: -100 on the prompt;
``completion_mask``), per-token ``token_weights`` and ``undesired_ids`` (pivotal SFT) and its prompt length.
Every wing (SFT, the locators, CircuitSeer's baselines, the demo, the benchmarks) encodes through here:

* :func:`encode_text_pair`: THE tokenization of a prompt + completion text pair;
* :func:`fit_to_length`: THE truncation policy for a prompt + answer longer than ``max_length``;
* :func:`answer_example`: prompt and answer ids -> ``{"input_ids", "labels"}`` (loss on the answer);
* :func:`build_pivotal_dataset`: prompt/completion, text, token or contrastive rows -> pivotal SFT rows;
* :func:`encode_probe`: probe rows (prompt, solution text; their ids; or tokenized task rows) -> ids + the
  number of solution tokens, as :func:`~circuit_peft.taskdata.collate.collate_probe` batches them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CircuitPeftError
from .losses import IGNORE_INDEX
from .prompts import build_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WEIGHT_COLUMNS: tuple[str, ...] = ("token_weights", "undesired_ids")
DEFAULT_PIVOTAL_WEIGHT = 5.0


def as_rows(data: Any) -> list[dict[str, Any]]:
    """A list of dicts from a list, a ``datasets.Dataset`` or any iterable of mappings."""
    if data is None:
        raise CircuitPeftError("no data given: pass a list of dicts or a datasets.Dataset")
    rows = [dict(r) for r in data]
    if not rows:
        raise CircuitPeftError("the data set is empty: give at least one row")
    return rows


# ----- prompt + answer ----------------------------------------------------------------------------------------


def fit_to_length(prompt_ids: Sequence[int], answer_ids: Sequence[int], max_length: int | None,
                  min_answer: int = 1) -> tuple[list[int], list[int]]:
    """THE truncation policy: ``(prompt, answer)`` of at most ``max_length`` tokens together (None: no limit).

    The answer's end is cut first; the answer keeps at least ``min_answer`` tokens (or all it has), and a
    prompt that then does not fit loses its start (its end, next to the answer, stays)."""
    prompt, answer = list(prompt_ids), list(answer_ids)
    if max_length is None or len(prompt) + len(answer) <= max_length:
        return prompt, answer
    answer = answer[: max(max_length - len(prompt), min_answer)]
    keep = max(max_length - len(answer), 0)
    return prompt[len(prompt) - keep:], answer


def answer_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], max_length: int | None = None,
                   min_answer: int = 1) -> dict[str, list[int]]:
    """One tokenized example, loss on the answer: ``input_ids`` = prompt + answer (:func:`fit_to_length`) and
    ``labels`` (-100 on the prompt, the token itself on the answer), aligned with ``input_ids``."""
    prompt, answer = fit_to_length(prompt_ids, answer_ids, max_length, min_answer)
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def split_task_row(row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids)`` of a tokenized task row (``input_ids``, ``labels``): the answer starts at the
    first label (a row without one is all prompt)."""
    ids = [int(t) for t in row["input_ids"]]
    start = next((i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX), len(ids))
    return ids[:start], ids[start:]


def encode_text_pair(tokenizer: Any, prompt: str, completion: str, add_special_tokens: bool = True,
                     add_eos: bool = True) -> tuple[list[int], list[int]]:
    """THE tokenization of a prompt + completion text pair (SFT rows, probe rows, the demo, the benchmarks):
    ``(prompt ids, completion ids)``, the prompt with the tokenizer's special tokens (``add_special_tokens``;
    False for chat-template prompts, which hold them), the completion without, then EOS when ``add_eos`` and the
    tokenizer has one. The completion's ids directly follow the prompt's (tokenized apart, so the split is exact)."""
    ids, mask, _ = _encode_text_row({"prompt": prompt, "completion": completion}, tokenizer, [], add_eos,
                                    add_special_tokens)
    n_prompt = mask.count(0)
    return ids[:n_prompt], ids[n_prompt:]


# ----- pivotal SFT rows --------------------------------------------------------------------------------


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


# ----- probe rows ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSpec:
    """How probe rows become token ids, in one object: the rows' prompt and solution fields, whether the
    prompt is wrapped as a user turn with the tokenizer's chat template (None: if it has one), and the
    longest sequence in tokens (a longer row loses the end of its solution: :func:`fit_to_length`)."""

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
    """Tokenise probe rows (prompt, solution) as ``spec`` (or the loose fields) says. Rows with
    ``prompt_ids``/``solution_ids`` are used as given, and so are tokenized task rows (``input_ids`` and
    ``labels``, e.g. :func:`build_pivotal_dataset`'s: the prompt is what precedes the first label). The
    solution tokens follow the prompt tokens directly and end with EOS. Raises ``ValueError`` for an empty
    data set or a row without prompt or solution text.
    """
    spec = ProbeSpec.resolve(spec, prompt_field=prompt_field, solution_field=solution_field,
                             chat_template=chat_template, max_length=max_length)
    use_chat = getattr(tokenizer, "chat_template", None) is not None if spec.chat_template is None else spec.chat_template
    out = []
    for i, r in enumerate(as_rows(data)):
        given = _given_probe_ids(i, r)
        prompt_ids, sol_ids = given if given is not None else _probe_text_ids(i, r, tokenizer, spec, use_chat)
        if spec.max_length is not None and len(prompt_ids) >= spec.max_length:
            raise CircuitPeftError(f"probe row {i}: the prompt alone fills max_length={spec.max_length}; "
                                   "raise max_length")
        prompt_ids, sol_ids = fit_to_length(prompt_ids, sol_ids, spec.max_length)
        out.append(EncodedProbe(prompt_ids + sol_ids, len(sol_ids)))
    return out


def _given_probe_ids(i: int, r: dict[str, Any]) -> tuple[list[int], list[int]] | None:
    """``(prompt ids, solution ids)`` of a row that holds token ids (``prompt_ids``/``solution_ids``, or a
    tokenized task row's ``input_ids``/``labels``); None for a text row."""
    if "prompt_ids" in r and "solution_ids" in r:
        prompt_ids, sol_ids = [int(t) for t in r["prompt_ids"]], [int(t) for t in r["solution_ids"]]
    elif "input_ids" in r and "labels" in r:
        prompt_ids, sol_ids = split_task_row(r)
    else:
        return None
    if not prompt_ids or not sol_ids:
        raise CircuitPeftError(f"probe row {i} has an empty prompt_ids or solution_ids list")
    return prompt_ids, sol_ids


def _probe_text_ids(i: int, r: dict[str, Any], tokenizer: Any, spec: ProbeSpec,
                    use_chat: bool) -> tuple[list[int], list[int]]:
    """``(prompt ids, solution ids + EOS)`` of a text probe row: the prompt as a chat user turn
    (``use_chat``) or followed by a newline."""
    if tokenizer is None:
        raise CircuitPeftError("probe rows (prompt, solution) are text: pass the model's tokenizer "
                               "(or give token ids as prompt_ids / solution_ids)")
    for field, what in ((spec.prompt_field, "prompt"), (spec.solution_field, "solution")):
        v = r.get(field)
        if not isinstance(v, str) or not v.strip():
            have = ", ".join(sorted(r)) or "nothing"
            raise CircuitPeftError(f"probe row {i} has no {what} text in field {field!r} (it has: {have}); "
                                   f"choose the field with {what}_field= / --{what}-field")
    prompt = r[spec.prompt_field]
    prompt = build_prompt(tokenizer, prompt, style="chat") if use_chat else prompt + "\n"
    return encode_text_pair(tokenizer, prompt, r[spec.solution_field], add_special_tokens=not use_chat)


__all__ = ["DEFAULT_PIVOTAL_WEIGHT", "EncodedProbe", "ProbeSpec", "WEIGHT_COLUMNS", "answer_example", "as_rows",
           "build_pivotal_dataset", "encode_probe", "encode_text_pair", "fit_to_length", "split_task_row"]
