"""Reading and checking the rows a selector scores: fields, templates, tokenization, context length."""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Sequence

from ..errors import CircuitPeftError
from ..validation import context_length  # noqa: F401  (the one definition; select's modules import it from here)

logger = logging.getLogger(__name__)

LONG_PROMPT_POLICIES = ("truncate", "error")


def row_texts(rows: Any, field: str = "question", template: str | None = None, what: str = "question") -> list[str]:
    """One text per row: ``row[field]``, or ``template.format(**row)`` when a template is given.

    ``rows``: a ``datasets.Dataset`` or a sequence of dicts. Raises ``ValueError`` naming the row
    and field when a row lacks the field or holds an empty / non-string value.
    """
    if template is None and hasattr(rows, "column_names"):
        if field not in rows.column_names:
            raise CircuitPeftError(
                f"row 0 has no {what} field {field!r} (the data has columns {rows.column_names}); "
                f"choose the field with --{what}-field / {what}_field="
            )
        values = rows[field]
        iterable = ({field: v} for v in values)
    else:
        iterable = iter(rows)
    out = []
    for i, row in enumerate(iterable):
        if template is not None:
            try:
                text = template.format(**row)
            except KeyError as err:
                raise CircuitPeftError(
                    f"row {i} has no field {err.args[0]!r} used by the template {template!r} "
                    f"(row fields: {sorted(row)})"
                ) from None
        else:
            if not isinstance(row, dict) or field not in row:
                cols = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise CircuitPeftError(f"row {i} has no {what} field {field!r} (row fields: {cols}); "
                                 f"choose the field with --{what}-field / {what}_field=")
            text = row[field]
        if not isinstance(text, str) or not text.strip():
            raise CircuitPeftError(f"row {i}: the {what} field {field!r} is empty or not text ({text!r})")
        out.append(text)
    return out


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int, on_long: str = "truncate", what: str = "prompt",
    add_special_tokens: bool = True, offset: int = 0,
) -> list[list[int]]:
    """Token ids per text, at most ``max_length`` each.

    ``on_long="truncate"`` keeps the first ``max_length`` tokens and logs one warning with the
    count; ``"error"`` raises ``ValueError`` naming the first row too long (``offset`` is added to
    row numbers in messages).
    """
    if on_long not in LONG_PROMPT_POLICIES:
        raise CircuitPeftError(f"on_long must be one of {LONG_PROMPT_POLICIES}, got {on_long!r}")
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    long_rows = [i for i, x in enumerate(ids) if len(x) > max_length]
    if long_rows:
        first = long_rows[0]
        msg = (f"{len(long_rows)} {what}(s) are longer than the model's context of {max_length} tokens "
               f"(first: row {first + offset}, {len(ids[first])} tokens)")
        if on_long == "error":
            raise CircuitPeftError(msg + "; shorten them, or pass on_long='truncate' (--on-long truncate) to keep the "
                                   "first tokens")
        logger.warning("%s; keeping the first %d tokens of each", msg, max_length)
        ids = [x[:max_length] for x in ids]
    return [list(x) for x in ids]


def texts_fingerprint(texts: Sequence[str], *extra: Any) -> str:
    """A short sha256 of the texts (order matters) and any extra settings."""
    h = hashlib.sha256()
    for e in extra:
        h.update(repr(e).encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]
