"""Answer extraction and checking (used by evaluation, SFT answer weights and pivotal-token mining).

Pluggable: anything with ``extract(text) -> str | None`` and ``gold(row) -> str | None``
can stand in for :class:`NumberAnswer`. The checkers ``circuit-peft train --answer`` chooses are
registered by name in :data:`ANSWER_CHECKERS` (:func:`answer_checker` builds one):

- ``number``: the final number (:class:`NumberAnswer`);
- ``choice``: an option letter among the given options (:class:`ChoiceAnswer`);
- ``exact``: the answer string, compared after normalising case, spaces and end punctuation (:class:`ExactAnswer`);
- ``none``: no checker: nothing is generated; the measurement is the completion loss (:class:`NoAnswer`).

A row's gold is read from its answer field (``question``/``answer`` rows) or, for TRL's
``prompt``/``completion`` rows, from the completion's text (a string, or the content of its last message).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..errors import CircuitPeftError

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


def completion_text(row: dict[str, Any]) -> str | None:
    """The text of a TRL ``completion``: the string, or the content of a conversational completion's
    last message; None when the row has no completion."""
    value = row.get("completion")
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    return value if isinstance(value, str) else None


def _gold_source(row: dict[str, Any], answer_field: str) -> tuple[str, bool]:
    """``(text, from_answer_field)``: the row's answer field, else its completion's text."""
    if answer_field in row:
        return str(row[answer_field]), True
    text = completion_text(row)
    if text is None:
        raise CircuitPeftError(f"row has no {answer_field!r} field and no completion (fields: {sorted(row)}); "
                               "pass answer_field=... to name the gold-answer column")
    return text, False


@dataclass
class NumberAnswer:
    """Final-number answers. ``answer_field`` holds the gold: a GSM8K answer (``#### n``) or a bare number;
    a row with a completion instead has the final number of the completion as its gold."""

    answer_field: str = "answer"
    name: ClassVar[str] = "number"
    generates: ClassVar[bool] = True

    def extract(self, text: str) -> str | None:
        return extract_model_answer(text)

    def gold(self, row: dict[str, Any]) -> str | None:
        value, from_field = _gold_source(row, self.answer_field)
        if not from_field:
            return self.extract(value)
        return extract_gsm8k_gold(value) if "####" in value else normalize_number(value)

    def spans(self, completion: str, gold: str) -> list[list[int]]:
        """Char spans ``[start, stop)`` of the gold in a training completion: every whole-number occurrence."""
        pattern = r"(?<![\d.])" + re.escape(gold) + r"(?!\d|\.\d)"
        return [[m.start(), m.end()] for m in re.finditer(pattern, completion)]

    def prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        """A ``question``/``answer`` row as the prompt will show it (unchanged for numbers)."""
        return row


OPTION_FIELDS: tuple[str, ...] = ("options", "choices")  # a question/answer row's listed options
_LETTERS = string.ascii_uppercase


def row_options(row: dict[str, Any]) -> list[str] | None:
    """The options a row lists (``options`` or ``choices``: a list of texts, or the hub's
    ``{"text": [...], "label": [...]}``), else None."""
    for name in OPTION_FIELDS:
        value = row.get(name)
        if isinstance(value, dict) and isinstance(value.get("text"), list):
            value = value["text"]
        if isinstance(value, list) and value:
            return [str(v) for v in value]
    return None


@dataclass
class ChoiceAnswer:
    """Multiple-choice answers: an option letter (``A``, ``B``, ...). The gold is a letter, an option's
    index (0-based, as MMLU stores it) or an option's text when the row lists ``options``/``choices``;
    :meth:`prepare` writes those options under the question (``A) ...``) and the gold as its letter.
    The model's letter is read after "answer is"/"answer:", else as a leading label (``B``, ``B)``,
    ``(B)``, ``B.``), else as the last parenthesised letter ``(B)``."""

    answer_field: str = "answer"
    question_field: str = "question"
    name: ClassVar[str] = "choice"
    generates: ClassVar[bool] = True

    def extract(self, text: str) -> str | None:
        letter = r"\(?([A-Z])\)?(?![A-Za-z0-9])"
        found = re.findall(r"(?i:answer)\s*(?:is|:|=)\s*[:\s]*\**\s*" + letter, text)
        if found:
            return found[-1]
        lead = re.match(r"\s*\(?([A-Z])(?:\)|\.|:|\s*$|\s*\n)", text)
        if lead:
            return lead.group(1)
        found = re.findall(r"\(([A-Z])\)", text)
        return found[-1] if found else None

    def gold(self, row: dict[str, Any]) -> str | None:
        value, from_field = _gold_source(row, self.answer_field)
        if not from_field:
            return self.extract(value)
        options, value = row_options(row), value.strip()
        n = len(options) if options else len(_LETTERS)
        if options and value in options:
            return _LETTERS[options.index(value)]
        if options and value.isdigit():
            return _LETTERS[int(value)] if int(value) < n else None
        if len(value) == 1 and value.upper() in _LETTERS[:n]:
            return value.upper()
        got = self.extract(value)
        return got if got is not None and got in _LETTERS[:n] else None

    def spans(self, completion: str, gold: str) -> list[list[int]]:
        """The last occurrence of the gold letter as a word in a training completion."""
        found = list(re.finditer(r"(?<![A-Za-z0-9])" + re.escape(gold) + r"(?![A-Za-z0-9])", completion))
        return [[found[-1].start(), found[-1].end()]] if found else []

    def prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        """A ``question``/``answer`` row with its options listed under the question (``A) ...`` one a line)
        and its gold written as the letter; rows without options are returned as they are."""
        options = row_options(row)
        if not options or self.question_field not in row or self.answer_field not in row:
            return row
        if len(options) > len(_LETTERS):
            raise CircuitPeftError(f"{len(options)} options: at most {len(_LETTERS)} (A-Z) are supported")
        listed = "\n".join(f"{_LETTERS[i]}) {text}" for i, text in enumerate(options))
        gold = self.gold(row)
        return {**row, self.question_field: f"{str(row[self.question_field]).rstrip()}\n\n{listed}",
                self.answer_field: gold if gold is not None else row[self.answer_field]}


_END_PUNCTUATION = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb"
_ANSWER_LINE_RE = re.compile(r"answer\s*(?:is|:|=)\s*(.+)", re.IGNORECASE)


def normalize_text(text: str) -> str:
    """Case-folded, runs of white space made one space, punctuation and quotes stripped from both ends."""
    return " ".join(text.casefold().split()).strip(_END_PUNCTUATION + " ")


@dataclass
class ExactAnswer:
    """Short string answers, compared after :func:`normalize_text`. The model's answer is the rest of
    the line after its last "answer is"/"answer:", else its first non-empty line; a completion's gold
    is read the same way, an answer field's is the whole field."""

    answer_field: str = "answer"
    name: ClassVar[str] = "exact"
    generates: ClassVar[bool] = True

    def extract(self, text: str) -> str | None:
        found = _ANSWER_LINE_RE.findall(text)
        line = found[-1] if found else next((x for x in text.splitlines() if x.strip()), "")
        return normalize_text(line) or None

    def gold(self, row: dict[str, Any]) -> str | None:
        value, from_field = _gold_source(row, self.answer_field)
        return (normalize_text(value) or None) if from_field else self.extract(value)

    def spans(self, completion: str, gold: str) -> list[list[int]]:
        """The last case-insensitive occurrence of the gold in a training completion."""
        pattern = r"\s+".join(re.escape(w) for w in gold.split())
        found = list(re.finditer(pattern, completion, re.IGNORECASE))
        return [[found[-1].start(), found[-1].end()]] if found else []

    def prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        return row


@dataclass
class NoAnswer:
    """No answer checking: nothing is generated; before/after is the held-out completion loss. Mining
    pivotal tokens and the CCA update need a checker and refuse it."""

    answer_field: str = "answer"
    name: ClassVar[str] = "none"
    generates: ClassVar[bool] = False

    def extract(self, text: str) -> str | None:
        return None

    def gold(self, row: dict[str, Any]) -> str | None:
        return None

    def spans(self, completion: str, gold: str) -> list[list[int]]:
        return []

    def prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        return row


ANSWER_CHECKERS: dict[str, type] = {c.name: c for c in (NumberAnswer, ChoiceAnswer, ExactAnswer, NoAnswer)}


def answer_checker(name: str, answer_field: str = "answer", question_field: str = "question"):
    """The checker registered as ``name`` in :data:`ANSWER_CHECKERS`, reading the gold from ``answer_field``."""
    if name not in ANSWER_CHECKERS:
        raise CircuitPeftError(f"--answer {name!r}: choose one of {', '.join(ANSWER_CHECKERS)}")
    cls = ANSWER_CHECKERS[name]
    return cls(answer_field, question_field) if cls is ChoiceAnswer else cls(answer_field)


def is_correct(text: str, gold: str | None, fmt: AnswerFormat | None = None) -> bool:
    """Whether a model's answer ``text`` has the gold answer."""
    if gold is None:
        return False
    got = (fmt or NumberAnswer()).extract(text)
    return got is not None and got == gold
