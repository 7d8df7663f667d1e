"""Arguments and problem loading shared by ``mine``, ``amplify`` and ``demo`` (not a subcommand)."""

from __future__ import annotations

import argparse
from typing import Any

from ..files import read_rows
from ._args import add_model_args, load_spec, positive


def add_problem_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("problems")
    g.add_argument("--problems", required=required,
                   help="training problems: a .jsonl/.json file of rows with a question and a gold answer "
                        "(GSM8K '#### n' or a bare number), 'arithmetic' (generated two-digit + and -), "
                        "'multiplication' (generated digit x two-digit) or 'demo' (the small set shipped with the package)")
    g.add_argument("--n-problems", type=positive(int), default=None, help="use the first N problems (arithmetic: generate N; default 64)")
    g.add_argument("--question-field", default="question")
    g.add_argument("--answer-field", default="answer", help="field with the gold answer (default answer)")
    g.add_argument("--answer", choices=("number", "choice", "exact"), default="number",
                   help="how answers are checked (circuit_peft.evaluate.answers): number (the final number), choice "
                        "(an option letter; rows with 'options'/'choices' get them listed), exact (the normalised "
                        "string); mining needs a checker, so there is no 'none' here")
    g.add_argument("--id-field", default="id", help="field with a unique problem id (default id; else the row number)")


def add_mining_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mining")
    g.add_argument("--method", choices=("branching", "prefix"), default="branching",
                   help="pivotal-token method (default branching, the causal one)")
    g.add_argument("--pivot", choices=("token", "digit"), default="token",
                   help="digit: the first wrong digit of a wrong final answer (final-number tasks; cheap); default %(default)s")
    g.add_argument("--n-samples", type=positive(int), default=10, help="sampled traces per problem (default %(default)s)")
    g.add_argument("--temperature-if-right", type=positive(float), default=1.2)
    g.add_argument("--temperature-if-wrong", type=positive(float), default=0.8)
    g.add_argument("--max-new-tokens", type=positive(int), default=64, help="trace length cap (default %(default)s)")
    g.add_argument("--batch-size", type=positive(int), default=8, help="problems per chunk (default %(default)s)")
    g.add_argument("--generation-batch-size", type=positive(int), default=32, help="sequences per generate call (default 32)")
    g.add_argument("--max-branch-completions", type=positive(int), default=16,
                   help="branching: greedy completions per problem at most (default 16)")
    g.add_argument("--outcome-filter", action="store_true",
                   help="keep only prefix/digit pairs whose token changes the outcome (checked by greedy completion)")
    g.add_argument("--prompt-style", choices=("chat", "fewshot"), default="chat")
    g.add_argument("--shots", default=None,
                   help="worked examples: a .jsonl file of {question, answer} rows, 'arithmetic' or "
                        "'multiplication' (default: the generated task's own, none for chat otherwise)")
    g.add_argument("--system", default=None, help="chat system message")
    g.add_argument("--instruction", default=None, help="text appended to every question")
    g.add_argument("--seed", type=int, default=0)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="hub id, local folder, or 'smollm2' (offline SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads")
    add_model_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_problem_rows(source: str, n: int | None, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """Rows from a file, a generated task (``arithmetic``, ``multiplication``: bare and word forms; ``split``)
    or the shipped demo set."""
    from ..cca.problems import TASKS, demo_problems, make_problems

    if source in TASKS:
        kinds = TASKS[source]["kinds"] + TASKS[source]["transfer_kinds"]
        return make_problems(n or 64, "test" if split in ("val", "test") else "train", seed=seed, kinds=kinds)
    rows = demo_problems(split) if source == "demo" else read_rows(source)
    return rows[:n] if n is not None else rows


def problem_checker(args: argparse.Namespace, rows: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """The ``--answer`` checker of ``mine``/``amplify`` and the rows as it reads them (options listed);
    refuses ``--pivot digit`` (the first wrong digit of a number) with a checker that reads no number."""
    from ..errors import CircuitPeftError
    from ..evaluate.answers import answer_checker

    if getattr(args, "pivot", "token") == "digit" and args.answer != "number":
        raise CircuitPeftError(f"--pivot digit reads the first wrong digit of a final number; --answer {args.answer} "
                               "answers have none: use --pivot token")
    checker = answer_checker(args.answer, args.answer_field, args.question_field)
    return checker, [checker.prepare(dict(r)) for r in rows]


def resolve_shots(shots: str | None, problems_source: str) -> list[dict[str, str]] | None:
    from ..cca.problems import ARITHMETIC_SHOTS, TASKS

    if shots is None and problems_source == "demo":
        return [dict(s) for s in ARITHMETIC_SHOTS]
    if shots is None:
        shots = problems_source if problems_source in TASKS else "none"
    if shots in TASKS:
        return [dict(s) for s in TASKS[shots]["shots"]]
    if shots == "none":
        return None
    return [{"question": r["question"], "answer": r["answer"]} for r in read_rows(shots)]


def mining_config(args: argparse.Namespace):
    from ..cca.mining import MiningConfig

    return MiningConfig(
        method=args.method, pivot=args.pivot, n_samples=args.n_samples, temperature_if_right=args.temperature_if_right,
        temperature_if_wrong=args.temperature_if_wrong, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        generation_batch_size=args.generation_batch_size, max_branch_completions=args.max_branch_completions,
        outcome_filter=args.outcome_filter, prompt_style=args.prompt_style,
        shots=resolve_shots(args.shots, args.problems), system=args.system, instruction=args.instruction,
        question_field=args.question_field, id_field=args.id_field, seed=args.seed,
    )


def load_runtime(args: argparse.Namespace, spec=None):
    """The model (as ``spec`` says; None: the flags' :func:`load_spec`) and its tokenizer."""
    import torch

    from ..models import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, spec=spec or load_spec(args)), load_tokenizer(args.model)


# flags that change how a run goes, not what it writes (a resumed run may change them)
# (--dtype is recorded resolved, by open_run: "auto" is bfloat16 on a GPU and float32 on the CPU)
RUN_FLAGS_IGNORED = ("out", "threads", "no_progress", "verbose", "func", "command", "argv", "max_problems", "device",
                     "dtype")
# flags added after folders were made, with the behaviour those folders had: keyed only away from it
FLAGS_ADDED = {"kept_step": "best_validated"}


def open_run(args: argparse.Namespace, folder_flag: str = "out", ignored: tuple[str, ...] = (), adopt=None,
             **inputs: Any):
    """Open the folder of flag ``folder_flag`` (default ``--out``) for this command (see :class:`circuit_peft.runs.OpenRun`):
    its settings are the command, its flags (less ``ignored`` ones, which do not change what the folder
    holds) and the fingerprints of ``inputs`` (rows); another run's folder is refused."""
    from ..runs import OpenRun, RunSchema, fingerprint

    schema = RunSchema(args.command, volatile=RUN_FLAGS_IGNORED + ignored, added=FLAGS_ADDED)
    flags = schema.config(dict(sorted(vars(args).items())))
    loading = load_spec(args).settings() if hasattr(args, "dtype") else {}  # {} in float32: older folders open
    settings = {"command": args.command, "flags": {**flags, **loading},
                **{k: fingerprint(v) for k, v in inputs.items()}}
    run = OpenRun(getattr(args, folder_flag), settings, "--" + folder_flag.replace("_", "-"), adopt)
    run.open()
    return run
