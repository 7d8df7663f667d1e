"""Is a task in CCA's regime? Greedy accuracy, sampled accuracy and flipping traces on a validation draw.

CCA (arXiv 2512.16914) mines pivots only where the model is *sometimes* right: a record needs a sampled
trace whose correctness differs from the greedy one. This script measures, per candidate task and model, on
a seeded draw of the generated family's **training** split (the hash split of ``circuit_peft.cca.problems``
never puts these problems in the test split, so a pre-registered test draw is disjoint by construction):

- greedy accuracy (and the share of greedy answers cut by the token cap);
- sampled accuracy at T = 0.8 and at T = 1.2 (``--n-samples`` traces per problem at each temperature);
- the share of problems with a flipping trace by the paper's rule (greedy right: a wrong trace among the
  T = 1.2 samples; greedy wrong: a right one among the T = 0.8 samples);
- records per problem of the prefix and branching pivots, built from those same traces by the miner's own
  pivot rules (:meth:`circuit_peft.cca.mining.Miner.pivot`: ``prefix`` and ``branching``, so one sampling pass
  serves both methods).

Candidates: the generated tasks of ``circuit_peft.cca.problems.TASKS`` (their training kinds) and
``small_arithmetic`` (the arithmetic kinds with operands in [2, 20]). Prompt: the model's default style
(chat for SmolLM2, few-shot for Gemma-3 base) with the task's two worked examples, as the benchmarks use.

    python benchmarks/regime.py --model smollm2 --tasks comparison,small_arithmetic,arithmetic --n 64 \
        --threads 1 --out benchmarks/results/regime_smollm2.json

The last line printed is JSON (per task: greedy, sampled, flip share, records per problem).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

EXTRA_TASKS = {"small_arithmetic": {"task": "arithmetic", "low": 2, "high": 20}}  # regime candidates only


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default="comparison,small_arithmetic,arithmetic")
    p.add_argument("--n", type=int, default=64, help="problems per task (a draw of the training split)")
    p.add_argument("--seed", type=int, default=1000, help="the draw's seed (validation draws: 1000+)")
    p.add_argument("--n-samples", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-branch-completions", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    return p


def task_problems(name: str, n: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict]:
    """The candidate's problems (training split, seeded), its worked examples and its definition."""
    from circuit_peft.cca.problems import TASKS, count_problems, make_problems

    spec = EXTRA_TASKS.get(name, {"task": name, "low": 10, "high": 99})
    task = TASKS[spec["task"]]
    rows = make_problems(n, "train", seed=seed, kinds=task["kinds"], low=spec["low"], high=spec["high"])
    pool = {split: count_problems(split, task["kinds"], spec["low"], spec["high"]) for split in ("train", "test")}
    return rows, [dict(s) for s in task["shots"]], {**spec, "kinds": list(task["kinds"]), "pool": pool}


def measure(model, tok, name: str, args: argparse.Namespace, style: str) -> dict[str, Any]:
    """Greedy and sampled traces once; accuracies, flips and the two pivot methods' records from them."""
    from circuit_peft.cca.mining import Miner, MiningConfig, generate_traces, parse_problems
    from circuit_peft.evaluate.accuracy import FEWSHOT_STOP
    from circuit_peft.evaluate.answers import NumberAnswer

    rows, shots, spec = task_problems(name, args.n, args.seed)
    cfg = MiningConfig(method="branching", n_samples=args.n_samples, max_new_tokens=args.max_new_tokens,
                       max_branch_completions=args.max_branch_completions, prompt_style=style, shots=shots,
                       seed=args.seed)
    miner = Miner(model, tok, cfg, NumberAnswer())
    problems, _ = parse_problems(tok, rows, cfg, NumberAnswer())
    prompts = [p.prompt_ids for p in problems]
    stop = [FEWSHOT_STOP] if style == "fewshot" else None
    t0 = time.perf_counter()
    greedy = generate_traces(model, tok, prompts, cfg.max_new_tokens, stop_strings=stop)
    samples = {t: generate_traces(model, tok, prompts, cfg.max_new_tokens, temperature=t, num_return_sequences=cfg.n_samples,
                            seed=args.seed + i, stop_strings=stop)
               for i, t in enumerate((cfg.temperature_if_wrong, cfg.temperature_if_right))}
    n, k = len(problems), cfg.n_samples
    right = {t: [[miner.correct(s, p.gold) for s in samples[t][i * k:(i + 1) * k]] for i, p in enumerate(problems)]
             for t in samples}
    for i, (p, g) in enumerate(zip(problems, greedy)):
        p.greedy, p.greedy_correct = g, miner.correct(g, p.gold)
        temp = cfg.temperature_if_right if p.greedy_correct else cfg.temperature_if_wrong
        flips = [j for j, ok in enumerate(right[temp][i]) if ok != p.greedy_correct]
        p.flip = samples[temp][i * k + flips[0]] if flips else None
    generation_s = time.perf_counter() - t0
    records = _pivot_records(miner, problems)
    cut = sum(len(g) >= cfg.max_new_tokens and not (stop and FEWSHOT_STOP in tok.decode(g)) for g in greedy)
    flipped = [p for p in problems if p.flip is not None]
    return {
        "task": spec, "n": n, "n_samples": k, "max_new_tokens": cfg.max_new_tokens, "style": style,
        "greedy_accuracy": sum(p.greedy_correct for p in problems) / n, "greedy_cut_share": cut / n,
        "sampled_accuracy": {str(t): sum(map(sum, right[t])) / (n * k) for t in right},
        "flip_share": len(flipped) / n,
        "flip_share_greedy_right": _share([p for p in problems if p.greedy_correct], flipped),
        "flip_share_greedy_wrong": _share([p for p in problems if not p.greedy_correct], flipped),
        **records, "generation_s": generation_s, "seconds": time.perf_counter() - t0,
        "example": {"question": rows[0]["question"], "greedy": tok.decode(problems[0].greedy)},
    }


def _share(group: list, flipped: list) -> float | None:
    ids = {id(p) for p in flipped}
    return sum(id(p) in ids for p in group) / len(group) if group else None


def _pivot_records(miner, problems) -> dict[str, Any]:
    """Prefix and branching records per problem from the same greedy and flipping traces (the miner's rules)."""
    import copy

    out: dict[str, Any] = {}
    for method in ("prefix", "branching"):
        statuses: dict[str, int] = {}
        count, positions = 0, []
        for p in problems:
            q = copy.copy(p)
            q.records, q.status = [], "pending"
            if q.flip is None:
                q.status = "no_flip"
            else:
                miner.pivot(q, method)
            status = q.status if q.status != "pending" else ("ok" if q.records else "no_record")
            statuses[status] = statuses.get(status, 0) + 1
            count += len(q.records)
            positions += [r["position"] for r in q.records]
        out[f"{method}_records"] = count
        out[f"{method}_records_per_problem"] = count / len(problems)
        out[f"{method}_statuses"] = statuses
        out[f"{method}_pivot_positions"] = positions
    return out


def main() -> None:
    args = build_parser().parse_args()
    import torch

    import circuit_peft
    from circuit_peft.taskdata.prompts import default_prompt_style

    torch.set_num_threads(args.threads)
    model, tok = circuit_peft.load_model(args.model), circuit_peft.load_tokenizer(args.model)
    model.eval()
    style = default_prompt_style(tok)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("settings", {}).update({k: v for k, v in vars(args).items() if k != "tasks"})
    results["settings"]["split"] = "train (validation draw; the test split is never read)"
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        if name in results.get("tasks", {}):
            print(f"{name}: done earlier, kept")
            continue
        r = measure(model, tok, name, args, style)
        results.setdefault("tasks", {})[name] = r
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))  # each task saved as it finishes
        print(f"{name}: greedy {r['greedy_accuracy']:.3f} (cut {r['greedy_cut_share']:.2f}), sampled "
              f"{r['sampled_accuracy']}, flips {r['flip_share']:.2f}, records/problem prefix "
              f"{r['prefix_records_per_problem']:.2f} branching {r['branching_records_per_problem']:.2f} "
              f"({r['seconds']:.0f} s)", flush=True)
    keys = ("greedy_accuracy", "sampled_accuracy", "flip_share", "prefix_records_per_problem",
            "branching_records_per_problem")
    print(json.dumps({"model": args.model, **{name: {k: r[k] for k in keys} for name, r in results["tasks"].items()}}))


if __name__ == "__main__":
    main()
