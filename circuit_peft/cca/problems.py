"""A seeded generator of small arithmetic problems with GSM8K-style gold answers.

The family is chosen so that a small instruct model (SmolLM2-135M) is weak but sometimes right:
two-digit addition and subtraction, bare (``"What is 47 + 38?"``) or as one-sentence word
problems (SmolLM2 right on ~20 % of bare ones), a second skill, a single-digit factor times a
two-digit one (``"What is 7 * 38?"``, SmolLM2 right on 25 %), bare or as word problems, and a third,
comparison of two two-digit numbers (``"Which number is larger, 47 or 38?"``, answer 47; the larger or
the smaller, bare or as word problems), on which a small model is right about half the time
(``benchmarks/regime.py``).
Each row is ``{"id", "question", "answer", "kind", "a", "b", "op"}`` where ``answer`` is
a GSM8K solution ending in ``#### n`` (e.g. ``"47 + 38 = 85\\n#### 85"``).

Train and held-out problems are disjoint by construction: a problem's split is a hash of its
arithmetic ``(op, a, b)``, so the same sum never lands in both splits, whatever the seed, the
wording or the sizes asked for. Comparison problems are split by the unordered pair, so
``47 or 38`` and ``38 or 47`` (larger or smaller) always land in the same split.
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

Split = Literal["train", "test"]
ARITHMETIC_KINDS: tuple[str, ...] = ("add", "sub", "word_add", "word_sub")  # the default family
COMPARISON_KINDS: tuple[str, ...] = ("larger", "smaller", "word_larger", "word_smaller")
PROBLEM_KINDS: tuple[str, ...] = ARITHMETIC_KINDS + ("mul", "word_mul") + COMPARISON_KINDS
_OPS = {"add": "+", "sub": "-", "mul": "*", "larger": "max", "smaller": "min"}
_COMPARE = ("max", "min")

# Our choice: one in five (op, a, b) triples is held out.
_TEST_SHARE = 5

_NAMES = ("Tom", "Sara", "Ali", "Mia", "Ben", "Lena", "Omar", "Kim", "Ivan", "Zoe")
_THINGS = ("apples", "marbles", "books", "stickers", "coins", "shells", "pencils", "cards")
_WORD_ADD = (
    "{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?",
    "A box holds {a} {t}. {n} puts in {b} more {t}. How many {t} are in the box?",
    "{n} collected {a} {t} on Monday and {b} {t} on Tuesday. How many {t} did {n} collect in all?",
)
_WORD_SUB = (
    "{n} has {a} {t} and gives away {b}. How many {t} does {n} have left?",
    "A box holds {a} {t}. {n} takes out {b} {t}. How many {t} are left in the box?",
    "{n} had {a} {t} and lost {b} of them. How many {t} does {n} have now?",
)
_WORD_MUL = (
    "{n} has {a} bags with {b} {t} in each. How many {t} does {n} have?",
    "A shelf has {a} rows of {b} {t}. How many {t} are on the shelf?",
    "{n} buys {a} packs of {b} {t}. How many {t} did {n} buy?",
)
_WORD_LARGER = (
    "{n} has {a} {t} and {m} has {b} {t}. How many {t} does the one with more {t} have?",
    "One box holds {a} {t} and another holds {b} {t}. How many {t} are in the fuller box?",
    "{n} scored {a} points and {m} scored {b} points. What was the higher score?",
)
_WORD_SMALLER = (
    "{n} has {a} {t} and {m} has {b} {t}. How many {t} does the one with fewer {t} have?",
    "One box holds {a} {t} and another holds {b} {t}. How many {t} are in the emptier box?",
    "{n} scored {a} points and {m} scored {b} points. What was the lower score?",
)
_WORD = {"+": _WORD_ADD, "-": _WORD_SUB, "*": _WORD_MUL, "max": _WORD_LARGER, "min": _WORD_SMALLER}


def problem_split(op: str, a: int, b: int) -> Split:
    """Which split the problem ``a op b`` belongs to (a stable hash; independent of seeds). Comparisons
    (``op`` ``"max"`` or ``"min"``) hash the unordered pair, whichever is asked."""
    key = f"cmp:{min(a, b)}:{max(a, b)}" if op in _COMPARE else f"{op}:{a}:{b}"
    digest = hashlib.sha256(key.encode()).digest()
    return "test" if digest[0] % _TEST_SHARE == 0 else "train"


def _render(kind: str, a: int, b: int, rng: random.Random) -> tuple[str, str]:
    op = _OPS[kind.removeprefix("word_")]
    if kind.startswith("word_") and op in _COMPARE:
        template, (n, m) = rng.choice(_WORD[op]), rng.sample(_NAMES, 2)
        question = template.format(n=n, m=m, t=rng.choice(_THINGS), a=a, b=b)
    elif kind.startswith("word_"):  # the draws of the first families, unchanged: their problems stay the same
        template = rng.choice(_WORD[op])
        question = template.format(n=rng.choice(_NAMES), t=rng.choice(_THINGS), a=a, b=b)
    elif op in _COMPARE:
        question = f"Which number is {kind}, {a} or {b}?"
    else:
        question = f"What is {a} {op} {b}?"
    if op in _COMPARE:
        result = max(a, b) if op == "max" else min(a, b)
        return question, f"The {'larger' if op == 'max' else 'smaller'} number is {result}\n#### {result}"
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return question, f"{a} {op} {b} = {result}\n#### {result}"


def _operands(op: str, low: int, high: int, rng: random.Random) -> tuple[int, int]:
    """One draw of ``(a, b)``: both in ``[low, high]`` (``a >= b`` for ``-``; ``a != b`` for comparisons, redrawn
    by the caller); for ``*`` ``a`` is a digit 2-9."""
    a, b = rng.randint(2, 9) if op == "*" else rng.randint(low, high), rng.randint(low, high)
    return (b, a) if op == "-" and a < b else (a, b)


def count_problems(split: Split, kinds: tuple[str, ...] = ARITHMETIC_KINDS, low: int = 10, high: int = 99) -> int:
    """How many distinct problems ``make_problems`` can draw for ``split`` (word forms share their
    operation's triples): e.g. 148 held-out (``"test"``) multiplication problems."""
    ops = {_OPS[k.removeprefix("word_")] for k in kinds}
    firsts = {op: range(2, 10) if op == "*" else range(low, high + 1) for op in ops}
    return sum(problem_split(op, a, b) == split for op in ops for a in firsts[op] for b in range(low, high + 1)
               if not (op == "-" and a < b) and not (op in _COMPARE and a == b))


def make_problems(
    n: int,
    split: Split = "train",
    seed: int = 0,
    kinds: tuple[str, ...] = ARITHMETIC_KINDS,
    low: int = 10,
    high: int = 99,
) -> list[dict]:
    """``n`` distinct problems of ``split`` (``"train"`` or ``"test"``), reproducible from ``seed``.

    Kinds cycle through ``kinds`` (``add``, ``sub``, ``mul``, ``larger``, ``smaller`` and their ``word_`` forms); operands are
    integers in ``[low, high]`` (for ``mul`` the first is a digit 2-9), and subtraction never goes
    below zero. Ids look like
    ``"train-add-47-38"`` so they are unique across splits.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    unknown = [k for k in kinds if k not in PROBLEM_KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {PROBLEM_KINDS}, got {kinds!r}")
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
    available = count_problems(split, kinds, low, high)
    if n > available:
        raise ValueError(f"asked for {n} distinct {split} problems of kinds {kinds}, but operands in [{low}, {high}] "
                         f"give only {available} in that split; ask for fewer or widen the range")
    rng = random.Random(f"{seed}:{split}")
    rows: list[dict] = []
    seen: set[tuple[str, int, int]] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 10_000:
            raise ValueError(f"could not draw {n} distinct {split} problems of kinds {kinds} from [{low}, {high}]; "
                             "ask for fewer or widen the range")
        kind = kinds[len(rows) % len(kinds)]
        op = _OPS[kind.removeprefix("word_")]
        a, b = _operands(op, low, high, rng)
        if (op, a, b) in seen or problem_split(op, a, b) != split or (op in _COMPARE and a == b):
            continue
        seen.add((op, a, b))
        question, answer = _render(kind, a, b, rng)
        rows.append({"id": f"{split}-{kind}-{a}-{b}", "question": question, "answer": answer,
                     "kind": kind, "a": a, "b": b, "op": op})
    return rows


# Two worked examples in the family's answer format (our choice): with them SmolLM2 answers in one
# short line ("47 + 38 = 85 ...") so the pivotal tokens are the answer digits.
ARITHMETIC_SHOTS: tuple[dict[str, str], ...] = (
    {"question": "What is 12 + 35?", "answer": "12 + 35 = 47\n#### 47"},
    {"question": "Ann has 50 pens and gives away 18. How many are left?", "answer": "50 - 18 = 32\n#### 32"},
)
MULTIPLICATION_SHOTS: tuple[dict[str, str], ...] = (
    {"question": "What is 3 * 21?", "answer": "3 * 21 = 63\n#### 63"},
    {"question": "Ann buys 4 boxes of 12 pens. How many pens did she buy?", "answer": "4 * 12 = 48\n#### 48"},
)
COMPARISON_SHOTS: tuple[dict[str, str], ...] = (
    {"question": "Which number is larger, 29 or 61?", "answer": "The larger number is 61\n#### 61"},
    {"question": "Which number is smaller, 84 or 57?", "answer": "The smaller number is 57\n#### 57"},
)
# The generated tasks by name: training kinds, the held-out format (word problems) and worked examples.
TASKS: dict[str, dict[str, tuple]] = {
    "arithmetic": {"kinds": ("add", "sub"), "transfer_kinds": ("word_add", "word_sub"), "shots": ARITHMETIC_SHOTS},
    "multiplication": {"kinds": ("mul",), "transfer_kinds": ("word_mul",), "shots": MULTIPLICATION_SHOTS},
    "comparison": {"kinds": ("larger", "smaller"), "transfer_kinds": ("word_larger", "word_smaller"),
                   "shots": COMPARISON_SHOTS},
}

DEMO_PROBLEMS_FILE = "data/cca_demo_problems.jsonl"


def demo_problems(split: str | None = None) -> list[dict]:
    """The small problem set shipped for ``circuit-peft demo`` (``split``: ``"train"``, ``"val"``,
    ``"test"`` or None for all). Made by :func:`make_problems` (seed 0); val and test are held out."""
    import json
    from importlib import resources

    text = resources.files("circuit_peft").joinpath(DEMO_PROBLEMS_FILE).read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if split is not None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val', 'test' or None, got {split!r}")
        rows = [r for r in rows if r["split"] == split]
    return rows
