"""``circuit-peft mine``: mine pivotal-token records (resumable jsonl + a datasets-loadable folder)."""

from __future__ import annotations

import argparse

from ._args import positive
from ._cca import (
    add_mining_args, add_problem_args, add_runtime_args, load_problem_rows, load_runtime, mining_config, open_run,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "mine",
        help="mine pivotal tokens (where the model's own traces go wrong) as contrastive records",
        description="For each problem: one greedy and up to --n-samples sampled traces; pairs where correctness "
                    "flips give {context_ids, desired_id, undesired_id, problem_id} records, appended to "
                    "OUT/records.jsonl per problem. Re-running the same command resumes a killed run.",
    )
    add_runtime_args(p)
    add_problem_args(p)
    add_mining_args(p)
    p.add_argument("--out", required=True, help="output folder (records.jsonl, progress.jsonl, summary.json)")
    p.add_argument("--max-problems", type=positive(int), default=None, help="stop after mining N more problems (resume later)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..cca.mining import mine_pivotal_tokens
    from ._cca import problem_checker

    cfg = mining_config(args)
    checker, rows = problem_checker(args, load_problem_rows(args.problems, args.n_problems, "train", args.seed))
    run = open_run(args, problems=rows)  # another run's folder or a second writer: refused before the model loads
    try:
        model, tokenizer = load_runtime(args)
        result = mine_pivotal_tokens(model, tokenizer, rows, args.out, cfg, answer_format=checker,
                                     max_problems=args.max_problems, progress=not args.no_progress)
    finally:
        run.close()
    s = result.stats
    print(f"{s['records']} records from {s['mined']} of {len(rows)} problems (greedy right on {s['greedy_correct']}); "
          f"statuses: { {k: v for k, v in s.items() if k not in ('problems', 'mined', 'records', 'greedy_correct')} }")
    if result.bad_gold:
        print(f"skipped {len(result.bad_gold)} problems without a parsable gold answer (first: {result.bad_gold[:5]})")
    print(f"records: {args.out}/records.jsonl  (datasets: circuit_peft.cca.load_records({args.out!r}))")
    return 0
