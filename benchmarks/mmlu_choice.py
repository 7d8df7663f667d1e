"""A multiple-choice task end to end: ``circuit-peft train --answer choice`` on MMLU rows (exploratory).

Rows are MMLU's own shape (the hub's ``cais/mmlu`` schema: ``question``, ``choices``, ``answer`` = the
right option's 0-based index), read from one subject's test csv under ``--data-dir`` (the project's
``../shared/data``: ``mmlu/test/<subject>_test.csv``). ``--answer choice`` lists the options under the
question (``A) ...``), trains the circuit on the gold letter and reads the model's letter at evaluation.
Our choices: one subject (``miscellaneous``: short general-knowledge questions), rows whose question and
options are at most ``--max-chars`` characters (cost on a CPU), shuffled with ``--seed`` and split into
disjoint training and held-out files, and one instruction line appended to each question.

    python benchmarks/mmlu_choice.py --data-dir ../shared/data --out /tmp/mmlu_run \\
        --result benchmarks/results/mmlu_choice_smollm2.json

Ends with one JSON line (also written to ``--result``): before/after held-out accuracy with standard
errors, the circuit, the command, the rows used and the wall time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

INSTRUCTION = "Answer with the letter of the correct option."


def mmlu_rows(data_dir: str, subject: str, max_chars: int) -> list[dict]:
    """The subject's test rows as ``{question, choices, answer, mmlu_row}`` (short rows only)."""
    from circuit_peft.files import read_rows

    rows = read_rows(Path(data_dir) / "mmlu" / "test" / f"{subject}_test.csv")
    out = []
    for i, r in enumerate(rows):
        choices = [r[f"choice{k}"] for k in range(4)]
        if len(r["question"]) + sum(map(len, choices)) > max_chars:
            continue
        out.append({"question": f"{r['question'].strip()} {INSTRUCTION}", "choices": choices,
                    "answer": int(r["answer"]), "mmlu_row": i})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--subject", default="miscellaneous")
    p.add_argument("--max-chars", type=int, default=240)
    p.add_argument("--n-train", type=int, default=80)
    p.add_argument("--n-heldout", type=int, default=120)
    p.add_argument("--epochs", default="2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="1")
    p.add_argument("--out", required=True, help="run folder (resumable)")
    p.add_argument("--result", default=None, help="JSON file for the summary")
    args = p.parse_args(argv)

    rows = mmlu_rows(args.data_dir, args.subject, args.max_chars)
    random.Random(args.seed).shuffle(rows)
    if len(rows) < args.n_train + args.n_heldout:
        sys.exit(f"only {len(rows)} rows of {args.subject} are at most {args.max_chars} characters")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    split = {"train": rows[: args.n_train], "heldout": rows[args.n_train : args.n_train + args.n_heldout]}
    for name, path in files.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in split[name]))

    from circuit_peft.cli import main as cli

    command = ["train", "--model", "smollm2", "--answer", "choice", "--data", str(files["train"]),
               "--heldout", str(files["heldout"]), "--epochs", args.epochs, "--max-new-tokens", "16",
               "--max-cut-share", "1", "--threads", args.threads, "--seed", str(args.seed), "--out", str(out / "run")]
    t0 = time.perf_counter()
    code = cli(command)
    wall = time.perf_counter() - t0
    if code != 0:
        return code
    report = json.loads((out / "run" / "report.json").read_text())
    b, a = report["before"], report["after"]
    se = (a["stderr"] ** 2 + b["stderr"] ** 2) ** 0.5
    summary = {
        "task": f"MMLU {args.subject} (test csv), --answer choice", "model": "smollm2 (SmolLM2-135M-Instruct, float32, CPU)",
        "command": "circuit-peft " + " ".join(command), "benchmark_args": vars(args),
        "n_train": report["n_train"], "n_heldout": report["n_heldout"],
        "mmlu_rows": {k: [r["mmlu_row"] for r in v] for k, v in split.items()},
        "before": {k: b[k] for k in ("accuracy", "stderr", "count", "capped_fraction")},
        "after": {k: a[k] for k in ("accuracy", "stderr", "count", "capped_fraction")},
        "change": a["accuracy"] - b["accuracy"], "change_se_unpaired": se,
        "change_se_paired": _paired_se(b.get("correct"), a.get("correct")),
        "circuit": {k: report["locate"][k] for k in ("components", "counts", "component_fraction")},
        "trainable_params": report["trainable_params"], "wall_seconds": wall,
        "stage_seconds": _stage_seconds(out / "run"),
    }
    if args.result:
        Path(args.result).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


def _paired_se(before: list[int] | None, after: list[int] | None) -> float | None:
    """SE of after - before paired over the same held-out problems (None without per-problem results)."""
    if not before or not after or len(before) != len(after):
        return None
    from circuit_peft.stats import mean_se

    return mean_se([x - y for x, y in zip(after, before)])[1]


def _stage_seconds(run: Path) -> dict[str, float]:
    return {p.stem: round(json.loads(p.read_text()).get("seconds", 0.0), 1) for p in sorted((run / "stages").glob("*.json"))}


if __name__ == "__main__":
    raise SystemExit(main())
