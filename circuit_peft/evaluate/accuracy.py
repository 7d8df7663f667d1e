"""Accuracy on held-out problems: greedy, batched generation, final-answer checking."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .answers import AnswerFormat, NumberAnswer
from .generation import generate_batched
from ..taskdata.examples import split_task_row
from ..taskdata.prompts import PromptStyle, encode_prompts, row_prompt

logger = logging.getLogger(__name__)

# few-shot prompts: a model that starts the next example has finished its answer
FEWSHOT_STOP = "\nQuestion:"


@dataclass
class AccuracyResult:
    """``accuracy`` = ``correct / count``; ``stderr`` = sqrt(p(1-p)/n) (binomial standard error).

    ``records``: one dict per scored problem (``index``, ``question``, ``gold``, ``prediction``,
    ``completion``, ``correct``, ``capped``); ``skipped``: problems without a parsable gold answer.
    ``capped``: generations that used all ``max_new_tokens`` without finishing (a cap this often
    hit measures the cap, not the skill; keep ``capped_fraction`` near 0).
    """

    accuracy: float
    count: int
    correct: int
    stderr: float
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    capped: int = 0

    @property
    def capped_fraction(self) -> float:
        return self.capped / self.count if self.count else float("nan")

    def to_dict(self, with_records: bool = True) -> dict[str, Any]:
        out = asdict(self)
        out["capped_fraction"] = self.capped_fraction
        if not with_records:
            out.pop("records")
        return out


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of a proportion ``p`` measured on ``n`` items."""
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else float("nan")


def _question(row: dict[str, Any], question_field: str) -> Any:
    """What a record shows as the question: the question field, else the TRL prompt."""
    return row[question_field] if question_field in row else row.get("prompt")


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Iterable[dict[str, Any]],
    style: PromptStyle = "chat",
    shots: Sequence[Any] | None = None,
    answer_format: AnswerFormat | None = None,
    question_field: str = "question",
    max_new_tokens: int = 256,
    batch_size: int = 32,
    limit: int | None = None,
    system: str | None = None,
    instruction: str | None = None,
    progress: bool = True,
) -> AccuracyResult:
    """Greedy accuracy of ``model`` on ``problems`` (dicts or a ``datasets.Dataset``).

    Each problem's prompt comes from :func:`~circuit_peft.taskdata.prompts.row_prompt` (a question through
    ``build_prompt`` with ``style``, ``shots``, ``system``, ``instruction``; or a TRL row's own prompt);
    the completion's final answer is compared
    with the gold answer read by ``answer_format`` (default :class:`NumberAnswer`: the
    ``answer`` field, GSM8K ``#### n`` or a bare number). Problems whose gold answer cannot be
    parsed are reported (logged, and listed in ``skipped``) and not scored.
    """
    fmt = answer_format or NumberAnswer()
    rows = [dict(r) for r in problems]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError("no problems to evaluate: the evaluation set is empty")
    kept, skipped = [], []
    for i, row in enumerate(rows):
        if question_field not in row and "prompt" not in row:
            raise ValueError(f"problem {i} has no {question_field!r} field (fields: {sorted(row)}); "
                             "pass question_field=...")
        gold = fmt.gold(row)
        (kept if gold is not None else skipped).append((i, row, gold))
    if skipped:
        logger.warning("%d of %d problems have no parsable gold answer and are skipped; first: %s",
                       len(skipped), len(rows), [str(_question(r, question_field))[:60] for _, r, _ in skipped[:3]])
    if not kept:
        raise ValueError(f"none of the {len(rows)} problems has a parsable gold answer "
                         f"(first: {rows[0]!r:.200}); check answer_format / the answer field")
    prompts = [row_prompt(tokenizer, r, style, shots, question_field, system=system, instruction=instruction)
               for _, r, _ in kept]
    completions = generate_batched(
        model, tokenizer, encode_prompts(tokenizer, prompts, style), max_new_tokens=max_new_tokens,
        batch_size=batch_size, stop_strings=[FEWSHOT_STOP] if style == "fewshot" else None,
        progress=progress, desc="accuracy",
    )
    records = []
    for (i, row, gold), ids in zip(kept, completions):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        capped = len(ids) >= max_new_tokens and not (style == "fewshot" and FEWSHOT_STOP in text)
        if style == "fewshot":
            text = text.split(FEWSHOT_STOP)[0]
        pred = fmt.extract(text)
        record = {"index": i, "question": _question(row, question_field), "gold": gold, "prediction": pred,
                  "completion": text, "correct": pred is not None and pred == gold, "capped": capped}
        if "problem_id" in row:
            record["problem_id"] = row["problem_id"]
        records.append(record)
    correct = sum(r["correct"] for r in records)
    acc = correct / len(records)
    return AccuracyResult(
        accuracy=acc, count=len(records), correct=correct, stderr=binomial_stderr(acc, len(records)),
        records=records, skipped=[{"index": i, "question": _question(r, question_field)} for i, r, _ in skipped],
        capped=sum(r["capped"] for r in records),
    )


def completion_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Held-out completion loss: the mean of ``-log p`` over every completion token of ``rows``
    (tokenised SFT rows: ``input_ids`` and ``labels``, -100 on the prompt; nats per token), with its
    standard error (the ratio estimator's, rows as the sampling unit: each row's tokens are not independent).

    Returns ``{"loss", "stderr", "count" (rows), "tokens", "losses", "counts"}`` (``losses``: each row's
    mean per token and ``counts`` its completion tokens, to pair two models on the same rows)."""
    from .generation import continuation_logprobs

    if not rows:
        raise ValueError("no rows to measure: the evaluation set is empty")
    contexts, completions = [], []
    for i, row in enumerate(rows):
        context, completion = split_task_row(row)
        if not context or not completion:
            raise ValueError(f"row {i}: needs a prompt and a completion (labels -100 on the prompt only)")
        contexts.append(context)
        completions.append(completion)
    sums = [-x for x in continuation_logprobs(model, tokenizer, contexts, completions, batch_size=batch_size,
                                              progress=progress, desc="completion loss")]
    counts = [len(c) for c in completions]
    return {**ratio_mean_se(sums, counts), "count": len(rows), "tokens": sum(counts),
            "losses": [s / n for s, n in zip(sums, counts)], "counts": counts}


def ratio_mean_se(sums: Sequence[float], counts: Sequence[int]) -> dict[str, float]:
    """``{"loss": sum(sums) / sum(counts), "stderr"}``: a per-token mean over rows of ``counts[i]`` tokens
    whose values add to ``sums[i]``, and its standard error by the delta method with rows as the unit
    (``sqrt(sum((s_i - m n_i)^2) / (k (k - 1))) / mean(n)``; nan for one row)."""
    k, total = len(sums), float(sum(counts))
    mean = sum(sums) / total
    if k < 2:
        return {"loss": mean, "stderr": float("nan")}
    spread = sum((s - mean * n) ** 2 for s, n in zip(sums, counts)) / (k * (k - 1))
    return {"loss": mean, "stderr": math.sqrt(spread) / (total / k)}
