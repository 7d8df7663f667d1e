"""Does selection pay? The train recipe on a quarter of a mixed pool chosen by each method.

The pool is heterogeneous on purpose (so that choosing can matter): ``--pool-per-part`` examples
each of bare two-digit sums/differences ("What is 47 + 38?"), bare three-digit ones, two-digit
word problems, and GSM8K problems (long multi-step solutions, a different and much harder format).
The test set is the arithmetic the pool is about: held-out two-digit, three-digit and word
problems (none of GSM8K: the base model solves almost none).

Every arm trains the same circuit (located once on the whole pool: SFT-loss gradient, top
``--circuit-fraction`` of each kind) with the same recipe (``circuit_peft.recipe.train_sft``,
pivotal weights, lr ``--lr``) for the same number of optimizer steps; only the data differs:

* ``circuitseer``: a ``--fraction`` subset by CircuitSeer (reasoning heads found on 8 pool rows,
  Gumbel-top-k sampling, seed = the arm's seed);
* ``ifd``: the top IFD rows (instruction-following difficulty, IFD <= 1);
* ``random``: a uniform subset (seed = the arm's seed);
* ``length-matched``: random with the token-length profile of the CircuitSeer subset;
* ``full``: the whole pool for 1/``--fraction`` fewer epochs (the same steps).

Per (arm, seed): accuracy on the test set (and per format), the share of generations that hit
``--max-new-tokens``, mean KL on general text. Each finished (arm, seed) is saved under
``--work-dir`` and reused by a re-run with the same settings. The last line printed is JSON.

    python benchmarks/selection.py --out benchmarks/results/selection_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import _bench
from _bench import ArmBench, mean_se

ARMS = ("circuitseer", "ifd", "random", "length-matched", "full")
PARTS = ("two_digit", "three_digit", "word", "gsm8k")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", default="../shared/data", help="gsm8k/test.jsonl (pool part) and text/ (KL)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--pool-per-part", type=int, default=64)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--n-test-per-format", type=int, default=40)
    p.add_argument("--epochs", type=float, default=4.0, help="epochs of a subset arm (full: epochs x fraction)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--circuit-fraction", type=float, default=0.02)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--kl-chunks", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default="/tmp/selection_bench")
    p.add_argument("--out", default=None)
    p.add_argument("--from-saved", action="store_true",
                   help="no training: summarise the (arm, seed) results already saved under --work-dir")
    args = p.parse_args(argv)
    bad = [a for a in args.arms.split(",") if a not in ARMS]
    if bad:
        p.error(f"--arms: unknown {bad}; choose from {ARMS}")
    if not 0 < args.fraction < 1:
        p.error(f"--fraction must be in (0, 1), got {args.fraction}")
    return args


def settings_key(args: argparse.Namespace) -> str:
    return _bench.settings_key(args, ("threads", "work_dir", "out", "arms", "seeds", "from_saved"))


def make_pool(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The mixed training pool (each row tagged with its ``part``)."""
    from circuit_peft.cca.problems import make_problems
    from circuit_peft.evaluate.data import load_gsm8k

    n = args.pool_per_part
    parts = {"two_digit": make_problems(n, "train", seed=0, kinds=("add", "sub")),
             "three_digit": make_problems(n, "train", seed=0, kinds=("add", "sub"), low=100, high=999),
             "word": make_problems(n, "train", seed=0, kinds=("word_add", "word_sub")),
             "gsm8k": load_gsm8k(args.data_dir, "test", limit=n)}
    return [{"question": r["question"], "answer": r["answer"], "part": part} for part in PARTS for r in parts[part]]


def make_test(args: argparse.Namespace) -> list[dict[str, Any]]:
    from circuit_peft.cca.problems import make_problems

    n = args.n_test_per_format
    parts = {"two_digit": make_problems(n, "test", seed=1, kinds=("add", "sub")),
             "three_digit": make_problems(n, "test", seed=1, kinds=("add", "sub"), low=100, high=999),
             "word": make_problems(n, "test", seed=1, kinds=("word_add", "word_sub"))}
    return [{"question": r["question"], "answer": r["answer"], "part": part} for part, rows in parts.items()
            for r in rows]


class Bench(ArmBench):
    def __init__(self, args: argparse.Namespace):
        super().__init__(args, settings_key(args))
        self.pool, self.test = make_pool(args), make_test(args)
        self._circuit = self._heads = None

    def circuit(self):
        """The circuit every arm trains: gradient-located on the whole pool (cached)."""
        from circuit_peft import Circuit
        from circuit_peft.recipe import SFTSettings, TrainConfig
        from circuit_peft.recipe.pipeline import locate_for_training

        path = self.work / f"circuit-{self.key}.json"
        if self._circuit is None and path.exists():
            self._circuit = Circuit.load(path)
        if self._circuit is None:
            cfg = TrainConfig(locate="gradient", shots=self.shots, sft=SFTSettings())
            self._circuit = locate_for_training(self.base, self.tok, self.pool, self.style, cfg, self.work / "mining",
                                                keep_fraction=self.args.circuit_fraction, progress=False)
            self._circuit.save(path)
            self.log(f"located the circuit on the pool: {self._circuit.counts()}")
        return self._circuit

    def heads(self):
        from circuit_peft.select import ReasoningHeads, find_reasoning_heads

        path = self.work / f"heads-{self.key}.json"
        if self._heads is None and path.exists():
            self._heads = ReasoningHeads.load(path)
        if self._heads is None:
            probe = self.pool[:: len(self.pool) // 8][:8]
            self._heads = find_reasoning_heads(self.base, self.tok, probe, method="ablation_estimate",
                                               prompt_field="question", solution_field="answer")
            self._heads.save(path)
        return self._heads

    def subset(self, arm: str, seed: int) -> list[int]:
        from circuit_peft.select import select_data

        if arm == "full":
            return list(range(len(self.pool)))
        heads = self.heads() if arm in ("circuitseer", "length-matched") else None
        result = select_data(self.base, self.tok, self.pool, method=arm, fraction=self.args.fraction, heads=heads, seed=seed)
        return sorted(int(i) for i in result.indices)

    def arm_path(self, arm: str, seed: int) -> Path:
        return self.arms_dir / f"{arm}-seed{seed}.json"

    def run(self, arm: str, seed: int) -> dict[str, Any]:
        path = self.arm_path(arm, seed)
        if path.exists():
            return json.loads(path.read_text())
        from peft import get_peft_model

        from circuit_peft.evaluate.accuracy import evaluate_accuracy
        from circuit_peft.evaluate.data import load_text
        from circuit_peft.evaluate.side_effects import mean_kl
        from circuit_peft.files import atomic_write_json
        from circuit_peft.models import load_model
        from circuit_peft.recipe.sft import SFTSettings, gold_examples, train_sft

        t0 = time.perf_counter()
        rows = self.subset(arm, seed)
        chosen = [self.pool[i] for i in rows]
        epochs = self.args.epochs * (self.args.fraction if arm == "full" else 1.0)
        model = get_peft_model(load_model(self.args.model), self.circuit().to_config(projections="paper"))
        settings = SFTSettings(learning_rate=self.args.lr, epochs=epochs, pivotal_weight=5.0, seed=seed)
        train_sft(model, self.tok, gold_examples(self.tok, chosen, self.style, self.shots), settings,
                  str(self.work / "trainer"), style=self.style)
        acc = evaluate_accuracy(model, self.tok, self.test, style=self.style, shots=self.shots,
                                max_new_tokens=self.args.max_new_tokens, batch_size=60, progress=False)
        by_part = {p: [r["correct"] for r, t in zip(acc.records, self.test) if t["part"] == p]
                   for p in ("two_digit", "three_digit", "word")}
        kl = mean_kl(None, model, self.tok, load_text(self.args.data_dir), max_chunks=self.args.kl_chunks,
                     progress=False)["kl"]
        result = {"arm": arm, "seed": seed, "rows": rows, "parts": {p: sum(self.pool[i]["part"] == p for i in rows)
                                                                     for p in PARTS},
                  "test_acc": acc.accuracy, "test_capped": acc.capped_fraction, "kl": kl,
                  **{f"acc_{p}": sum(v) / len(v) for p, v in by_part.items()}, "seconds": time.perf_counter() - t0}
        atomic_write_json(path, result)
        self.log(f"{arm} seed {seed}: test {acc.accuracy:.3f} (capped {acc.capped_fraction:.2f}) KL {kl:.4f} "
                 f"parts {result['parts']} ({result['seconds']:.0f} s)")
        return result

    def base_row(self) -> dict[str, Any]:
        from circuit_peft.evaluate.accuracy import evaluate_accuracy

        path = self.arms_dir / "base.json"
        if path.exists():
            return json.loads(path.read_text())
        acc = evaluate_accuracy(self.base, self.tok, self.test, style=self.style, shots=self.shots,
                                max_new_tokens=self.args.max_new_tokens, batch_size=60, progress=False)
        out = {"test_acc": acc.accuracy, "test_capped": acc.capped_fraction}
        from circuit_peft.files import atomic_write_json

        atomic_write_json(path, out)
        return out


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm, rows in results.items():
        stats: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
        for key in ("test_acc", "acc_two_digit", "acc_three_digit", "acc_word", "test_capped", "kl"):
            stats[key], stats[f"{key}_se"] = mean_se([r[key] for r in rows])
        stats["parts"] = {p: sum(r["parts"][p] for r in rows) / len(rows) for p in PARTS}
        out[arm] = stats
    return out


def markdown_table(summary: dict[str, Any], base: dict[str, Any]) -> str:
    def cell(s, k, d=3):
        se = s.get(f"{k}_se")
        return f"{s[k]:.{d}f}" + ("" if se is None or se != se else f" ± {se:.{d}f}")

    lines = ["| arm | seeds | pool parts chosen (2-digit/3-digit/word/GSM8K) | test acc | 2-digit | 3-digit | word | "
             "capped | KL |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| base | - | - | {base['test_acc']:.3f} | | | | {base['test_capped']:.2f} | - |"]
    for arm, s in summary.items():
        parts = "/".join(f"{s['parts'][p]:.0f}" for p in PARTS)
        lines.append(f"| {arm} | {len(s['seeds'])} | {parts} | {cell(s, 'test_acc')} | {cell(s, 'acc_two_digit')} | "
                     f"{cell(s, 'acc_three_digit')} | {cell(s, 'acc_word')} | {cell(s, 'test_capped', 2)} | "
                     f"{cell(s, 'kl', 4)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from circuit_peft.files import atomic_write_text

    bench = Bench(args)
    base = bench.base_row()
    bench.log(f"base: test {base['test_acc']:.3f} (capped {base['test_capped']:.2f})")
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            if not args.from_saved or bench.arm_path(arm, seed).exists():
                results.setdefault(arm, []).append(bench.run(arm, seed))
    summary = summarise(results)
    table = markdown_table(summary, base)
    print(table)
    res = {"benchmark": "selection", "model": args.model, "settings": vars(args), "base": base, "arms": summary,
           "seconds": time.perf_counter() - bench.started}
    for arm in ("circuitseer", "ifd", "length-matched", "full"):
        if arm in summary and "random" in summary:
            res[f"{arm}_minus_random_acc"] = _paired(results, arm, "random")
    line = json.dumps(res, default=float)
    if args.out:
        atomic_write_text(args.out, line + "\n")
    print(line)
    return res


def _paired(results, a: str, b: str) -> list[float]:
    """Mean and standard error over seeds of the paired difference ``a - b`` in test accuracy."""
    ra, rb = ({r["seed"]: r["test_acc"] for r in results[x]} for x in (a, b))
    return list(mean_se([ra[s] - rb[s] for s in sorted(set(ra) & set(rb))]))


if __name__ == "__main__":
    main(sys.argv[1:])
