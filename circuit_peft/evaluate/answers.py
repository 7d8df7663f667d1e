"""Answer extraction and checking (used by evaluation and by pivotal-token mining).

Pluggable: anything with ``extract(text) -> str | None`` and ``gold(row) -> str | None``
can stand in for :class:`NumberAnswer`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*[:\s]*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
_GSM8K_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_BOXED_RE = re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}")


def normalize_number(text: str) -> str | None:
    """Canonical string of a number: no ``$`` or thousands commas, no trailing ``.0``.

    ``"1,234.50" -> "1234.5"``, ``"$7" -> "7"``, ``"-3.0" -> "-3"``; ``None`` if not a number.
    """
    s = text.strip().replace("$", "").replace(",", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    if value == int(value):
        return str(int(value))
    return repr(value)


def extract_model_answer(text: str) -> str | None:
    """The final number of a model's answer: after "answer is" (or ``\\boxed{}``/``####``),
    else the last number in the text; ``None`` if there is none."""
    for pattern in (_GSM8K_RE, _BOXED_RE, _ANSWER_IS_RE):
        matches = pattern.findall(text)
        if matches:
            return normalize_number(matches[-1])
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def extract_gsm8k_gold(answer: str) -> str | None:
    """The gold number of a GSM8K answer (the text after ``####``); ``None`` if absent."""
    match = _GSM8K_RE.search(answer)
    return normalize_number(match.group(1)) if match else None


class AnswerFormat(Protocol):
    """How to read answers for one task."""

    def extract(self, text: str) -> str | None: ...

    def gold(self, row: dict[str, Any]) -> str | None: ...


@dataclass
class NumberAnswer:
    """Final-number answers. ``answer_field`` holds the gold: a GSM8K answer (``#### n``) or a bare number."""

    answer_field: str = "answer"

    def extract(self, text: str) -> str | None:
        return extract_model_answer(text)

    def gold(self, row: dict[str, Any]) -> str | None:
        if self.answer_field not in row:
            raise ValueError(
                f"row has no {self.answer_field!r} field (fields: {sorted(row)}); "
                "pass answer_field=... to name the gold-answer column"
            )
        value = str(row[self.answer_field])
        return extract_gsm8k_gold(value) if "####" in value else normalize_number(value)


def is_correct(text: str, gold: str | None, fmt: AnswerFormat | None = None) -> bool:
    """Whether a model's answer ``text`` has the gold answer."""
    if gold is None:
        return False
    got = (fmt or NumberAnswer()).extract(text)
    return got is not None and got == gold
