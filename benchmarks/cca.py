"""Constructive Circuit Amplification vs LoRA vs full fine-tuning on SmolLM2 (two-digit arithmetic).

Same seed-fixed problems for every method: training problems (mined for CCA, gold solutions for
SFT), validation problems (CCA's best-step selection), held-out test problems (accuracy). Methods:

The best circuit method (``best_circuit_*``) is chosen on the validation problems' accuracy, never the test
problems' (each method's ``<method>_val_acc``; the test accuracy of the chosen one is reported). Every arm is a
typed spec (:class:`CCAArm`, :class:`SFTArm`); the CCA arms run the library's one CCA update
(:func:`circuit_peft.cca.fit.cca_update`, the best validated step kept, as ``amplify`` does).

* base - the model as is.
* cca_prefix / cca_branching / cca_digit - mine (prefix / branching / first-wrong-digit pivots),
  locate the circuit by logit-difference attribution (``--circuit-fraction`` of each kind), update
  only it (``--loss``, ``--optimizer``, ``--lr``, ``--steps``; best validation step kept).
* cca_nomask - the branching update on every weight of the same projections (the paper's ablation).
* circuit_sft - the branching circuit as a ``CircuitConfig`` adapter trained by SFT on the gold
  solutions with pivotal-token weighting (answer digits weight 5; ``circuit_peft.cca.weighting``).
* lora - LoRA r=16, alpha 32, dropout ``--lora-dropout`` (0; 0.1 before session 18) on all linear layers, SFT on
  the same gold solutions.
* full - full fine-tuning, SFT on the same gold solutions.

Side effects per method against the base: MMLU delta (5-shot, log-likelihood), TruthfulQA MC1
delta, mean KL of next-token distributions on general text. Prints figures; the last line is JSON.

    python benchmarks/cca.py --data-dir ../shared/data --n-train 64 --n-test 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

ALL_METHODS = ("base", "cca_prefix", "cca_branching", "cca_digit", "cca_nomask", "circuit_sft", "lora", "full")
CIRCUIT_METHODS = ("cca_prefix", "cca_branching", "cca_digit", "circuit_sft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="mmlu/test, truthfulqa/, text/ (side effects)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {ALL_METHODS}")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--n-samples", type=int, default=4, help="sampled traces per problem (prefix/branching)")
    p.add_argument("--max-branch-completions", type=int, default=8)
    p.add_argument("--circuit-fraction", type=float, default=0.02)
    p.add_argument("--max-update-records", type=int, default=None,
                   help="CCA updates use at most this many records (seeded draw; the circuit is located on all)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam", choices=("sgd", "adam"))
    p.add_argument("--loss", default="logsigmoid", choices=("logit_diff", "logsigmoid", "capped"))
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--sft-epochs", type=int, default=3)
    p.add_argument("--sft-batch-size", type=int, default=8)
    p.add_argument("--sft-lr", type=float, default=1e-3, help="LoRA and circuit SFT learning rate")
    p.add_argument("--full-lr", type=float, default=3e-5, help="full fine-tuning learning rate")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="LoRA dropout (0, PEFT's default and the library's LoRA controls' since session 18: the "
                        "trainer then runs the prompt prefix the rows share once; the results before used 0.1)")
    p.add_argument("--pivotal-weight", type=float, default=5.0)
    p.add_argument("--source", default="cca_branching", choices=("cca_prefix", "cca_branching", "cca_digit"),
                   help="whose records/circuit cca_nomask, circuit_sft and the speed-up use (default cca_branching)")
    p.add_argument("--mmlu-subjects", default="elementary_mathematics,high_school_geography")
    p.add_argument("--mmlu-limit", type=int, default=30, help="MMLU rows per subject")
    p.add_argument("--truthfulqa-limit", type=int, default=60)
    p.add_argument("--kl-chunks", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default="/tmp/cca_bench", help="mining records (resumable) and adapters")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p.parse_args(argv)


@dataclass(frozen=True)
class CCAArm:
    """A CCA arm: the update of ``source``'s circuit on ``source``'s records (``mask=False``: every row of the
    circuit's projections in every layer, the paper's ablation)."""

    name: str
    source: str
    mask: bool = True


@dataclass(frozen=True)
class SFTArm:
    """An SFT arm on the gold solutions: ``adapter`` "circuit" (the source circuit), "lora" or "full", at ``lr``,
    the answer's tokens weighted ``pivotal_weight``."""

    name: str
    adapter: str
    lr: float
    pivotal_weight: float = 1.0


MINING_VARIANTS = {"cca_prefix": dict(method="prefix"), "cca_branching": dict(method="branching"),
                   "cca_digit": dict(pivot="digit")}


def arms(args: argparse.Namespace, methods: list[str]) -> tuple[list[CCAArm], list[SFTArm]]:
    """The typed arms ``methods`` names (base is measured first, always)."""
    cca = [CCAArm(m, m) for m in MINING_VARIANTS if m in methods]
    if "cca_nomask" in methods:
        cca.append(CCAArm("cca_nomask", args.source, mask=False))
    sft = {"circuit_sft": SFTArm("circuit_sft", "circuit", args.sft_lr, args.pivotal_weight),
           "lora": SFTArm("lora", "lora", args.sft_lr), "full": SFTArm("full", "full", args.full_lr)}
    return cca, [sft[m] for m in ("circuit_sft", "lora", "full") if m in methods]


class Bench:
    """The shared state of one run: the data, the tokenizer, the results so far and the log."""

    def __init__(self, args: argparse.Namespace, methods: list[str]):
        from circuit_peft.cca.problems import ARITHMETIC_SHOTS, make_problems
        from circuit_peft.evaluate.data import load_mmlu, load_text, load_truthfulqa
        from circuit_peft.models import load_tokenizer

        self.args, self.work = args, Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.subjects = tuple(s for s in args.mmlu_subjects.split(",") if s)
        load_mmlu(args.data_dir, self.subjects)  # every data set read first: a missing file fails before model work
        load_truthfulqa(args.data_dir, 1)
        self.text = load_text(args.data_dir)
        self.shots = [dict(s) for s in ARITHMETIC_SHOTS]
        self.train = make_problems(args.n_train, "train", seed=args.seed)
        held = make_problems(args.n_val + args.n_test, "test", seed=args.seed)
        self.val, self.test = held[: args.n_val], held[args.n_val :]
        self.eval_kw = dict(style="chat", shots=self.shots, max_new_tokens=args.max_new_tokens,
                            batch_size=args.eval_batch_size)
        self.tok = load_tokenizer(args.model)
        self.start = time.perf_counter()
        self.res: dict[str, Any] = {"model": args.model, "n_train": len(self.train), "n_val": len(self.val),
                                    "n_test": len(self.test), "seed": args.seed, "methods": methods}
        self.timings: dict[str, float] = {}
        self.records: dict[str, Any] = {}
        self.circuits: dict[str, Any] = {}

    def fresh(self):
        from circuit_peft.models import load_model

        return load_model(self.args.model)

    def log(self, msg: str) -> None:
        from circuit_peft.files import atomic_write_text

        print(f"[{time.perf_counter() - self.start:6.0f} s] {msg}", flush=True)
        if self.args.out:  # partial results after every step, so a stopped run still leaves its numbers
            atomic_write_text(self.args.out, json.dumps({**self.res, "partial": True, "timings": self.timings},
                                                        default=float) + "\n")

    def accuracy(self, model, rows) -> float:
        from circuit_peft.evaluate.accuracy import evaluate_accuracy

        return evaluate_accuracy(model, self.tok, rows, progress=False, **self.eval_kw).accuracy

    def effects(self, prefix: str, model, base=None) -> None:
        from circuit_peft.evaluate.side_effects import side_effects

        a = self.args
        se = side_effects(model, self.tok, a.data_dir, base=base, mmlu_subjects=self.subjects, mmlu_limit=a.mmlu_limit,
                          truthfulqa_limit=a.truthfulqa_limit, text=self.text, kl_chunks=a.kl_chunks,
                          baseline=self.baseline, progress=False)
        self.res[f"{prefix}_mmlu_delta"], self.res[f"{prefix}_truthfulqa_delta"], self.res[f"{prefix}_kl"] = (
            se["mmlu_delta"], se["truthfulqa_delta"], se["kl"])


def measure_base(b: Bench):
    """The base model's test accuracy, MMLU and TruthfulQA (the side effects' baseline); returns the model."""
    from circuit_peft.evaluate.data import load_mmlu, load_truthfulqa
    from circuit_peft.evaluate.side_effects import mmlu_accuracy, truthfulqa_mc1

    base_model, t0 = b.fresh(), time.perf_counter()
    b.res["base_acc"] = b.accuracy(base_model, b.test)
    mmlu_data = load_mmlu(b.args.data_dir, b.subjects)
    tqa = load_truthfulqa(b.args.data_dir, b.args.truthfulqa_limit)
    b.baseline = {
        "mmlu_base": mmlu_accuracy(base_model, b.tok, mmlu_data, 5, "letter", b.args.mmlu_limit, 8, False)["accuracy"],
        "truthfulqa_base": truthfulqa_mc1(base_model, b.tok, tqa, 8, False)["accuracy"],
    }
    b.res["base_mmlu"], b.res["base_truthfulqa"] = b.baseline["mmlu_base"], b.baseline["truthfulqa_base"]
    b.timings["base_s"] = time.perf_counter() - t0
    b.log(f"base: acc {b.res['base_acc']:.3f}  MMLU {b.baseline['mmlu_base']:.3f}  "
          f"TruthfulQA {b.baseline['truthfulqa_base']:.3f}")
    return base_model


def mine_and_locate(b: Bench, base_model, names: list[str]) -> None:
    """Records and the attribution circuit of each mining variant in ``names`` (shared by the CCA arms and
    circuit SFT); a variant without records is kept as None."""
    from circuit_peft.cca.mining import MiningConfig, mine_pivotal_tokens
    from circuit_peft.cca.pipeline import AmplifyConfig, locate_circuit

    a = b.args
    mining_kw = dict(shots=b.shots, max_new_tokens=a.max_new_tokens, n_samples=a.n_samples, batch_size=16,
                     max_branch_completions=a.max_branch_completions, seed=a.seed)
    amp_cfg = AmplifyConfig(circuit_fraction=a.circuit_fraction)
    for name in [v for v in MINING_VARIANTS if v in names]:
        t0 = time.perf_counter()
        try:
            mined = mine_pivotal_tokens(base_model, b.tok, b.train, b.work / f"mining_{name}",
                                        MiningConfig(**mining_kw, **MINING_VARIANTS[name]), progress=False)
        except ValueError as err:
            b.log(f"{name}: no records ({err})")
            b.records[name] = None
            continue
        b.records[name] = mined.records
        b.res[f"{name}_records"] = len(mined.records)
        b.timings[f"{name}_mine_s"] = time.perf_counter() - t0
        b.circuits[name] = locate_circuit(base_model, mined.records, amp_cfg, progress=False)
        b.circuits[name].save(b.work / f"circuit_{name}.json")
        b.log(f"{name}: {len(mined.records)} records from {mined.stats['mined']} problems "
              f"(greedy right on {mined.stats['greedy_correct']}), {len(b.circuits[name].components)} components "
              f"({time.perf_counter() - t0:.0f} s)")


def capped(b: Bench, recs):
    """At most ``--max-update-records`` of ``recs`` (a seeded draw)."""
    if b.args.max_update_records is not None and len(recs) > b.args.max_update_records:
        return recs.shuffle(seed=b.args.seed).select(range(b.args.max_update_records))
    return recs


def run_cca(b: Bench, arm: CCAArm, validate: Callable) -> None:
    """One CCA arm: the library's CCA update, the best step on the validation problems kept; test accuracy."""
    from circuit_peft.cca.fit import CCAUpdateSpec, cca_update
    from circuit_peft.cca.update import UpdateConfig

    a, name, t0 = b.args, arm.name, time.perf_counter()
    recs = capped(b, b.records[arm.source])
    b.res[f"{name}_update_records"] = len(recs)
    update = UpdateConfig(steps=a.steps, lr=a.lr, optimizer=a.optimizer, loss=a.loss, eval_every=a.eval_every,
                          patience=a.patience, target="circuit" if arm.mask else "projections")
    result = cca_update(b.fresh(), recs, b.circuits[arm.source], CCAUpdateSpec(update, kept_step="best_validated"),
                        validate, tokenizer=b.tok, progress=False)
    b.res[f"{name}_acc"] = b.accuracy(result.model, b.test)
    b.res[f"{name}_best_step"], b.res[f"{name}_val"] = result.best_step, result.best_val
    b.res[f"{name}_val_acc"] = result.best_val  # the validation accuracy of the kept step
    b.res[f"{name}_margin"] = [result.initial_margin, result.final_margin]
    b.res[f"{name}_components_fraction"] = result.size["component_fraction"]
    b.res[f"{name}_params_fraction"] = result.size["param_fraction"]
    b.res[f"{name}_trainable_params"] = result.size["trainable_params"]
    b.effects(name, result.model)
    b.timings[f"{name}_s"] = time.perf_counter() - t0
    b.log(f"{name}: acc {b.res[f'{name}_acc']:.3f} (best step {result.best_step}, val {result.best_val:.3f}, margin "
          f"{result.initial_margin:.2f} -> {result.final_margin:.2f}), KL {b.res[f'{name}_kl']:.5f}, "
          f"{100 * result.size['component_fraction']:.2f} % components / "
          f"{100 * result.size['param_fraction']:.2f} % params ({b.timings[f'{name}_s']:.0f} s)")


def update_speedup(b: Bench, src: str) -> None:
    """The source circuit's size and the cached vs plain update step time."""
    from circuit_peft.cca.update import measure_update_speedup

    b.res["cca_source"] = src
    for key in ("components_fraction", "params_fraction", "trainable_params"):
        b.res[f"cca_{key}"] = b.res.get(f"{src}_{key}")
    sp = measure_update_speedup(b.fresh(), capped(b, b.records[src]), b.circuits[src], steps=2,
                                tokenizer=b.tok, projections="paper")
    b.res["update_speedup"] = sp["speedup"]
    b.res["update_step_s"] = {"plain": sp["plain_step_s"], "cached": sp["cached_step_s"], "cache": sp["cache_s"]}
    lowest = min(c.layer for c in b.circuits[src].components)
    b.log(f"update step: plain {sp['plain_step_s']:.2f} s, cached {sp['cached_step_s']:.2f} s "
          f"(x{sp['speedup']:.2f}; lowest trained layer {lowest})")


def sft_examples(b: Bench) -> list[dict[str, Any]]:
    """The gold solutions as prompt/completion rows, the answer's span marked pivotal."""
    from circuit_peft.taskdata.prompts import build_prompt, format_gsm8k_solution

    out = []
    for r in b.train:
        completion = format_gsm8k_solution(r["answer"])
        start = completion.index("=") + 2
        value = completion[start:].split("\n")[0]
        out.append({"prompt": build_prompt(b.tok, r["question"], "chat", b.shots), "completion": completion,
                    "pivotal_spans": [[start, start + len(value)]]})
    return out


def sft(b: Bench, arm: SFTArm, model):
    """Train ``model`` with Transformers' Trainer and pivotal weighting on the gold solutions."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from circuit_peft.cca.weighting import PivotalWeighting

    weighting = PivotalWeighting(pivotal_weight=arm.pivotal_weight)
    data = weighting.build_dataset(sft_examples(b), b.tok, add_special_tokens=False)
    data = data.remove_columns([c for c in data.column_names if c == "completion_mask"])
    targs = TrainingArguments(output_dir=str(b.work / f"sft_{arm.name}"), num_train_epochs=b.args.sft_epochs,
                              per_device_train_batch_size=b.args.sft_batch_size, learning_rate=arm.lr,
                              lr_scheduler_type="cosine", weight_decay=0.01, logging_steps=10**6,
                              save_strategy="no", report_to=[], use_cpu=True, seed=b.args.seed, disable_tqdm=True)
    b.tok.padding_side = "right"
    try:
        trainer = Trainer(model=model, args=targs, train_dataset=data,
                          data_collator=DataCollatorForSeq2Seq(b.tok, padding=True, label_pad_token_id=-100))
        weighting.attach(trainer)
        trainer.train()
    finally:
        b.tok.padding_side = "left"
    model.eval()
    return model


def sft_model(b: Bench, arm: SFTArm):
    """A fresh model prepared for ``arm`` (None: no source circuit for circuit SFT) and its size entries."""
    from peft import LoraConfig, get_peft_model

    from circuit_peft.tuner import circuit_size

    model = b.fresh()
    if arm.adapter == "circuit":
        if b.args.source not in b.circuits:
            return None
        config = b.circuits[b.args.source].to_config(projections="paper")
        model = get_peft_model(model, config)
        size = circuit_size(config, model)
        b.res["circuit_sft_params_fraction"] = size["param_fraction"]
        b.res["circuit_sft_components_fraction"] = size["component_fraction"]
    elif arm.adapter == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=b.args.lora_dropout,
                                                 target_modules="all-linear"))
        b.res["lora_trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        b.res["full_trainable_params"] = sum(p.numel() for p in model.parameters())
    return model


def run_sft(b: Bench, arm: SFTArm, base_model) -> None:
    """One SFT arm: trained, then test accuracy (and validation accuracy for the circuit, which competes for
    the best circuit method) and side effects (full fine-tuning against the base model)."""
    t0, name = time.perf_counter(), arm.name
    model = sft_model(b, arm)
    if model is None:
        b.log(f"{name}: skipped (no {b.args.source} circuit)")
        return
    model = sft(b, arm, model)
    b.res[f"{name}_acc"] = b.accuracy(model, b.test)
    if name in CIRCUIT_METHODS:
        b.res[f"{name}_val_acc"] = b.accuracy(model, b.val)
    b.effects(name, model, base=base_model if arm.adapter == "full" else None)
    b.timings[f"{name}_s"] = time.perf_counter() - t0
    b.log(f"{name}: acc {b.res[f'{name}_acc']:.3f}, MMLU {b.res[f'{name}_mmlu_delta']:+.3f}, TruthfulQA "
          f"{b.res[f'{name}_truthfulqa_delta']:+.3f}, KL {b.res[f'{name}_kl']:.5f} ({b.timings[f'{name}_s']:.0f} s)")


def summarise(b: Bench) -> None:
    """The best circuit method, chosen on validation accuracy (ties: the earlier method), and the targets."""
    res = b.res
    done = [m for m in CIRCUIT_METHODS if res.get(f"{m}_val_acc") is not None]
    if done:
        best = max(done, key=lambda m: res[f"{m}_val_acc"])
        res["best_circuit_chosen_on"] = "validation"
        res["best_circuit_method"], res["best_circuit_acc"], res["best_circuit_kl"] = best, res[f"{best}_acc"], res[f"{best}_kl"]
        res["best_circuit_val_acc"] = res[f"{best}_val_acc"]
        frac = res.get(f"{best}_components_fraction")
        res["best_circuit_components_fraction"] = frac
        gain = res["best_circuit_acc"] - res["base_acc"]
        res["target_gain_met"] = bool(gain >= 0.10 and frac is not None and frac <= 0.02)
        if res.get("lora_kl"):
            res["target_kl_met"] = bool(res["best_circuit_kl"] is not None and res["best_circuit_kl"] <= res["lora_kl"] / 2)
    res["test_stderr_at_base"] = math.sqrt(max(res["base_acc"] * (1 - res["base_acc"]), 1e-9) / len(b.test))
    res["timings"] = b.timings
    res["seconds"] = time.perf_counter() - b.start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from circuit_peft.cca.update import accuracy_validator
    from circuit_peft.files import atomic_write_text

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    cca_arms, sft_arms = arms(args, methods)
    b = Bench(args, methods)
    base_model = measure_base(b)
    mine_and_locate(b, base_model, sorted({arm.source for arm in cca_arms}
                                          | ({args.source} if "circuit_sft" in methods else set())))
    validate = accuracy_validator(b.tok, b.val, **b.eval_kw)
    for arm in cca_arms:
        if b.records.get(arm.source) is not None:
            run_cca(b, arm, validate)
    if b.records.get(args.source) is not None:
        update_speedup(b, args.source)
    for arm in sft_arms:
        run_sft(b, arm, base_model)
    summarise(b)
    print("\n" + " ".join(f"{m}={b.res[f'{m}_acc']:.3f}" for m in ALL_METHODS if f"{m}_acc" in b.res))
    line = json.dumps(b.res, default=float)
    if args.out:
        atomic_write_text(args.out, line + "\n")
    print(line)
    return b.res


if __name__ == "__main__":
    main(sys.argv[1:])
