"""CircuitSeer benchmark: scoring throughput and selection quality on SmolLM2 + GSM8K.

(1) Throughput over ``--throughput-n`` GSM8K training questions: the CircuitSeer scorer (hooked
    q/k of the reasoning heads, forward stopped after the deepest head's layer) against a plain
    forward pass over the same batches (default attention, LM head included) and against
    ``output_attentions=True`` with eager attention. Also the score's Spearman correlation with
    question length (sink excluded, the default) and of the paper's raw score.
(2) Selection quality: a pool of the first ``--pool`` GSM8K training problems; ``--fraction``
    subsets by CircuitSeer, max-loss, IFD, a random draw length-matched to CircuitSeer's subset,
    and ``--seeds`` random draws; the same LoRA (r=16, alpha 32, all linear layers) is trained for
    ``--steps`` steps on each subset (SFT on the gold solution, loss on solution tokens only);
    the score is the mean loss on the gold solutions of ``--test`` GSM8K test problems.

Ends with one JSON line. Full size (a GPU, or ~2 hours here):
    python benchmarks/circuitseer.py --throughput-n 512 --pool 1000 --test 200 --steps 26 --full
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from circuit_peft.batching import pad_batch
from circuit_peft.commands.select import HEAD_METHODS
from circuit_peft.files import atomic_write_text
from circuit_peft.models import load_model, load_tokenizer
from circuit_peft.taskdata import PivotalCollator, answer_example, encode_text_pair
from circuit_peft.select import (
    CircuitSeerSampler, CircuitSeerScorer, ReasoningHeads, ResponseLossScorer, debias_length, find_reasoning_heads,
    ifd_indices,
    length_matched_indices, length_spearman, max_loss_indices, random_indices, select_indices,
)

HERE = Path(__file__).resolve().parent
OLD_HEAD_METHODS = {"attribution": "ablation_estimate"}  # the head finder's old name (results before issue 37)


def read_jsonl(path: Path, n: int, start: int = 0) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return rows[start : start + n]


def reasoning_heads(model, tok, args, train_path: Path) -> ReasoningHeads:
    """Top 5 % heads from a scan on ``--probe`` training problems taken after the pool; cached."""
    probe_start = 7000  # well past any pool size used here, so probe and pool do not overlap
    cache = HERE / "cache" / f"circuitseer_heads-smollm2-{args.head_method}-probe{args.probe}-at{probe_start}.json"
    if cache.exists():
        return ReasoningHeads.load(cache, model=model)
    probe = read_jsonl(train_path, args.probe, probe_start)
    t0 = time.perf_counter()
    heads = find_reasoning_heads(model, tok, probe, method=args.head_method, prompt_field="question",
                                 solution_field="answer", batch_size=4)
    print(f"reasoning heads ({args.head_method}, {args.probe} probe problems, {time.perf_counter() - t0:.0f} s): "
          f"{heads.heads}")
    heads.save(cache)
    return heads


@torch.no_grad()
def throughput(model, tok, heads, rows, batch_size: int) -> dict:
    """Time the three ways batch by batch, interleaved, so load changes on a shared machine hit all alike."""
    scorer = CircuitSeerScorer(model, tok, heads, batch_size=batch_size, progress=False)
    ids = scorer.tokenize(scorer.prompts(rows))
    n_tok = sum(len(x) for x in ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    groups = [[ids[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    batches = [dict(zip(("input_ids", "attention_mask"), pad_batch(g, scorer.pad_id, side="right"))) for g in groups]
    scorer.score_ids(ids[:batch_size])  # warm-up
    t_score = t_forward = t_eager = 0.0
    sorted_scores = []
    for group, batch in tqdm(list(zip(groups, batches)), desc="score / forward / eager"):
        t0 = time.perf_counter()
        sorted_scores.append(scorer._score_batch(group))
        t_score += time.perf_counter() - t0
        t0 = time.perf_counter()
        model(**batch, use_cache=False)
        t_forward += time.perf_counter() - t0
        model.set_attn_implementation("eager")
        try:
            t0 = time.perf_counter()
            model(**batch, use_cache=False, output_attentions=True)
            t_eager += time.perf_counter() - t0
        finally:
            model.set_attn_implementation("sdpa")
    scores = np.empty(len(ids))
    scores[order] = torch.cat(sorted_scores).numpy()

    lengths = [len(x) for x in ids]
    raw = CircuitSeerScorer(model, tok, heads, exclude_sink=False, batch_size=batch_size, progress=False).score_ids(ids)
    res = {
        "throughput_n": len(ids), "throughput_tokens": n_tok,
        "score_seconds": round(t_score, 2), "forward_seconds": round(t_forward, 2), "eager_seconds": round(t_eager, 2),
        "score_examples_per_s": round(len(ids) / t_score, 1),
        "score_vs_forward": round(t_score / t_forward, 3), "score_vs_eager": round(t_score / t_eager, 3),
        "score_length_spearman": round(length_spearman(debias_length(scores, lengths), lengths), 3),
        "per_example_score_length_spearman": round(length_spearman(scores, lengths), 3),
        "raw_score_length_spearman": round(length_spearman(raw, lengths), 3),
        "deepest_head_layer": heads.deepest_layer,
    }
    print(f"scoring {len(ids)} questions ({n_tok} tokens): CircuitSeer {t_score:.1f} s, plain forward "
          f"{t_forward:.1f} s, eager+attentions {t_eager:.1f} s -> score_vs_forward {res['score_vs_forward']}, "
          f"score_vs_eager {res['score_vs_eager']}; Spearman with length: {res['score_length_spearman']} "
          f"(before length debiasing: {res['per_example_score_length_spearman']}, paper's raw score: "
          f"{res['raw_score_length_spearman']})")
    return res


# ----- selection quality ------------------------------------------------------------------------------


def encode_sft(tok, rows: list[dict], max_length: int = 512) -> list[dict[str, list[int]]]:
    """One tokenized example per row (``input_ids``, ``labels``): question, newline, gold solution (same split as
    the losses), loss on the solution; a longer row keeps its solution's start."""
    out = []
    for r in rows:
        out.append(answer_example(*encode_text_pair(tok, r["question"], "\n" + r["answer"]), max_length))
    return out


def train_and_eval(args, tok, encoded_pool, indices, test_rows, arm: str) -> tuple[float, float, float]:
    """Train a fresh LoRA on ``indices`` of the pool; return (held-out loss, its SE, seconds)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    torch.manual_seed(0)  # same LoRA initialisation in every arm
    model = load_model(args.model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    sampler = CircuitSeerSampler.from_indices(indices, len(encoded_pool), seed=0)
    loader = DataLoader(encoded_pool, batch_size=args.batch_size, sampler=sampler,
                        collate_fn=PivotalCollator(pad_token_id=tok.pad_token_id))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    step, epoch = 0, 0
    bar = tqdm(total=args.steps, desc=f"train {arm}")
    while step < args.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= args.steps:
                break
        epoch += 1
    bar.close()
    model.eval()
    loss, se = heldout_loss(model, tok, test_rows, args)
    return loss, se, time.perf_counter() - t0


def heldout_loss(model, tok, test_rows, args) -> tuple[float, float]:
    """Mean over test problems of the mean per-token loss on the gold solution (and its SE)."""
    losses = ResponseLossScorer(model, tok, batch_size=args.eval_batch_size, max_length=args.max_tokens,
                                progress=False).conditional(test_rows)
    return float(losses.mean()), float(losses.std(ddof=1) / math.sqrt(len(losses)))


def load_partial(path: str | None, config: dict) -> dict[str, list[float]]:
    """Arms already trained by an interrupted run with the same settings: {arm: [loss, se, seconds]}."""
    if not path or not Path(path).exists():
        return {}
    saved = json.loads(Path(path).read_text())
    if saved.get("config") != config:
        print(f"{path} holds arms for other settings {saved.get('config')}; starting afresh")
        return {}
    return saved["arms"]


def selection_quality(args, model, tok, heads, train_path, test_path) -> dict:
    pool = read_jsonl(train_path, args.pool)
    test_rows = read_jsonl(test_path, args.test)
    res: dict = {"pool": len(pool), "test": len(test_rows), "fraction": args.fraction, "steps": args.steps,
                 "max_tokens": args.max_tokens,
                 "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds, "tau": args.tau}
    t0 = time.perf_counter()
    cs = CircuitSeerScorer(model, tok, heads, batch_size=16, cache_dir=str(HERE / "cache" / "scores"))
    cs_scores = cs.score(pool)
    res["pool_score_length_spearman"] = round(cs.length_spearman, 3)
    res["pool_per_example_score_length_spearman"] = round(cs.per_example_length_spearman, 3)
    res["circuitseer_score_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ls = ResponseLossScorer(model, tok, batch_size=8, max_length=args.max_tokens, cache_dir=str(HERE / "cache" / "scores"))
    cond = ls.conditional(pool)
    ifd = ls.ifd(pool, conditional=cond)
    res["loss_score_seconds"] = round(time.perf_counter() - t0, 1)
    lengths = cs.lengths

    arms: dict[str, np.ndarray] = {}
    arms["circuitseer"] = select_indices(cs_scores, fraction=args.fraction, tau=args.tau, seed=0)
    k = len(arms["circuitseer"])
    arms["maxloss"] = max_loss_indices(cond, k=k)
    arms["ifd"] = ifd_indices(ifd, k=k)
    arms["lengthmatched"] = length_matched_indices(lengths, arms["circuitseer"], seed=100)
    for s in range(args.seeds):
        arms[f"random{s}"] = random_indices(len(pool), k=k, seed=s)
    if args.full:
        arms["full"] = np.arange(len(pool))
    short = set(np.argsort(lengths)[: max(1, len(pool) // 10)].tolist())
    for name, idx in arms.items():
        res[f"{name}_shortest_decile_share"] = round(len(short & set(idx.tolist())) / len(idx), 3)
        res[f"{name}_mean_question_tokens"] = round(float(lengths[idx].mean()), 1)

    base, base_se = heldout_loss(model, tok, test_rows, args)
    res["base_heldout_loss"], res["heldout_se"] = round(base, 4), round(base_se, 4)
    print(f"base held-out loss {base:.4f} (SE {base_se:.4f})")
    encoded = encode_sft(tok, pool, args.max_tokens)
    config = {k: res[k] for k in ("pool", "test", "fraction", "steps", "max_tokens", "batch_size", "lr", "tau")}
    config.update(model=args.model, heads=[list(h) for h in heads.heads])
    done = load_partial(args.partial, config)
    results = {}
    for name, idx in arms.items():
        if name in done:
            loss, se, sec = done[name]
            print(f"{name:>14}: held-out loss {loss:.4f} (SE {se:.4f}) from {args.partial}")
        else:
            loss, se, sec = train_and_eval(args, tok, encoded, idx, test_rows, name)
            done[name] = [loss, se, sec]
            if args.partial:
                atomic_write_text(args.partial, json.dumps({"config": config, "arms": done}))
            print(f"{name:>14}: held-out loss {loss:.4f} (SE {se:.4f}), {sec:.0f} s")
        results[name] = loss
        res[f"seconds_{name}"] = round(sec, 1)
    rnd = [results[f"random{s}"] for s in range(args.seeds)]
    res.update({
        "circuitseer_heldout_loss": round(results["circuitseer"], 4),
        "maxloss_heldout_loss": round(results["maxloss"], 4),
        "ifd_heldout_loss": round(results["ifd"], 4),
        "lengthmatched_heldout_loss": round(results["lengthmatched"], 4),
        "random_heldout_loss": round(float(np.mean(rnd)), 4),
        "random_heldout_sd": round(float(np.std(rnd, ddof=1)) if len(rnd) > 1 else float("nan"), 4),
        "random_heldout_losses": [round(x, 4) for x in rnd],
    })
    if args.full:
        res["full_heldout_loss"] = round(results["full"], 4)
    res["circuitseer_beats_random_band"] = bool(res["circuitseer_heldout_loss"]
                                                < res["random_heldout_loss"] - res["random_heldout_sd"])
    res["circuitseer_beats_ifd"] = bool(res["circuitseer_heldout_loss"] < res["ifd_heldout_loss"])
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--model", default="smollm2")
    p.add_argument("--head-method", default="ablation_estimate", choices=HEAD_METHODS,
                   help="the registered locator that finds the reasoning heads ('attribution': the old name of "
                        "ablation_estimate, as results/circuitseer_full20.json's head_method records it)")
    p.add_argument("--probe", type=int, default=16, help="probe problems for the reasoning-head scan")
    p.add_argument("--throughput-n", type=int, default=512, help="questions for part (1); 0 skips it")
    p.add_argument("--score-batch-size", type=int, default=16)
    p.add_argument("--pool", type=int, default=1000, help="pool size for part (2); 0 skips it")
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=26)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-tokens", type=int, default=512,
                   help="question + solution tokens kept for SFT, loss scores and the held-out loss")
    p.add_argument("--full", action="store_true", help="also train on the whole pool (for a GPU)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--partial", default=str(HERE / "cache" / "circuitseer_arms.json"),
                   help="finished arms are saved here after each one, and reused by a rerun with the same settings")
    args = p.parse_args(argv)
    args.head_method = OLD_HEAD_METHODS.get(args.head_method, args.head_method)  # results record the registry's name
    torch.set_num_threads(args.threads)
    data = Path(args.data_dir) / "gsm8k"
    train_path, test_path = data / "train.jsonl", data / "test.jsonl"
    if not train_path.exists():
        raise SystemExit(f"GSM8K not found under {data}; pass --data-dir")
    t_start = time.perf_counter()
    model, tok = load_model(args.model), load_tokenizer(args.model)
    heads = reasoning_heads(model, tok, args, train_path)
    result: dict = {"model": args.model, "heads": [list(h) for h in heads.heads], "head_method": args.head_method,
                    "threads": args.threads}
    if args.throughput_n > 0:
        result.update(throughput(model, tok, heads, read_jsonl(train_path, args.throughput_n), args.score_batch_size))
    if args.pool > 0:
        result.update(selection_quality(args, model, tok, heads, train_path, test_path))
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
