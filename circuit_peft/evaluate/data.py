"""Loaders for evaluation data: GSM8K, MMLU, TruthfulQA and plain text.

Each loader reads a local data folder (the layout of ``../shared/data``: ``gsm8k/test.jsonl``,
``mmlu/test/<subject>_test.csv``, ``truthfulqa/TruthfulQA.csv``, ``text/*.txt``) when
``data_dir`` is given, else the Hugging Face hub (``openai/gsm8k``, ``cais/mmlu``,
``truthfulqa/truthful_qa``). Rows come back as plain dicts with fixed field names.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

# Our choice: a fixed, varied subset of MMLU (knowledge, reasoning, math) of ~1,300 test rows.
DEFAULT_MMLU_SUBJECTS: tuple[str, ...] = (
    "elementary_mathematics",
    "high_school_geography",
    "high_school_psychology",
    "marketing",
    "us_foreign_policy",
    "world_religions",
)
DEFAULT_TEXT_FILE = "tinyshakespeare.txt"
_LETTERS = "ABCD"


def _as_path(data_dir: str | Path) -> Path:
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data folder {path} does not exist")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file (blank lines skipped); a malformed line raises ``ValueError`` naming it."""
    from ..files import read_rows

    return read_rows(path)


def _require_fields(rows: list[dict[str, Any]], fields: tuple[str, ...], where: str) -> None:
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{where}: row {i} has no field(s) {missing} (fields: {sorted(row)})")


def load_gsm8k(data_dir: str | Path | None = None, split: str = "test", limit: int | None = None) -> list[dict]:
    """GSM8K rows ``{"question", "answer"}`` (answers end with ``#### n``).

    ``data_dir``: a folder holding ``gsm8k/<split>.jsonl`` or ``<split>.jsonl``, or a jsonl file;
    ``None`` loads ``openai/gsm8k`` (config ``main``) from the hub. ``limit`` keeps the first rows.
    """
    if data_dir is None:
        from datasets import load_dataset

        rows = [dict(r) for r in load_dataset("openai/gsm8k", "main", split=split)]
        where = f"openai/gsm8k[{split}]"
    else:
        path = _as_path(data_dir)
        if path.is_dir():
            candidates = [path / "gsm8k" / f"{split}.jsonl", path / f"{split}.jsonl"]
            found = [p for p in candidates if p.exists()]
            if not found:
                raise FileNotFoundError(f"no GSM8K {split} split under {path}: "
                                        f"looked for {[str(c) for c in candidates]}")
            path = found[0]
        rows = read_jsonl(path)
        where = str(path)
    rows = rows[:limit] if limit is not None else rows
    _require_fields(rows, ("question", "answer"), where)
    return rows


def _mmlu_rows_from_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of an MMLU csv: with a header ``question,choice0..3,answer`` (index) or the original
    header-less ``question,A,B,C,D,letter`` layout."""
    with open(path, encoding="utf-8", newline="") as fh:
        table = [r for r in csv.reader(fh) if r]
    if table and table[0][0].strip().lower() == "question":
        table = table[1:]
    rows = []
    for lineno, r in enumerate(table, 1):
        if len(r) != 6:
            raise ValueError(f"{path}: row {lineno} has {len(r)} columns, expected 6 (question, 4 choices, answer)")
        answer = r[5].strip()
        if answer.upper() in _LETTERS and len(answer) == 1:
            index = _LETTERS.index(answer.upper())
        elif answer.isdigit() and int(answer) < 4:
            index = int(answer)
        else:
            raise ValueError(f"{path}: row {lineno} answer {answer!r} is neither 0-3 nor A-D")
        rows.append({"question": r[0], "choices": [c for c in r[1:5]], "answer": index})
    return rows


def _mmlu_root(data_dir: str | Path) -> Path:
    root = _as_path(data_dir)
    return root / "mmlu" if (root / "mmlu").is_dir() else root


def mmlu_subjects_in(data_dir: str | Path, split: str = "test") -> list[str]:
    """The MMLU subjects present in a data folder (``mmlu/<split>/<subject>_<split>.csv``), sorted."""
    folder = _mmlu_root(data_dir) / split
    return sorted(p.name[: -len(f"_{split}.csv")] for p in folder.glob(f"*_{split}.csv")) if folder.is_dir() else []


def load_mmlu(
    data_dir: str | Path | None = None,
    subjects: tuple[str, ...] | list[str] | None = None,
    split: str = "test",
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """MMLU by subject: ``{subject: {"eval": rows, "dev": rows or []}}``, rows ``{"question",
    "choices" (4 strings), "answer" (0-3)}``.

    ``data_dir``: a folder with ``mmlu/<split>/<subject>_<split>.csv`` (or ``<split>/...``);
    a ``dev`` split next to it is used for the few-shot examples when present. ``None`` loads
    ``cais/mmlu`` from the hub (splits ``test`` and ``dev``). ``subjects`` defaults to
    :data:`DEFAULT_MMLU_SUBJECTS`; a subject that is missing raises ``ValueError``.
    """
    subjects = tuple(subjects) if subjects else DEFAULT_MMLU_SUBJECTS
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    if data_dir is None:
        from datasets import load_dataset

        for subject in subjects:
            ds = load_dataset("cais/mmlu", subject)
            out[subject] = {
                "eval": [{"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"])}
                         for r in ds[split]],
                "dev": [{"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"])}
                        for r in ds["dev"]] if "dev" in ds else [],
            }
        return out
    root = _mmlu_root(data_dir)
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no MMLU {split} folder under {root} (expected {folder}/<subject>_{split}.csv)")
    available = mmlu_subjects_in(data_dir, split)
    missing = [s for s in subjects if s not in available]
    if missing:
        raise ValueError(f"MMLU subjects {missing} not found in {folder}; available: {available}. "
                         "Pass subjects=... (CLI: --mmlu-subjects) naming available ones")
    for subject in subjects:
        dev_path = root / "dev" / f"{subject}_dev.csv"
        out[subject] = {
            "eval": _mmlu_rows_from_csv(folder / f"{subject}_{split}.csv"),
            "dev": _mmlu_rows_from_csv(dev_path) if dev_path.exists() else [],
        }
    return out


def _split_answers(text: str) -> list[str]:
    return [a.strip() for a in text.split(";") if a.strip()]


def load_truthfulqa(data_dir: str | Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """TruthfulQA rows ``{"question", "best" (str), "incorrect" (list of str)}``.

    ``data_dir``: a folder with ``truthfulqa/TruthfulQA.csv`` (or ``TruthfulQA.csv``), or the csv
    itself; ``None`` loads ``truthfulqa/truthful_qa`` (config ``generation``, split ``validation``).
    Rows without a best answer or without incorrect answers raise ``ValueError``.
    """
    if data_dir is None:
        from datasets import load_dataset

        ds = load_dataset("truthfulqa/truthful_qa", "generation", split="validation")
        rows = [{"question": r["question"], "best": r["best_answer"], "incorrect": list(r["incorrect_answers"])}
                for r in ds]
        where = "truthfulqa/truthful_qa"
    else:
        path = _as_path(data_dir)
        if path.is_dir():
            candidates = [path / "truthfulqa" / "TruthfulQA.csv", path / "TruthfulQA.csv"]
            found = [p for p in candidates if p.exists()]
            if not found:
                raise FileNotFoundError(f"no TruthfulQA.csv under {path}: looked for {[str(c) for c in candidates]}")
            path = found[0]
        with open(path, encoding="utf-8", newline="") as fh:
            table = list(csv.DictReader(fh))
        if table:
            _require_fields(table, ("Question", "Best Answer", "Incorrect Answers"), str(path))
        rows = [{"question": r["Question"], "best": (r["Best Answer"] or "").strip(),
                 "incorrect": _split_answers(r["Incorrect Answers"] or "")} for r in table]
        where = str(path)
    rows = rows[:limit] if limit is not None else rows
    for i, r in enumerate(rows):
        if not r["best"] or not r["incorrect"]:
            raise ValueError(f"{where}: row {i} ({r['question'][:60]!r}) needs a best answer and incorrect answers")
    return rows


def load_text(path: str | Path) -> str:
    """Plain text for KL / perplexity: a ``.txt`` file, or a data folder holding ``text/tinyshakespeare.txt``."""
    p = _as_path(path)
    if p.is_dir():
        candidates = [p / "text" / DEFAULT_TEXT_FILE, p / DEFAULT_TEXT_FILE]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise FileNotFoundError(f"no text file under {p}: looked for {[str(c) for c in candidates]}")
        p = found[0]
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{p} is empty; KL needs some general text")
    return text
