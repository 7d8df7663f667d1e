"""The dataset formats ``circuit-peft train`` reads: TRL's standard ones and question/answer rows.

One file (or hub split) holds one format, found from its first row:

- ``messages`` (TRL's conversational language-modeling rows): a list of ``{"role", "content"}`` turns whose
  last turn is the assistant's; that turn is the completion, the turns before it the prompt. The rows
  become TRL prompt/completion rows (``{"prompt": [...], "completion": [turn]}``).
- ``prompt``/``completion``: two strings (TRL's "standard" rows: the prompt is used as written, the
  tokenizer's special tokens and EOS are added as TRL adds them) or two lists of turns (conversational).
- ``question``/``answer`` (field names configurable): the prompt is built by
  :func:`~circuit_peft.taskdata.prompts.build_prompt` (chat template, or few-shot on a base model).

Conversational rows are turned into text by TRL's :func:`trl.data_utils.maybe_apply_chat_template`
(see :func:`~circuit_peft.taskdata.prompts.row_prompt`); a tokenizer without a chat template refuses them
(:func:`data_style`). ``text`` rows (plain language modeling) have no prompt to answer and are refused.

:func:`task_rows` checks every row (a missing field, an empty completion, no assistant turn, a gold the
answer checker cannot read) and names the row as ``file:line`` with the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import CircuitPeftError, located

FORMATS: tuple[str, ...] = ("messages", "prompt_completion", "question_answer")
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


def row_places(source: str, n: int, split: str | None = None) -> list[str]:
    """Where each of the first ``n`` rows of ``source`` is, for messages: ``file:line`` for .jsonl
    (blank lines skipped as the reader skips them), ``file:line`` for .csv (one line per row after the
    header), ``file: row k`` for .json, ``source[split] row k`` for a hub dataset or generated rows."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".jsonl", ".ndjson"):
        lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
        numbers = [i for i, line in enumerate(lines, 1) if line.strip()]
        return [f"{source}:{k}" for k in numbers[:n]]
    if path.is_file() and suffix == ".csv":
        return [f"{source}:{i + 2}" for i in range(n)]
    if path.is_file():
        return [f"{source}: row {i + 1}" for i in range(n)]
    where = f"{source}[{split}]" if split else source
    return [f"{where} row {i + 1}" for i in range(n)]


def _is_turns(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def row_format(row: dict[str, Any], question_field: str = "question", answer_field: str = "answer") -> str | None:
    """``"messages"``, ``"prompt_completion"``, ``"question_answer"`` or None (none of their fields)."""
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if question_field in row or answer_field in row:
        return "question_answer"
    return None


def is_conversational_row(row: dict[str, Any]) -> bool:
    """Whether a (normalised) row's prompt is a list of turns that needs a chat template."""
    return _is_turns(row.get("prompt")) or _is_turns(row.get("messages"))


def _check_turns(turns: Any, where: str, field: str) -> None:
    """Every turn a ``{"role", "content"}`` dict with a known role and string content."""
    if not isinstance(turns, list) or not turns:
        raise located(where, f"field {field!r} must be a non-empty list of {{'role', 'content'}} turns, got {turns!r:.80}")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise located(where, f"field {field!r}, turn {k}: a turn is a {{'role', 'content'}} dict, got {turn!r:.80}")
        if turn["role"] not in ROLES:
            raise located(where, f"field {field!r}, turn {k}: unknown role {turn['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(turn["content"], str):
            raise located(where, f"field {field!r}, turn {k}: content must be text, got {turn['content']!r:.80}")


def _assistant_completion(turns: list[dict[str, Any]], where: str, field: str) -> None:
    """The last turn must be the assistant's, with text."""
    if not any(t["role"] == "assistant" for t in turns):
        raise located(where, f"field {field!r}: no assistant turn (the last assistant turn is the completion)")
    if turns[-1]["role"] != "assistant":
        raise located(where, f"field {field!r}: the last turn is {turns[-1]['role']!r}; it must be the assistant "
                             "turn that answers the turns before it")
    if not turns[-1]["content"].strip():
        raise located(where, f"field {field!r}: the last assistant turn is empty")


def _messages_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``messages`` row as a conversational prompt/completion row (other fields kept)."""
    turns = row["messages"]
    _check_turns(turns, where, "messages")
    _assistant_completion(turns, where, "messages")
    if len(turns) < 2:
        raise located(where, "field 'messages': only an assistant turn; the prompt (a user turn before it) is missing")
    rest = {k: v for k, v in row.items() if k != "messages"}
    return {**rest, "prompt": turns[:-1], "completion": turns[-1:]}


def _prompt_completion_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a prompt/completion row: two non-empty strings, or two lists of turns."""
    for field in ("prompt", "completion"):
        if field not in row:
            raise located(where, f"no {field!r} field (fields: {sorted(row)}); prompt/completion rows need both")
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        for field in ("prompt", "completion"):
            if not row[field].strip():
                raise located(where, f"field {field!r} is empty")
        return row
    if isinstance(prompt, list) and isinstance(completion, list):
        _check_turns(prompt, where, "prompt")
        _check_turns(completion, where, "completion")
        _assistant_completion(completion, where, "completion")
        return row
    raise located(where, "fields 'prompt' and 'completion' must both be strings or both be lists of turns, got "
                         f"{type(prompt).__name__} and {type(completion).__name__}")


def _question_answer_row(row: dict[str, Any], where: str, question_field: str, answer_field: str) -> dict[str, Any]:
    for field in (question_field, answer_field):
        if field not in row:
            raise located(where, f"no {field!r} field (fields: {sorted(row)}); use --question-field / --answer-field, "
                                 "or give 'messages' or 'prompt'/'completion' rows")
    if not isinstance(row[question_field], str) or not row[question_field].strip():
        raise located(where, f"field {question_field!r} is empty or not text ({row[question_field]!r:.80})")
    if row[answer_field] is None or not str(row[answer_field]).strip():
        raise located(where, f"field {answer_field!r} is empty")
    return row


def _row_kind(row: dict[str, Any], fmt: str) -> str:
    """``"question_answer"``, ``"conversational"`` or ``"text"``: what the rows of one run must share."""
    if fmt == "question_answer":
        return fmt
    return "conversational" if is_conversational_row(row) else "text"


def task_rows(rows: Sequence[dict[str, Any]], checker: Any = None, question_field: str = "question",
              answer_field: str = "answer", places: Sequence[str] | None = None, what: str = "training"
              ) -> tuple[list[dict[str, Any]], str]:
    """Check ``rows`` and return them normalised, with their kind.

    Returns ``(rows, kind)``: ``kind`` is ``"question_answer"`` (rows passed through ``checker.prepare``,
    e.g. listed options for ``--answer choice``), ``"conversational"`` (prompt/completion turns; ``messages``
    rows split there) or ``"text"`` (prompt/completion strings). Every row must have the first row's kind.
    ``checker`` (an :mod:`~circuit_peft.evaluate.answers` checker) must read a gold answer from each row
    when it generates. ``places`` name the rows in errors (default ``"<what> row k"``)."""
    places = list(places or [])
    out: list[dict[str, Any]] = []
    kind = None
    for i, row in enumerate(rows):
        where = places[i] if i < len(places) else f"{what} row {i + 1}"
        if not isinstance(row, dict):
            raise located(where, f"a row is an object with fields, got {type(row).__name__}")
        fmt = row_format(row, question_field, answer_field)
        if fmt is None:
            hint = (" ('text' rows are plain language modeling: they have no prompt to answer)" if "text" in row
                    else "")
            raise located(where, f"none of the fields 'messages', 'prompt'/'completion' or {question_field!r}/"
                                 f"{answer_field!r} (fields: {sorted(row)}){hint}")
        row = _normalise(row, fmt, where, question_field, answer_field, checker)
        this = _row_kind(row, fmt)
        if kind is None:
            kind = this
        elif this != kind:
            raise located(where, f"a {this.replace('_', '/')} row among {kind.replace('_', '/')} rows; one file holds "
                                 "one format")
        out.append(row)
    if not out:
        raise CircuitPeftError(f"the {what} set is empty")
    return out, kind


def _normalise(row: dict[str, Any], fmt: str, where: str, question_field: str, answer_field: str,
               checker: Any) -> dict[str, Any]:
    """One checked row in its run shape, its gold read by ``checker`` (refused when it has none)."""
    if fmt == "messages":
        row = _messages_row(row, where)
    elif fmt == "prompt_completion":
        row = _prompt_completion_row(row, where)
    else:
        row = _question_answer_row(row, where, question_field, answer_field)
        if checker is not None:
            try:
                row = checker.prepare(row)
            except CircuitPeftError as err:
                raise located(where, str(err)) from None
    if checker is not None and getattr(checker, "generates", True) and checker.gold(row) is None:
        field = answer_field if fmt == "question_answer" else ("messages" if fmt == "messages" else "completion")
        value = row[answer_field] if fmt == "question_answer" else row["completion"]
        raise located(where, f"field {field!r}: no {getattr(checker, 'name', 'gold')} answer in {value!r:.120} "
                             "(choose the checker with --answer)")
    return row


def rows_kind(rows: Sequence[dict[str, Any]], question_field: str = "question", answer_field: str = "answer") -> str:
    """The kind (see :func:`task_rows`) of rows :func:`task_rows` returned, read from the first."""
    row = rows[0]
    fmt = row_format(row, question_field, answer_field)
    return _row_kind(row, fmt or "question_answer")


def data_style(tokenizer: Any, kind: str, prompt_style: str | None, log: Callable[[str], None] | None = None) -> str:
    """The prompt style of a run on rows of ``kind`` (see :func:`task_rows`): question/answer rows keep
    ``prompt_style`` (default: chat with a template, else few-shot); conversational rows are ``"chat"``
    and need the tokenizer's chat template; prompt/completion strings are ``"text"`` (used as written)."""
    from ..taskdata.prompts import default_prompt_style

    if kind == "question_answer":
        return prompt_style or default_prompt_style(tokenizer, log=log)
    if prompt_style is not None:
        raise CircuitPeftError(f"--prompt-style {prompt_style}: applies to question/answer rows; "
                               f"{kind} rows carry their own prompt")
    if kind == "conversational":
        if not getattr(tokenizer, "chat_template", None):
            raise CircuitPeftError("conversational rows ('messages', or prompt/completion turns) need a chat "
                                   "template and this model's tokenizer has none (a base model): give prompt/"
                                   "completion strings or question/answer rows instead, or use a chat model")
        return "chat"
    return "text"


__all__ = ["FORMATS", "data_style", "is_conversational_row", "row_format", "row_places", "rows_kind", "task_rows"]
