"""Pivotal-token mining: where do the model's own reasoning traces go wrong?

For each problem with a gold answer: one greedy trace and up to ``n_samples`` sampled traces
(T=1.2 when greedy is right, looking for a wrong one; T=0.8 when greedy is wrong, looking for a
right one); the first sample whose correctness differs from the greedy trace's makes a pair.

* ``method="branching"`` (default, causal): walk the sampled trace y; for each k greedily complete
  y_1..y_k; the first k whose completion's correctness differs from greedy's makes y_k pivotal,
  the alternative being the model's greedy token after y_1..y_{k-1}. All completions of one
  problem run as one batch (at most ``max_branch_completions``).
* ``method="prefix"`` (the paper's cheap variant): the first token where greedy and sample differ.
* ``pivot="digit"`` (our extension for final-number tasks): the first wrong digit of the wrong
  trace's final answer, the desired token being the gold digit there. A greedy-wrong problem
  needs no sampling at all.
* ``outcome_filter=True`` keeps a prefix/digit pair only if greedily completing after the desired
  token gives a right answer and after the undesired token a wrong one (branching pairs are so by
  construction).

Records are ``{"context_ids", "desired_id", "undesired_id", "problem_id", "method", "position",
"greedy_correct"}`` (``position``: index of the pivotal token within the response). With an
``output_dir`` they are appended to ``records.jsonl`` per problem (one write, flushed and fsynced)
and the problem is then marked done in ``progress.jsonl``; a killed run resumes where it stopped
and produces the same records as an uninterrupted one (problems are processed in fixed chunks,
each with its own seed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ..evaluate.accuracy import FEWSHOT_STOP
from ..evaluate.answers import AnswerFormat, NumberAnswer
from ..evaluate.generation import generate_batched
from ..taskdata.prompts import PROMPT_STYLES, encode_prompts, row_prompt
from ..files import atomic_write_text
from ..errors import located
from ..validation import within_context

logger = logging.getLogger(__name__)

MINING_METHODS: tuple[str, ...] = ("branching", "prefix")
PIVOTS: tuple[str, ...] = ("token", "digit")
RECORD_FIELDS: tuple[str, ...] = ("context_ids", "desired_id", "undesired_id", "problem_id")
RECORDS_FILE = "records.jsonl"
PROGRESS_FILE = "progress.jsonl"
CONFIG_FILE = "mining_config.json"


@dataclass
class MiningConfig:
    """Settings of :func:`mine_pivotal_tokens` (paper defaults unless marked "our choice")."""

    method: Literal["branching", "prefix"] = "branching"
    pivot: Literal["token", "digit"] = "token"
    n_samples: int = 10
    temperature_if_right: float = 1.2
    temperature_if_wrong: float = 0.8
    max_new_tokens: int = 64  # our choice: keep traces short on small models
    batch_size: int = 8  # problems per chunk (the unit of resuming; sampling runs chunk x n_samples sequences)
    generation_batch_size: int = 32  # sequences per generate call
    max_branch_completions: int = 16  # our choice: cap on greedy completions per problem
    outcome_filter: bool = False
    prompt_style: str = "chat"
    shots: list[dict[str, str]] | None = None
    system: str | None = None
    instruction: str | None = None
    question_field: str = "question"
    id_field: str = "id"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in MINING_METHODS:
            raise ValueError(f"method must be one of {MINING_METHODS}, got {self.method!r}")
        if self.pivot not in PIVOTS:
            raise ValueError(f"pivot must be one of {PIVOTS}, got {self.pivot!r}")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        for name in ("n_samples", "max_new_tokens", "batch_size", "generation_batch_size", "max_branch_completions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shots is not None:
            self.shots = [dict(s) for s in self.shots]


@dataclass
class MiningResult:
    """What :func:`mine_pivotal_tokens` found: the records and counts of what happened per problem."""

    records: Dataset
    stats: dict[str, int] = field(default_factory=dict)
    bad_gold: list[str] = field(default_factory=list)  # ids of problems without a parsable gold answer


# ----- generation ----------------------------------------------------------------------------------


def generate_traces(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float | None = None,
    num_return_sequences: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    stop_strings: Sequence[str] | None = None,
) -> list[list[int]]:
    """New tokens after each prompt (greedy if ``temperature`` is None), cut at the first stop.

    Returns ``len(prompts) * num_return_sequences`` lists (the samples of prompt i at
    ``i*n .. i*n+n-1``). Sampling is seeded by ``seed`` without touching the caller's RNG.
    """
    repeated = [list(p) for p in prompts for _ in range(num_return_sequences)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return generate_batched(
            model, tokenizer, repeated, max_new_tokens=max_new_tokens, batch_size=batch_size,
            do_sample=temperature is not None, temperature=temperature or 1.0, stop_strings=stop_strings,
            progress=False,
        )


# ----- one chunk of problems ------------------------------------------------------------------------


@dataclass
class Problem:
    """One problem as the miner holds it: id, gold answer, prompt ids, then its greedy trace, the first sampled
    trace whose correctness differs from greedy's (``flip``), its status and its records."""

    pid: str
    gold: str
    prompt_ids: list[int]
    greedy: list[int] = field(default_factory=list)
    greedy_correct: bool = False
    flip: list[int] | None = None  # first sample whose correctness differs from greedy's
    status: str = "pending"
    records: list[dict[str, Any]] = field(default_factory=list)


class Miner:
    """The pivot rules on traces: :meth:`run_chunk` generates and mines; :meth:`pivot` applies one method's rule
    (``"prefix"``, ``"branching"`` or ``"digit"``) to a problem whose greedy and flipping traces are set."""

    def __init__(self, model: Any, tokenizer: Any, config: MiningConfig, fmt: AnswerFormat):
        self.model, self.tok, self.cfg, self.fmt = model, tokenizer, config, fmt

        self.stop = [FEWSHOT_STOP] if config.prompt_style == "fewshot" else None

    def correct(self, trace: Sequence[int], gold: str) -> bool:
        text = self.tok.decode(list(trace), skip_special_tokens=True)
        if self.stop:
            text = text.split(FEWSHOT_STOP)[0]
        got = self.fmt.extract(text)
        return got is not None and got == gold

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return generate_traces(self.model, self.tok, prompts, max_new_tokens, batch_size=self.cfg.generation_batch_size,
                         stop_strings=self.stop)

    def run_chunk(self, problems: list[Problem], seed: int) -> None:
        cfg = self.cfg
        traces = self.greedy([p.prompt_ids for p in problems], cfg.max_new_tokens)
        for p, g in zip(problems, traces):
            p.greedy, p.greedy_correct = g, self.correct(g, p.gold)
        # Sampling: T=1.2 looking for a wrong trace when greedy is right, T=0.8 for a right one when wrong.
        for want_wrong, temp in ((True, cfg.temperature_if_right), (False, cfg.temperature_if_wrong)):
            group = [p for p in problems if p.greedy_correct == want_wrong]
            if cfg.pivot == "digit" and not want_wrong:
                continue  # the greedy trace is already the wrong one
            if not group:
                continue
            samples = generate_traces(
                self.model, self.tok, [p.prompt_ids for p in group], cfg.max_new_tokens, temperature=temp,
                num_return_sequences=cfg.n_samples, seed=seed * 2 + int(want_wrong),
                batch_size=cfg.generation_batch_size, stop_strings=self.stop,
            )
            for i, p in enumerate(group):
                for s in samples[i * cfg.n_samples : (i + 1) * cfg.n_samples]:
                    if self.correct(s, p.gold) != p.greedy_correct:
                        p.flip = s
                        break
        for p in problems:
            if cfg.pivot == "digit":
                self._digit(p)
            elif p.flip is None:
                p.status = "no_flip"
            elif cfg.method == "prefix":
                self._prefix(p)
            else:
                self._branching(p)
        if cfg.outcome_filter and (cfg.pivot == "digit" or cfg.method == "prefix"):
            self._filter([p for p in problems if p.records])
        for p in problems:
            if p.status == "pending":
                p.status = "ok" if p.records else "no_record"

    def pivot(self, p: Problem, method: str) -> None:
        """Add ``method``'s record(s) to ``p`` (or set ``p.status`` to why there is none)."""
        rules = {"prefix": self._prefix, "branching": self._branching, "digit": self._digit}
        if method not in rules:
            raise ValueError(f"method must be one of {tuple(rules)}, got {method!r}")
        rules[method](p)

    def _record(self, p: Problem, response: list[int], desired: int, undesired: int, method: str) -> None:
        if desired == undesired:
            p.status = "same_token"
            return
        p.records.append({
            "context_ids": p.prompt_ids + list(response), "desired_id": int(desired), "undesired_id": int(undesired),
            "problem_id": p.pid, "method": method, "position": len(response), "greedy_correct": p.greedy_correct,
        })

    @staticmethod
    def _divergence(a: list[int], b: list[int]) -> int:
        d = 0
        while d < len(a) and d < len(b) and a[d] == b[d]:
            d += 1
        return d

    def _prefix(self, p: Problem) -> None:
        g, s = p.greedy, p.flip
        d = self._divergence(g, s)
        if d >= len(g) or d >= len(s):
            p.status = "prefix_of_other"  # one trace stopped where the other went on
            return
        good, bad = (g, s) if p.greedy_correct else (s, g)
        self._record(p, g[:d], good[d], bad[d], "prefix")

    def _branching(self, p: Problem) -> None:
        g, s = p.greedy, p.flip
        d = self._divergence(g, s)
        ks = list(range(d, min(len(s), d + self.cfg.max_branch_completions)))
        if not ks:
            p.status = "prefix_of_other"
            return
        budget = self.cfg.max_new_tokens - (d + 1)
        prompts = [p.prompt_ids + s[: k + 1] for k in ks]
        completions = self.greedy(prompts, max(budget, 1)) if budget > 0 else [[] for _ in ks]
        for i, k in enumerate(ks):
            full = (s[: k + 1] + completions[i])[: self.cfg.max_new_tokens]
            if self.correct(full, p.gold) == p.greedy_correct:
                continue
            # The model's own greedy token after y_1..y_{k-1}: greedy's at the divergence point (EOS where
            # the greedy trace ended there and the sample went on), else the first token of the previous completion.
            if k == d:
                alt = g[d] if d < len(g) else self.tok.eos_token_id
            else:
                alt = completions[i - 1][0] if completions[i - 1] else self.tok.eos_token_id
            if alt is None:
                p.status = "no_alternative"
                return
            flipped_right = not p.greedy_correct
            desired, undesired = (s[k], alt) if flipped_right else (alt, s[k])
            self._record(p, s[:k], desired, undesired, "branching")
            return
        p.status = "branch_no_flip"

    def _digit(self, p: Problem) -> None:
        wrong = p.flip if p.greedy_correct else p.greedy
        if wrong is None:
            p.status = "no_flip"
            return
        found = first_wrong_digit(self.tok, wrong, p.gold, self.fmt)
        if found is None:
            p.status = "no_digit"
            return
        j, desired = found
        self._record(p, wrong[:j], desired, wrong[j], "digit")

    def _filter(self, problems: list[Problem]) -> None:
        prompts, owners = [], []
        for p in problems:
            for r in p.records:
                prompts += [r["context_ids"] + [r["desired_id"]], r["context_ids"] + [r["undesired_id"]]]
                owners.append((p, r))
        completions = self.greedy(prompts, self.cfg.max_new_tokens)
        kept: dict[int, list[dict]] = {}
        for i, (p, r) in enumerate(owners):
            response = r["context_ids"][len(p.prompt_ids) :]
            good = self.correct(response + [r["desired_id"]] + completions[2 * i], p.gold)
            bad = self.correct(response + [r["undesired_id"]] + completions[2 * i + 1], p.gold)
            if good and not bad:
                kept.setdefault(id(p), []).append(r)
        for p in problems:
            p.records = kept.get(id(p), [])
            if not p.records:
                p.status = "filtered"


def first_wrong_digit(
    tokenizer: Any, trace: Sequence[int], gold: str, fmt: AnswerFormat | None = None
) -> tuple[int, int] | None:
    """``(j, desired_id)``: token index ``j`` in ``trace`` holding the first wrong digit of its final
    answer (first written occurrence), and the token that writes the gold digit there instead.

    ``None`` when the answer is right, absent, not written literally, or longer than the gold
    with a right prefix (there is no wrong digit to point at).
    """
    trace = list(trace)
    text = tokenizer.decode(trace, skip_special_tokens=True)
    answer = (fmt or NumberAnswer()).extract(text)
    if answer is None or answer == gold:
        return None
    match = re.search(r"(?<![\d.])" + re.escape(answer) + r"(?![\d])", text)
    if match is None:
        return None
    i = next((n for n, (a, b) in enumerate(zip(answer, gold)) if a != b), min(len(answer), len(gold)))
    if i >= len(gold):
        return None
    char = match.start() + i
    if char >= len(text):
        return None
    offsets = [len(tokenizer.decode(trace[:n], skip_special_tokens=True)) for n in range(len(trace) + 1)]
    j = max(n for n in range(len(trace)) if offsets[n] <= char)
    desired_ids = tokenizer.encode(text[offsets[j] : char] + gold[i:], add_special_tokens=False)
    if not desired_ids or desired_ids[0] == trace[j]:
        return None
    return j, desired_ids[0]


# ----- persistence ----------------------------------------------------------------------------------


def _append_lines(path: Path, rows: Iterable[dict]) -> None:
    data = "".join(json.dumps(r) + "\n" for r in rows)
    if not data:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a killed write: everything after it is redone
    return rows


def load_records(path: str | os.PathLike) -> Dataset:
    """Mined records as a ``datasets.Dataset``: a mining folder (only problems marked done) or a jsonl file."""
    path = Path(path)
    if path.is_dir():
        done = {r["problem_id"] for r in _read_jsonl(path / PROGRESS_FILE)}
        rows = [r for r in _read_jsonl(path / RECORDS_FILE) if r["problem_id"] in done]
    elif path.exists():
        rows = _read_jsonl(path)
    else:
        raise FileNotFoundError(f"no mined records at {path}")
    missing = [f for f in RECORD_FIELDS if rows and f not in rows[0]]
    if missing:
        raise ValueError(f"{path} rows lack {missing}; expected records with fields {RECORD_FIELDS}")
    return Dataset.from_list(rows)


def _resume_state(out: Path, config: MiningConfig) -> tuple[dict[str, dict], list[dict]]:
    """Done problems and their records; drops records of problems not marked done (killed mid-problem)."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / CONFIG_FILE
    current = asdict(config)
    if saved.exists():
        previous = json.loads(saved.read_text())
        diff = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if diff:
            raise ValueError(
                f"{out} holds a mining run with other settings ({', '.join(diff)}); resume with the same "
                "settings or choose a new output folder"
            )
    else:
        atomic_write_text(saved, json.dumps(current, indent=2))
    progress = {r["problem_id"]: r for r in _read_jsonl(out / PROGRESS_FILE)}
    raw_lines = (out / RECORDS_FILE).read_text(encoding="utf-8").splitlines() if (out / RECORDS_FILE).exists() else []
    records = [r for r in _read_jsonl(out / RECORDS_FILE) if r["problem_id"] in progress]
    if len(records) != len(raw_lines):
        atomic_write_text(out / RECORDS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    # A torn progress line is dropped the same way.
    if (out / PROGRESS_FILE).exists() and len(progress) != len((out / PROGRESS_FILE).read_text().splitlines()):
        atomic_write_text(out / PROGRESS_FILE, "".join(json.dumps(r) + "\n" for r in progress.values()))
    return progress, records


# ----- the public entry point -------------------------------------------------------------------------


def _chunk_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "little")


def parse_problems(tokenizer: Any, problems: Sequence[dict[str, Any]], cfg: MiningConfig, fmt: AnswerFormat
                    ) -> tuple[list[Problem], list[str]]:
    """The problems with a parsable gold answer, prompts encoded, and the ids of those without one.
    Raises on a missing question field, a duplicate id, or when no problem has a gold answer."""
    valid: list[Problem] = []
    bad_gold: list[str] = []
    ids_seen: set[str] = set()
    for i, row in enumerate(problems):
        if cfg.question_field not in row and "prompt" not in row:
            raise located(f"problem {i}", f"no {cfg.question_field!r} field (fields: {sorted(row)}); "
                                          "set question_field (--question-field)")
        pid = str(row.get(cfg.id_field, i))
        if pid in ids_seen:
            raise located(f"problem {i}", f"duplicate problem id {pid!r}; problem ids must be unique")
        ids_seen.add(pid)
        gold = fmt.gold(row)
        if gold is None:
            bad_gold.append(pid)
            continue
        try:
            prompt = row_prompt(tokenizer, row, cfg.prompt_style, cfg.shots, cfg.question_field, system=cfg.system,
                                instruction=cfg.instruction)
        except ValueError as err:  # an empty or non-text question: name the problem
            raise located(f"problem {i} (id {pid!r})", str(err)) from None
        valid.append(Problem(pid, gold, encode_prompts(tokenizer, [prompt], cfg.prompt_style)[0]))
    if bad_gold:
        logger.warning("skipping %d of %d problems without a parsable gold answer (first: %s)",
                       len(bad_gold), len(problems), ", ".join(bad_gold[:5]))
    if not valid:
        raise ValueError(f"none of the {len(problems)} problems has a parsable gold answer (first ids: "
                         f"{bad_gold[:5]}); GSM8K answers end with '#### n', or pass answer_format=...")
    return valid, bad_gold


def _check_context(model: Any, tokenizer: Any, valid: list[Problem], cfg: MiningConfig) -> None:
    """Refuse, before any mining, a problem whose prompt plus ``max_new_tokens`` does not fit in the model's
    context (``max_position_embeddings``): naming the problem, its prompt's length in tokens and the context."""
    within_context([len(p.prompt_ids) for p in valid], model, tokenizer, lambda i: f"problem {valid[i].pid!r}",
                   what="prompt (question, instruction and shots)", reserve=cfg.max_new_tokens,
                   reserve_name="max_new_tokens",
                   fix="shorten or drop those problems, use fewer shots, or lower max_new_tokens (--max-new-tokens)")


def _mine_chunks(miner: "Miner", valid: list[Problem], cfg: MiningConfig, out: Path | None,
                 done: dict[str, dict], records: list[dict], max_problems: int | None, bar: Any) -> None:
    """Mine the problems not in ``done`` chunk by chunk, appending to ``done``/``records`` (and to the
    files under ``out``) as each problem finishes; stop after ``max_problems`` new ones."""
    new = 0
    for index in range(0, len(valid), cfg.batch_size):
        chunk = valid[index : index + cfg.batch_size]
        todo = [p for p in chunk if p.pid not in done]
        if not todo:
            continue
        if max_problems is not None and new >= max_problems:
            return
        # The whole chunk runs again (same composition, same seed) so that a resumed chunk gives
        # the records an uninterrupted run would have given.
        miner.run_chunk(chunk, _chunk_seed(cfg.seed, index // cfg.batch_size))
        for p in todo:
            if max_problems is not None and new >= max_problems:
                return
            entry = {"problem_id": p.pid, "status": p.status, "greedy_correct": p.greedy_correct,
                     "n_records": len(p.records)}
            if out is not None:
                _append_lines(out / RECORDS_FILE, p.records)
                _append_lines(out / PROGRESS_FILE, [entry])
            done[p.pid] = entry
            records += p.records
            new += 1
            bar.update(1)
        bar.set_postfix(records=len(records))


def _no_record_message(stats: dict[str, Any], mined: int) -> str:
    right = stats["greedy_correct"]
    statuses = {k: v for k, v in stats.items() if k not in ("problems", "mined", "records")}
    hint = ("The model is never right: use easier problems, a few-shot prompt, more samples or a higher "
            "temperature_if_wrong." if right == 0 else
            "The model is never wrong: use harder problems or more samples/higher temperature_if_right."
            if right == mined else
            "No sample changed the outcome: raise n_samples, change the temperatures, or try pivot='digit'.")
    return f"no pivotal-token record from {mined} problems (greedy right on {right}, wrong on {mined - right}; statuses: {statuses}). " + hint


def mine_pivotal_tokens(
    model: Any,
    tokenizer: Any,
    problems: Sequence[dict[str, Any]],
    output_dir: str | os.PathLike | None = None,
    config: MiningConfig | None = None,
    answer_format: AnswerFormat | None = None,
    max_problems: int | None = None,
    progress: bool = True,
    **overrides: Any,
) -> MiningResult:
    """Mine contrastive pivotal-token records from ``problems`` (rows with a question and a gold answer).

    ``config`` (or keyword ``overrides`` of :class:`MiningConfig` fields) picks the method, the
    prompt and the budget. ``answer_format`` reads answers (default :class:`NumberAnswer`: gold in
    ``row["answer"]``, GSM8K ``#### n`` or a bare number). With ``output_dir`` the run is resumable.
    ``max_problems`` stops after that many newly mined problems (the rest are left for a later call).

    Raises ``ValueError`` when no problem has a parsable gold answer or when no record was mined.
    """
    cfg = config or MiningConfig()
    if overrides:
        cfg = MiningConfig(**{**asdict(cfg), **overrides})
    fmt = answer_format or NumberAnswer()
    if not problems:
        raise ValueError("no problems given: pass rows with a question and a gold answer")
    miner = Miner(model, tokenizer, cfg, fmt)
    valid, bad_gold = parse_problems(tokenizer, problems, cfg, fmt)
    _check_context(model, tokenizer, valid, cfg)
    out = Path(output_dir) if output_dir is not None else None
    done, records = _resume_state(out, cfg) if out is not None else ({}, [])
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(valid), initial=sum(p.pid in done for p in valid), desc=f"mining ({cfg.method}/{cfg.pivot})",
               unit="problem", disable=not progress)
    try:
        _mine_chunks(miner, valid, cfg, out, done, records, max_problems, bar)
    finally:
        bar.close()
        model.train(was_training)
    statuses = [done[p.pid] for p in valid if p.pid in done]
    stats = {"problems": len(problems), "bad_gold": len(bad_gold), "mined": len(statuses),
             "greedy_correct": sum(s["greedy_correct"] for s in statuses), "records": len(records)}
    for s in statuses:
        stats[s["status"]] = stats.get(s["status"], 0) + 1
    if out is not None:
        atomic_write_text(out / "summary.json", json.dumps({**stats, "bad_gold_ids": bad_gold[:20]}, indent=2))
    if not records and len(statuses) == len(valid):
        raise ValueError(_no_record_message(stats, len(statuses)))
    logger.info("mining: %s", stats)
    return MiningResult(Dataset.from_list(records) if records else Dataset.from_dict({f: [] for f in RECORD_FIELDS}),
                        stats, bad_gold)
