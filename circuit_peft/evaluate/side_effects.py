"""Side effects of an update on abilities it should not touch: MMLU, TruthfulQA (MC1) and the
KL divergence of next-token distributions from the base model on general text.

The base model can be a separate model, or, for a ``PeftModel``, the same model with its adapter
disabled (``base=None``), so only one model needs to be in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .accuracy import binomial_stderr
from .data import DEFAULT_TEXT_FILE, load_mmlu, load_text, load_truthfulqa
from ..batching import model_device, pad_batch
from .generation import continuation_logprobs, eval_mode

SIDE_EFFECT_TASKS: tuple[str, ...] = ("mmlu", "truthfulqa", "kl")
_LETTERS = "ABCD"


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


# ----- MMLU ---------------------------------------------------------------------------------


def _mmlu_block(row: dict[str, Any], with_answer: bool) -> str:
    lines = [row["question"].strip()] + [f"{_LETTERS[j]}. {c}" for j, c in enumerate(row["choices"])]
    answer = f" {_LETTERS[row['answer']]}\n\n" if with_answer else ""
    return "\n".join(lines) + "\nAnswer:" + answer


def mmlu_prompt(subject: str, shots: Sequence[dict[str, Any]], row: dict[str, Any] | None = None) -> str:
    """The classic MMLU prompt: a header, ``shots`` answered examples, then ``row`` ending in
    ``Answer:`` (without ``row``: only the shared part)."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(_mmlu_block(s, True) for s in shots) + ("" if row is None else _mmlu_block(row, False))


def mmlu_context_ids(tokenizer: PreTrainedTokenizerBase, subject: str, shots: Sequence[dict[str, Any]],
                     row: dict[str, Any]) -> tuple[list[int], list[int]]:
    """``(shared_prefix_ids, context_ids)`` of one MMLU item: the header and shots are tokenized
    once (with special tokens) and the question block is appended (without)."""
    prefix = _encode(tokenizer, mmlu_prompt(subject, shots), special=True)
    return prefix, prefix + _encode(tokenizer, _mmlu_block(row, False), special=False)


def mmlu_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: dict[str, dict[str, list[dict[str, Any]]]],
    n_shots: int = 5,
    choice: str = "letter",
    limit_per_subject: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """MMLU accuracy by log-likelihood of each choice after an ``n_shots``-shot prompt.

    ``data`` is :func:`~circuit_peft.evaluate.data.load_mmlu` output. Shots come from the
    subject's ``dev`` rows, or, when there are none, from its first ``n_shots`` rows (which are
    then not scored). ``choice="letter"`` scores `` A``..`` D``; ``choice="text"`` scores
    each choice's text (summed log-probability). The shared header + shots run once per subject
    (KV cache). Returns ``accuracy`` (micro average over items), ``count``, ``stderr``,
    ``per_subject`` and per-item ``records`` (``subject``, ``row``, ``answer``, ``pick``, ``scores``).
    """
    if choice not in ("letter", "text"):
        raise ValueError(f"choice must be 'letter' or 'text', got {choice!r}")
    items: list[dict[str, Any]] = []
    per_subject: dict[str, float] = {}
    for subject, split in tqdm(data.items(), desc="mmlu", disable=not progress or len(data) < 2, leave=False):
        rows, shots = list(split["eval"]), list(split.get("dev") or [])[:n_shots]
        if not shots and n_shots:
            shots, rows = rows[:n_shots], rows[n_shots:]
        rows = rows[:limit_per_subject] if limit_per_subject is not None else rows
        if not rows:
            continue
        contexts, conts, prefix = [], [], []
        for row in rows:
            prefix, ctx = mmlu_context_ids(tokenizer, subject, shots, row)
            options = [f" {_LETTERS[j]}" for j in range(4)] if choice == "letter" else [f" {c}" for c in row["choices"]]
            for opt in options:
                contexts.append(ctx)
                conts.append(_encode(tokenizer, opt, special=False))
        scores = continuation_logprobs(model, tokenizer, contexts, conts, batch_size, progress,
                                       desc=f"mmlu {subject}", shared_prefix=prefix)
        for k, row in enumerate(rows):
            s = scores[4 * k : 4 * k + 4]
            pick = max(range(4), key=lambda j: s[j])
            items.append({"subject": subject, "row": k, "answer": int(row["answer"]), "pick": pick, "scores": s,
                          "correct": pick == int(row["answer"])})
        per_subject[subject] = sum(i["correct"] for i in items[-len(rows):]) / len(rows)
    if not items:
        raise ValueError("no MMLU rows to score: each subject needs more rows than the number of shots")
    acc = sum(i["correct"] for i in items) / len(items)
    return {"accuracy": acc, "count": len(items), "stderr": binomial_stderr(acc, len(items)),
            "per_subject": per_subject, "records": items}


# ----- TruthfulQA ---------------------------------------------------------------------------


def truthfulqa_prompt(question: str) -> str:
    """Our choice: zero-shot ``"Q: {question}\\nA:"``; answers are scored as `` {answer}``."""
    return f"Q: {question.strip()}\nA:"


def truthfulqa_mc1(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """MC1-style TruthfulQA: the fraction of questions where the best answer has a higher
    log-likelihood (summed over its tokens) than every incorrect answer.

    ``rows``: :func:`~circuit_peft.evaluate.data.load_truthfulqa` output. Returns ``accuracy``,
    ``count``, ``stderr`` and ``records`` (``scores``: best answer first, then the incorrect ones).
    """
    if not rows:
        raise ValueError("no TruthfulQA rows to score")
    contexts, conts, spans = [], [], []
    for row in rows:
        ctx = _encode(tokenizer, truthfulqa_prompt(row["question"]), special=True)
        answers = [row["best"], *row["incorrect"]]
        spans.append((len(conts), len(answers)))
        for a in answers:
            contexts.append(ctx)
            conts.append(_encode(tokenizer, " " + a.strip(), special=False))
    scores = continuation_logprobs(model, tokenizer, contexts, conts, batch_size, progress, desc="truthfulqa")
    records = []
    for row, (start, n) in zip(rows, spans):
        s = scores[start : start + n]
        records.append({"question": row["question"], "scores": s, "correct": s[0] > max(s[1:])})
    acc = sum(r["correct"] for r in records) / len(records)
    return {"accuracy": acc, "count": len(records), "stderr": binomial_stderr(acc, len(records)), "records": records}


# ----- KL on general text -------------------------------------------------------------------


@contextmanager
def base_view(base: PreTrainedModel | None, model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """The base model: ``base`` itself, or ``model`` with its PEFT adapter disabled when ``base`` is None."""
    if base is not None:
        yield base
        return
    if not hasattr(model, "disable_adapter"):
        raise ValueError("base=None needs a PeftModel (its adapter is disabled to get the base); "
                         "pass the base model explicitly")
    with model.disable_adapter():
        yield model


def text_chunks(tokenizer: PreTrainedTokenizerBase, text: str, chunk_length: int = 128,
                max_chunks: int | None = 32) -> list[list[int]]:
    """Consecutive, non-overlapping ``chunk_length``-token chunks of ``text`` (a last short one dropped)."""
    if chunk_length < 2:
        raise ValueError("chunk_length must be >= 2")
    ids = _encode(tokenizer, text, special=False)
    chunks = [ids[i : i + chunk_length] for i in range(0, len(ids) - chunk_length + 1, chunk_length)]
    if not chunks:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of {chunk_length}; "
                         "give more text or a smaller chunk_length")
    return chunks[:max_chunks] if max_chunks is not None else chunks


@torch.no_grad()
def mean_kl(
    base: PreTrainedModel | None,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    chunk_length: int = 128,
    max_chunks: int | None = 32,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean KL(base || model) of next-token distributions, in nats per token, over every position of
    ``max_chunks`` chunks of ``chunk_length`` tokens of ``text``.

    ``base=None`` with a ``PeftModel`` uses ``model.disable_adapter()`` for the base distribution.
    Returns ``kl`` (mean), ``kl_max_chunk`` (largest per-chunk mean), ``tokens``.
    """
    return chunks_kl(base, model, text_chunks(tokenizer, text, chunk_length, max_chunks), batch_size, progress)


@torch.no_grad()
def chunks_kl(base: PreTrainedModel | None, model: PreTrainedModel, chunks: Sequence[Sequence[int]],
              batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """:func:`mean_kl` on given token ``chunks`` (equal lengths, e.g. disjoint slices of
    :func:`text_chunks` for a validation and a test measurement)."""
    chunks = [list(c) for c in chunks]
    device = model_device(model)
    total, count, per_chunk = 0.0, 0, []
    with eval_mode(model), (eval_mode(base) if base is not None else nullcontext()):
        for start in tqdm(range(0, len(chunks), batch_size), desc="kl", disable=not progress, leave=False):
            ids, _ = pad_batch(chunks[start : start + batch_size], 0, side="right")  # all full length
            ids = ids.to(device)
            with base_view(base, model) as b:
                logp_base = torch.log_softmax(b(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            kl = (logp_base.exp() * (logp_base - logp)).sum(-1)  # (B, T)
            total += float(kl.sum())
            count += kl.numel()
            per_chunk += kl.mean(-1).tolist()
    return {"kl": total / count, "kl_max_chunk": max(per_chunk), "tokens": count}


# ----- all together -------------------------------------------------------------------------


def side_effects(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data_dir: str | Path | None = None,
    *,
    base: PreTrainedModel | None = None,
    tasks: Sequence[str] = SIDE_EFFECT_TASKS,
    mmlu_subjects: Sequence[str] | None = None,
    mmlu_shots: int = 5,
    mmlu_choice: str = "letter",
    mmlu_limit: int | None = None,
    truthfulqa_limit: int | None = None,
    text: str | None = None,
    kl_chunk_length: int = 128,
    kl_chunks: int | None = 32,
    baseline: dict[str, Any] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Side effects of ``model`` against ``base`` (or, for a PeftModel with ``base=None``, against
    itself with the adapter disabled). Options after ``data_dir`` are keywords.

    Returns ``mmlu``, ``mmlu_base``, ``mmlu_delta`` (model - base), ``truthfulqa``,
    ``truthfulqa_base``, ``truthfulqa_delta``, ``kl`` (mean KL(base || model), nats/token), the
    counts, and ``details`` (per-subject MMLU, standard errors). Only ``tasks`` are run. Data come
    from ``data_dir`` (see :mod:`~circuit_peft.evaluate.data`) or the hub when it is None; KL
    reads ``text`` or ``<data_dir>/text/tinyshakespeare.txt``. Pass ``baseline`` (a previous
    result's ``{"mmlu_base", "truthfulqa_base"}``) to skip re-scoring the base model.
    """
    if isinstance(tokenizer, nn.Module):
        raise TypeError("side_effects(model, tokenizer, data_dir, base=...): the second argument is a model; the "
                        "base model is now the keyword base= (the old order was side_effects(base, model, tokenizer))")
    unknown = [t for t in tasks if t not in SIDE_EFFECT_TASKS]
    if unknown:
        raise ValueError(f"unknown side-effect task(s) {unknown}; choose from {SIDE_EFFECT_TASKS}")
    if base is None and not hasattr(model, "disable_adapter"):
        raise ValueError("base=None needs a PeftModel (its adapter is disabled to get the base); "
                         "pass the base model explicitly")
    baseline = baseline or {}
    # load every data set first, so a missing file fails before any model work
    mmlu_data = load_mmlu(data_dir, mmlu_subjects) if "mmlu" in tasks else None
    tqa_rows = load_truthfulqa(data_dir, truthfulqa_limit) if "truthfulqa" in tasks else None
    if "kl" in tasks and text is None:
        if data_dir is None:
            raise ValueError(f"KL needs general text: pass text=... or a data_dir with text/{DEFAULT_TEXT_FILE}")
        text = load_text(data_dir)
    out: dict[str, Any] = {"details": {}}

    def score(task: str, fn) -> None:
        if f"{task}_base" in baseline:
            base_res = {"accuracy": baseline[f"{task}_base"]}
        else:
            with base_view(base, model) as b:
                base_res = fn(b)
        res = fn(model)
        out[task], out[f"{task}_base"] = res["accuracy"], base_res["accuracy"]
        out[f"{task}_delta"] = res["accuracy"] - base_res["accuracy"]
        out[f"{task}_count"] = res["count"]
        out["details"][task] = {k: v for k, v in res.items() if k != "records"}

    if mmlu_data is not None:
        score("mmlu", lambda m: mmlu_accuracy(m, tokenizer, mmlu_data, mmlu_shots, mmlu_choice, mmlu_limit,
                                              batch_size, progress))
    if tqa_rows is not None:
        score("truthfulqa", lambda m: truthfulqa_mc1(m, tokenizer, tqa_rows, batch_size, progress))
    if "kl" in tasks:
        kl = mean_kl(base, model, tokenizer, text, kl_chunk_length, kl_chunks, batch_size, progress)
        out["kl"] = kl["kl"]
        out["details"]["kl"] = kl
    for key, value in list(out.items()):
        if isinstance(value, float) and math.isnan(value):
            out[key] = None
    return out
