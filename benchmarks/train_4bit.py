"""`circuit-peft train --load-in-4bit` on SmolLM2 (QLoRA-style: the base in bitsandbytes NF4, the circuit's slices
in float32), then the saved adapter loaded back onto a fresh 4-bit base and the held-out set evaluated again.

Runs the demo's recipe (``circuit_peft.commands.demo.TRAIN_DEMO_ARGS``: 64 arithmetic problems, gradient
locating, 2 % circuit, 4 epochs of pivotal SFT, 100 held-out problems) with ``--load-in-4bit`` on the CPU in
float32 compute, and writes ``benchmarks/results/train_4bit_smollm2.json``: held-out accuracy before/after with
standard errors and the paired change in SEs (from the run's report), and whether the reloaded adapter gives
the same per-problem results as the run's own after-training evaluation.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_4bit.py [--out RUN_DIR] [--threads 2] [--n-train 32]

The committed result used ``--n-train 32`` (half the demo's rows, to fit a shared, loaded 2-core box).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "train_4bit_smollm2.json"


def run_train(out: Path, threads: int, extra: list[str]) -> dict:
    """``circuit-peft train`` with the demo's arguments, ``--load-in-4bit`` and ``extra`` (later flags win); its report."""
    from circuit_peft.cli import build_parser
    from circuit_peft.commands.demo import TRAIN_DEMO_ARGS

    argv = ["train", "--model", "smollm2", *TRAIN_DEMO_ARGS, "--load-in-4bit", "--device", "cpu",
            "--dtype", "float32", "--threads", str(threads), "--out", str(out), *extra]
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.func(args) != 0:
        raise SystemExit("train failed")
    return json.loads((out / "report.json").read_text())


def reload_and_evaluate(out: Path, report: dict) -> dict:
    """The saved adapter on a fresh 4-bit base: held-out accuracy on the same problems and prompts."""
    from peft import PeftModel

    from circuit_peft import LoadSpec, load_model, load_tokenizer
    from circuit_peft.commands.train import load_examples
    from circuit_peft.evaluate.accuracy import evaluate_accuracy
    from circuit_peft.evaluate.answers import answer_checker

    cfg = report["settings"]["config"]
    base = load_model("smollm2", spec=LoadSpec(device="cpu", dtype="float32", load_in_4bit=True))
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    tokenizer = load_tokenizer("smollm2")
    rows = load_examples("arithmetic", "test", report["n_heldout"], cfg["seed"], None)
    result = evaluate_accuracy(model, tokenizer, rows, style=report["style"], shots=cfg["shots"],
                               question_field=cfg["question_field"],
                               answer_format=answer_checker(cfg.get("answer", "number"), cfg["answer_field"],
                                                            cfg["question_field"]),
                               max_new_tokens=report["before"]["max_new_tokens"], batch_size=cfg["eval_batch_size"])
    correct = [int(r["correct"]) for r in result.records]
    return {"accuracy": result.accuracy, "stderr": result.stderr, "count": result.count,
            "same_per_problem_results_as_the_run": correct == report["after"]["correct"],
            "problems_that_differ": sum(a != b for a, b in zip(correct, report["after"]["correct"]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/train_4bit_smollm2", help="run folder (resumable)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-train", type=int, default=None, help="training problems (default: the demo's 64)")
    p.add_argument("--no-reload", action="store_true", help="skip loading the adapter back (result says so)")
    args = p.parse_args()
    extra = ["--n-train", str(args.n_train)] if args.n_train else []
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    start = time.perf_counter()
    report = run_train(out, args.threads, extra)
    train_seconds = time.perf_counter() - start
    before, after = report["before"], report["after"]
    diffs = [b - a for a, b in zip(before["correct"], after["correct"])]
    from circuit_peft.stats import mean_se

    change, change_se = mean_se(diffs)
    start = time.perf_counter()
    reloaded = "not run (--no-reload)" if args.no_reload else reload_and_evaluate(out, report)
    result = {
        "model": "smollm2 (SmolLM2-135M-Instruct), bitsandbytes NF4 double-quantized, compute float32, CPU",
        "command": report["command"],
        "before": {k: before[k] for k in ("accuracy", "stderr", "count")},
        "after": {k: after[k] for k in ("accuracy", "stderr", "count")},
        "change": change, "change_se_paired": change_se, "change_in_se": change / change_se if change_se else None,
        "circuit": {"components": report["locate"]["components"], "trainable_params": report["trainable_params"]},
        "reloaded_on_fresh_4bit_base": reloaded,
        "seconds": {"train_run": round(train_seconds, 1), "reload_and_evaluate": round(time.perf_counter() - start, 1)},
        "threads": args.threads,
        "bitsandbytes": __import__("bitsandbytes").__version__, "torch": torch.__version__,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
