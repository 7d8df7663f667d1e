"""Constructive Circuit Amplification vs LoRA vs full fine-tuning on SmolLM2 (two-digit arithmetic).

Same seed-fixed problems for every method: training problems (mined for CCA, gold solutions for
SFT), validation problems (CCA's best-step selection), held-out test problems (accuracy). Methods:

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
from pathlib import Path
from typing import Any

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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from peft import LoraConfig, get_peft_model

    from circuit_peft.cca.mining import MiningConfig, mine_pivotal_tokens
    from circuit_peft.cca.pipeline import AmplifyConfig, locate_circuit
    from circuit_peft.cca.problems import ARITHMETIC_SHOTS, make_problems
    from circuit_peft.cca.update import accuracy_validator, amplify_update, measure_update_speedup
    from circuit_peft.evaluate.accuracy import evaluate_accuracy
    from circuit_peft.evaluate.data import load_mmlu, load_text, load_truthfulqa
    from circuit_peft.evaluate.side_effects import mmlu_accuracy, side_effects, truthfulqa_mc1
    from circuit_peft.files import atomic_write_text
    from circuit_peft.models import load_model, load_tokenizer
    from circuit_peft.tuner import circuit_size

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    subjects = tuple(s for s in args.mmlu_subjects.split(",") if s)
    # read every data set first: a missing file fails before model work
    load_mmlu(args.data_dir, subjects)
    load_truthfulqa(args.data_dir, 1)
    text = load_text(args.data_dir)

    shots = [dict(s) for s in ARITHMETIC_SHOTS]
    train = make_problems(args.n_train, "train", seed=args.seed)
    held = make_problems(args.n_val + args.n_test, "test", seed=args.seed)
    val, test = held[: args.n_val], held[args.n_val :]
    eval_kw = dict(style="chat", shots=shots, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
    tok = load_tokenizer(args.model)
    start_all = time.perf_counter()
    res: dict[str, Any] = {"model": args.model, "n_train": len(train), "n_val": len(val), "n_test": len(test),
                           "seed": args.seed, "methods": methods}
    timings: dict[str, float] = {}

    def fresh():
        return load_model(args.model)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start_all:6.0f} s] {msg}", flush=True)
        if args.out:  # partial results after every step, so a stopped run still leaves its numbers
            atomic_write_text(args.out, json.dumps({**res, "partial": True, "timings": timings}, default=float) + "\n")

    def test_acc(model) -> float:
        r = evaluate_accuracy(model, tok, test, progress=False, **eval_kw)
        return r.accuracy

    # ----- base --------------------------------------------------------------------------------
    base_model = fresh()
    t0 = time.perf_counter()
    res["base_acc"] = test_acc(base_model)
    mmlu_data = load_mmlu(args.data_dir, subjects)
    tqa = load_truthfulqa(args.data_dir, args.truthfulqa_limit)
    baseline = {
        "mmlu_base": mmlu_accuracy(base_model, tok, mmlu_data, 5, "letter", args.mmlu_limit, 8, False)["accuracy"],
        "truthfulqa_base": truthfulqa_mc1(base_model, tok, tqa, 8, False)["accuracy"],
    }
    res["base_mmlu"], res["base_truthfulqa"] = baseline["mmlu_base"], baseline["truthfulqa_base"]
    timings["base_s"] = time.perf_counter() - t0
    log(f"base: acc {res['base_acc']:.3f}  MMLU {baseline['mmlu_base']:.3f}  TruthfulQA {baseline['truthfulqa_base']:.3f}")

    def effects(prefix: str, model, base=None) -> None:
        se = side_effects(model, tok, args.data_dir, base=base, mmlu_subjects=subjects, mmlu_limit=args.mmlu_limit,
                          truthfulqa_limit=args.truthfulqa_limit, text=text, kl_chunks=args.kl_chunks,
                          baseline=baseline, progress=False)
        res[f"{prefix}_mmlu_delta"], res[f"{prefix}_truthfulqa_delta"], res[f"{prefix}_kl"] = (
            se["mmlu_delta"], se["truthfulqa_delta"], se["kl"])

    # ----- mining + locating (shared by the CCA variants and circuit SFT) ----------------------------
    mining_kw = dict(shots=shots, max_new_tokens=args.max_new_tokens, n_samples=args.n_samples, batch_size=16,
                     max_branch_completions=args.max_branch_completions, seed=args.seed)
    variants = {"cca_prefix": dict(method="prefix"), "cca_branching": dict(method="branching"),
                "cca_digit": dict(pivot="digit")}
    need = {m for m in methods if m in variants}
    src = args.source
    if "cca_nomask" in methods or "circuit_sft" in methods:
        need.add(src)
    records: dict[str, Any] = {}
    circuits: dict[str, Any] = {}
    amp_cfg = AmplifyConfig(circuit_fraction=args.circuit_fraction)
    for name in [v for v in variants if v in need]:
        t0 = time.perf_counter()
        try:
            mined = mine_pivotal_tokens(base_model, tok, train, work / f"mining_{name}",
                                        MiningConfig(**mining_kw, **variants[name]), progress=False)
        except ValueError as err:
            log(f"{name}: no records ({err})")
            records[name] = None
            continue
        records[name] = mined.records
        res[f"{name}_records"] = len(mined.records)
        timings[f"{name}_mine_s"] = time.perf_counter() - t0
        circuits[name] = locate_circuit(base_model, mined.records, amp_cfg, progress=False)
        circuits[name].save(work / f"circuit_{name}.json")
        log(f"{name}: {len(mined.records)} records from {mined.stats['mined']} problems "
            f"(greedy right on {mined.stats['greedy_correct']}), {len(circuits[name].components)} components "
            f"({time.perf_counter() - t0:.0f} s)")
    validator = accuracy_validator(tok, val, **eval_kw)

    def capped(recs):
        if args.max_update_records is not None and len(recs) > args.max_update_records:
            return recs.shuffle(seed=args.seed).select(range(args.max_update_records))
        return recs

    def cca(name: str, recs, circuit, mask: bool = True) -> None:
        t0 = time.perf_counter()
        recs = capped(recs)
        res[f"{name}_update_records"] = len(recs)
        result = amplify_update(fresh(), recs, circuit, validator, mask=mask, tokenizer=tok, progress=False,
                                steps=args.steps, lr=args.lr, optimizer=args.optimizer, loss=args.loss,
                                eval_every=args.eval_every, patience=args.patience)
        res[f"{name}_acc"] = test_acc(result.model)
        res[f"{name}_best_step"], res[f"{name}_val"] = result.best_step, result.best_val
        res[f"{name}_margin"] = [result.initial_margin, result.final_margin]
        res[f"{name}_components_fraction"] = result.size["component_fraction"]
        res[f"{name}_params_fraction"] = result.size["param_fraction"]
        res[f"{name}_trainable_params"] = result.size["trainable_params"]
        effects(name, result.model)
        timings[f"{name}_s"] = time.perf_counter() - t0
        log(f"{name}: acc {res[f'{name}_acc']:.3f} (best step {result.best_step}, val {result.best_val:.3f}, margin "
            f"{result.initial_margin:.2f} -> {result.final_margin:.2f}), KL {res[f'{name}_kl']:.5f}, "
            f"{100 * result.size['component_fraction']:.2f} % components / "
            f"{100 * result.size['param_fraction']:.2f} % params ({timings[f'{name}_s']:.0f} s)")

    for name in ("cca_prefix", "cca_branching", "cca_digit"):
        if name in methods and records.get(name) is not None:
            cca(name, records[name], circuits[name])
    if "cca_nomask" in methods and records.get(src) is not None:
        cca("cca_nomask", records[src], circuits[src], mask=False)
    if records.get(src) is not None:
        res["cca_source"] = src
        res["cca_components_fraction"] = res.get(f"{src}_components_fraction")
        res["cca_params_fraction"] = res.get(f"{src}_params_fraction")
        res["cca_trainable_params"] = res.get(f"{src}_trainable_params")
        sp = measure_update_speedup(fresh(), capped(records[src]), circuits[src], steps=2,
                                    tokenizer=tok, projections="paper")
        res["update_speedup"] = sp["speedup"]
        res["update_step_s"] = {"plain": sp["plain_step_s"], "cached": sp["cached_step_s"], "cache": sp["cache_s"]}
        lowest = min(c.layer for c in circuits[src].components)
        log(f"update step: plain {sp['plain_step_s']:.2f} s, cached {sp['cached_step_s']:.2f} s "
            f"(x{sp['speedup']:.2f}; lowest trained layer {lowest})")

    # ----- SFT on gold solutions: circuit (pivotal-weighted), LoRA, full --------------------------------
    sft_methods = [m for m in ("circuit_sft", "lora", "full") if m in methods]
    if sft_methods:
        from transformers import Trainer, TrainingArguments

        from circuit_peft.cca.weighting import PivotalWeighting
        from circuit_peft.taskdata.prompts import build_prompt, format_gsm8k_solution

        def examples():
            out = []
            for r in train:
                completion = format_gsm8k_solution(r["answer"])
                start = completion.index("=") + 2
                value = completion[start:].split("\n")[0]
                out.append({"prompt": build_prompt(tok, r["question"], "chat", shots), "completion": completion,
                            "pivotal_spans": [[start, start + len(value)]]})
            return out

        def sft(name: str, model, lr: float, weight: float) -> Any:
            weighting = PivotalWeighting(pivotal_weight=weight)
            data = weighting.build_dataset(examples(), tok, add_special_tokens=False)
            data = data.remove_columns([c for c in data.column_names if c == "completion_mask"])
            targs = TrainingArguments(output_dir=str(work / f"sft_{name}"), num_train_epochs=args.sft_epochs,
                                      per_device_train_batch_size=args.sft_batch_size, learning_rate=lr,
                                      lr_scheduler_type="cosine", weight_decay=0.01, logging_steps=10**6,
                                      save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
                                      disable_tqdm=True)
            tok.padding_side = "right"
            try:
                from transformers import DataCollatorForSeq2Seq

                trainer = Trainer(model=model, args=targs, train_dataset=data,
                                  data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
                weighting.attach(trainer)
                trainer.train()
            finally:
                tok.padding_side = "left"
            model.eval()
            return model

        gold_sets = {"circuit_sft": args.pivotal_weight, "lora": 1.0, "full": 1.0}
        for name in sft_methods:
            t0 = time.perf_counter()
            model = fresh()
            base_for_kl = None
            if name == "circuit_sft":
                if src not in circuits:
                    log(f"circuit_sft: skipped (no {src} circuit)")
                    continue
                config = circuits[src].to_config(projections="paper")
                model = get_peft_model(model, config)
                size = circuit_size(config, model)
                res["circuit_sft_params_fraction"] = size["param_fraction"]
                res["circuit_sft_components_fraction"] = size["component_fraction"]
                lr = args.sft_lr
            elif name == "lora":
                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout,
                                                         target_modules="all-linear"))
                res["lora_trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                lr = args.sft_lr
            else:
                base_for_kl = base_model
                res["full_trainable_params"] = sum(p.numel() for p in model.parameters())
                lr = args.full_lr
            model = sft(name, model, lr, gold_sets[name])
            res[f"{name}_acc"] = test_acc(model)
            effects(name, model, base=base_for_kl)
            timings[f"{name}_s"] = time.perf_counter() - t0
            log(f"{name}: acc {res[f'{name}_acc']:.3f}, MMLU {res[f'{name}_mmlu_delta']:+.3f}, TruthfulQA "
                f"{res[f'{name}_truthfulqa_delta']:+.3f}, KL {res[f'{name}_kl']:.5f} ({timings[f'{name}_s']:.0f} s)")

    # ----- summary ------------------------------------------------------------------------------
    done = [m for m in CIRCUIT_METHODS if f"{m}_acc" in res]
    if done:
        best = max(done, key=lambda m: res[f"{m}_acc"])
        res["best_circuit_method"], res["best_circuit_acc"], res["best_circuit_kl"] = best, res[f"{best}_acc"], res[f"{best}_kl"]
        frac = res.get(f"{best}_components_fraction")
        res["best_circuit_components_fraction"] = frac
        gain = res["best_circuit_acc"] - res["base_acc"]
        res["target_gain_met"] = bool(gain >= 0.10 and frac is not None and frac <= 0.02)
        if res.get("lora_kl"):
            res["target_kl_met"] = bool(res["best_circuit_kl"] is not None and res["best_circuit_kl"] <= res["lora_kl"] / 2)
    se = math.sqrt(max(res["base_acc"] * (1 - res["base_acc"]), 1e-9) / len(test))
    res["test_stderr_at_base"] = se
    res["timings"] = timings
    res["seconds"] = time.perf_counter() - start_all
    print("\n" + " ".join(f"{m}={res[f'{m}_acc']:.3f}" for m in ALL_METHODS if f"{m}_acc" in res))
    line = json.dumps(res, default=float)
    if args.out:
        atomic_write_text(args.out, line + "\n")
    print(line)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
