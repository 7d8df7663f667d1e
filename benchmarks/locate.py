"""Benchmark the locating layer on SmolLM2-135M-Instruct: exact head ablation scan vs the naive one,
attribution vs the exact scan, and DCM on contrastive records.

Keys of the final JSON line:
  naive_ablation_s   one full forward per head, timed on every 10th head, extrapolated to all heads
  ablation_s         the project's exact scan (cached residual, layers >= l only, batched heads, the probe's
                     shared prompt prefix run once per head group), all heads
  ablation_whole_s   the same scan with the rows run whole (share_prompt_prefix=False), timed on the naive
                     scan's heads and extrapolated: the peer of the shared prefix
  shared_prefix      prompt tokens every probe row shares (the scan runs them once per head group)
  *_cpu_s, *_speedup_cpu  the same times on process CPU time (with --threads 1 the work done, which other
                     jobs on the box do not move; wall-time ratios do move when the load changes between stages)
  max_abs_diff       |project - naive| over the timed heads (nats per solution token)
  attribution_s      attribution_scan (one forward + backward per batch; heads and neurons)
  spearman           attribution vs exact ablation over all heads
  top5pct_recall     share of the exact top 5 % heads found in attribution's top 5 %
  bound_spearman, bound_top5pct_recall   the bound of the first-order term (attribution_scan(estimate="bound"),
                     query heads) against the exact scan
  refined_s, refined_recall, refined_speedup   refined_head_scan (attribution, then the exact scan of
                     its top --candidates x 5 % heads and the bound's top --bound-candidates x 5 %): time,
                     share of the exact top 5 % it keeps, naive / refined time
  ig_s, ig_spearman, ig_top5pct_recall   attribution by integrated gradients (--ig-steps points on the path
                     where every head moves toward its ablation at once; 0 skips)
  refined_ig_s, refined_ig_recall, refined_ig_speedup, refined_ig_candidates   the refined scan whose candidates
                     are first-order attribution's top --ig-first-candidates x k plus integrated gradients' top k
  refined_recall_by_candidates   the recall the refined scan reaches at 1, 1.5, 2, 2.5, 3 x k candidates,
                     read off the two full scans (equal to refined_recall at --candidates)
  dcm_s, dcm_kept_fraction   DCM with default settings on contrastive records (kept q+k+v heads and
                     neurons / all of them)

The DCM records are built simply (the CCA miner is another module): context = chat prompt +
gold solution prefix up to the first digit after the first "=", desired = that gold digit token,
undesired = the model's most likely other token there.

--probe arithmetic uses generated two-digit problems (short rows: the scans take minutes on a CPU)
instead of GSM8K; --probe arithmetic-shots the same problems in the prompt the recipes train and locate on
(chat template, two worked examples: a long prompt prefix every row shares).

Usage: python benchmarks/locate.py [--data-dir ../shared/data] [--probe-rows 8] [--dcm-records 16]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import Stopwatch  # noqa: E402
from circuit_peft.arch import get_arch  # noqa: E402
from circuit_peft.taskdata.prompts import build_prompt_ids, default_prompt_style  # noqa: E402
from circuit_peft.cca.problems import TASKS, make_problems  # noqa: E402
from circuit_peft.recipe.sft import gold_examples, pivotal_dataset  # noqa: E402
from circuit_peft.locate import ProbeSpec, attribution_scan, head_ablation_scan, learn_masks, refined_head_scan  # noqa: E402
from circuit_peft.models import load_model, load_tokenizer  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def contrastive_records(model, tok, rows: list[dict]) -> list[dict]:
    """One record per problem at the first answer digit after the first '=' of the gold solution."""
    records = []
    for i, row in enumerate(rows):
        prompt = build_prompt_ids(tok, row["question"], style="chat")
        answer = row["answer"].split("####")[0]
        eq = answer.find("=")
        if eq < 0:
            continue
        k = next((j for j in range(eq, len(answer)) if answer[j].isdigit()), None)
        if k is None:
            continue
        ctx = prompt + tok(answer[:k], add_special_tokens=False)["input_ids"]
        desired = tok(answer[k], add_special_tokens=False)["input_ids"][0]
        logits = model(input_ids=torch.tensor([ctx])).logits[0, -1]
        top2 = logits.topk(2).indices.tolist()
        undesired = top2[0] if top2[0] != desired else top2[1]
        records.append({"context_ids": ctx, "desired_id": desired, "undesired_id": undesired,
                        "problem_id": f"gsm8k-train-{row['_index']}"})
    return records


def recipe_probe_rows(tok, rows: list[dict]) -> list[dict]:
    """``rows`` as the recipes' ablation locator scans them: the tokenised SFT rows (the prompt with the task's
    two worked examples, chat template or the few-shot style when the tokenizer has none, then the gold solution
    and EOS; the locators read the prompt as what precedes the first label)."""
    style = default_prompt_style(tok, print)
    return list(pivotal_dataset(tok, gold_examples(tok, rows, style, TASKS["arithmetic"]["shots"]), 1.0, style))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--probe", choices=("gsm8k", "arithmetic", "arithmetic-shots"), default="gsm8k")
    p.add_argument("--probe-rows", type=int, default=8, help="training problems in the probe set")
    p.add_argument("--candidates", type=float, default=2.0, help="refined scan: candidates x kept heads")
    p.add_argument("--bound-candidates", type=float, default=1.0,
                   help="refined scan: also the bound's top N x kept heads (the library's default 1; 0: none)")
    p.add_argument("--save-scores", default=None,
                   help="JSON: every query head's exact, attribution and bound score (layer.head -> nats/token)")
    p.add_argument("--ig-steps", type=int, default=4,
                   help="the refined scan with integrated gradients: points on the joint ablation path (0: skip)")
    p.add_argument("--ig-first-candidates", type=float, default=2.0,
                   help="... with first-order attribution's top N x kept heads (and integrated gradients' top 1 x)")
    p.add_argument("--probe-offset", type=int, default=0,
                   help="take the probe rows from this index of the training draw (another draw checks a result)")
    p.add_argument("--naive-every", type=int, default=10, help="time the naive scan on every n-th head")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heads-per-pass", type=int, default=None)
    p.add_argument("--dcm-records", type=int, default=16)
    p.add_argument("--dcm-epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU read the wall-time ratios)")
    p.add_argument("--only", choices=("scan", "dcm"), default=None,
                   help="run only the scans (naive, exact, attribution) or only DCM")
    p.add_argument("--out", default=None, help="also save the three circuits as JSON under this folder")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.probe.startswith("arithmetic"):
        train = make_problems(4 * args.probe_rows + 4 * args.dcm_records, split="train", seed=0)
    else:
        train = [json.loads(line) for line in open(Path(args.data_dir) / "gsm8k" / "train.jsonl")]
    for i, r in enumerate(train):
        r["_index"] = i
    probe = train[args.probe_offset : args.probe_offset + args.probe_rows]
    model, tok = load_model(args.model).to(args.device), load_tokenizer(args.model)
    if args.probe == "arithmetic-shots":
        probe = recipe_probe_rows(tok, probe)
    arch = get_arch(model)

    result: dict = {}
    if args.only != "dcm":
        result.update(run_scans(args, model, tok, probe, arch))
    if args.only != "scan":
        result.update(run_dcm(args, model, tok, train))
    result.update(probe_rows=len(probe), threads=args.threads, device=args.device)
    print(json.dumps(result))


def run_scans(args, model, tok, probe, arch) -> dict:
    all_heads = [(l, h) for l in range(arch.dims.n_layers) for h in range(arch.dims.n_heads)]
    timed = all_heads[:: args.naive_every]
    common = dict(prompt_field="question", solution_field="answer", batch_size=args.batch_size, keep_fraction=None)
    print(f"{len(probe)} probe problems, {len(all_heads)} heads; naive scan timed on {len(timed)} heads")
    scale = len(all_heads) / len(timed)
    with Stopwatch() as sw_naive:
        naive = head_ablation_scan(model, tok, probe, heads=timed, naive=True, **common)
    naive_s, naive_cpu = sw_naive.wall * scale, sw_naive.cpu * scale
    print(f"naive scan: {naive_s:.1f} s extrapolated to all heads")

    with Stopwatch() as sw_exact:
        exact = head_ablation_scan(model, tok, probe, heads_per_pass=args.heads_per_pass, **common)
    ablation_s = sw_exact.wall
    diff = max(abs(exact.scores[c] - naive.scores[c]) for c in naive.scores)
    print(f"exact scan: {ablation_s:.1f} s ({naive_s / ablation_s:.2f}x faster), max |diff| {diff:.2e}, "
          f"base loss {exact.meta['base_loss']:.4f}, solution tokens {exact.meta['solution_tokens']}, "
          f"shared prefix {exact.meta['shared_prefix']} tokens")
    with Stopwatch() as sw_whole:
        head_ablation_scan(model, tok, probe, heads=timed, heads_per_pass=args.heads_per_pass,
                           share_prompt_prefix=False, **common)
    whole_s, whole_cpu = sw_whole.wall * scale, sw_whole.cpu * scale
    print(f"exact scan, rows whole: {whole_s:.1f} s extrapolated ({naive_s / whole_s:.2f}x faster than naive)")

    with Stopwatch() as sw_att:
        att = attribution_scan(model, tok, probe, **dict(common, batch_size=min(4, args.batch_size)))
    attribution_s = sw_att.wall
    k = max(1, math.ceil(0.05 * len(exact.scores)))
    top_exact = {c for c, _ in exact.ranked(["q"])[:k]}
    rho, recall = agreement(exact, att, k)
    print(f"attribution: {attribution_s:.1f} s ({naive_s / attribution_s:.0f}x faster than naive), "
          f"spearman {rho:.3f}, top-5% recall {recall:.3f} ({round(recall * k)}/{k})")
    bound = attribution_scan(model, tok, probe, **dict(common, batch_size=min(4, args.batch_size)), kinds=("q",),
                             estimate="bound")
    bound_rho, bound_recall = agreement(exact, bound, k)
    print(f"bound of the first-order term: spearman {bound_rho:.3f}, top-5% recall {bound_recall:.3f}")
    if args.save_scores:
        scores = {name: head_scores(c) for name, c in (("exact", exact), ("att", att), ("bound", bound))}
        Path(args.save_scores).write_text(json.dumps(scores))
    with Stopwatch() as sw_refined:
        refined = refined_head_scan(model, tok, probe, keep_fraction=None, k=k, candidates=args.candidates,
                                    bound_candidates=args.bound_candidates, batch_size=args.batch_size,
                                    spec=ProbeSpec("question", "answer"))
    refined_s = sw_refined.wall
    refined_recall = len(top_exact & set(refined.components)) / k
    print(f"refined (attribution + exact scan of {refined.meta['candidates']} heads): {refined_s:.1f} s "
          f"({naive_s / refined_s:.1f}x faster than naive), top-5% recall {refined_recall:.3f}")
    ig = run_ig(args, model, tok, probe, exact, top_exact, k, naive_s, naive_cpu) if args.ig_steps else {}
    by_candidates = recall_by_candidates(exact, att, k)
    print("refined recall by candidates x k (from the two full scans):", by_candidates)
    print("exact top heads:", [tuple(c)[1:] for c, _ in exact.ranked(["q"])[:k]])
    print("attribution top:", [tuple(c)[1:] for c, _ in att.ranked(["q"])[:k]])
    if args.out:
        exact.top(fraction=0.05).save(Path(args.out) / "ablation.json")
        att.save(Path(args.out) / "attribution.json")
    return {"naive_ablation_s": round(naive_s, 2), "ablation_s": round(ablation_s, 2), "max_abs_diff": diff,
            "ablation_whole_s": round(whole_s, 2), "shared_prefix": exact.meta["shared_prefix"],
            "ablation_speedup": round(naive_s / ablation_s, 2),
            "attribution_s": round(attribution_s, 2), "spearman": round(rho, 4), "top5pct_recall": round(recall, 4),
            "timed_heads": len(timed), "refined_s": round(refined_s, 2), "refined_recall": round(refined_recall, 4),
            "refined_speedup": round(naive_s / refined_s, 2), "refined_candidates": refined.meta["candidates"],
            "refined_recall_by_candidates": by_candidates, "refined_bound_candidates": args.bound_candidates,
            "bound_spearman": round(bound_rho, 4), "bound_top5pct_recall": round(bound_recall, 4),
            # the same on process CPU time (one thread: the work done, not moved by other jobs on the box)
            "naive_ablation_cpu_s": round(naive_cpu, 2), "ablation_cpu_s": round(sw_exact.cpu, 2),
            "ablation_whole_cpu_s": round(whole_cpu, 2), "attribution_cpu_s": round(sw_att.cpu, 2),
            "refined_cpu_s": round(sw_refined.cpu, 2), "ablation_speedup_cpu": round(naive_cpu / sw_exact.cpu, 2),
            "ablation_whole_speedup_cpu": round(naive_cpu / whole_cpu, 2),
            "attribution_speedup_cpu": round(naive_cpu / sw_att.cpu, 2),
            "refined_speedup_cpu": round(naive_cpu / sw_refined.cpu, 2), **ig}


def run_ig(args, model, tok, probe, exact, top_exact, k, naive_s, naive_cpu) -> dict:
    """Integrated-gradient attribution alone, and the refined scan whose candidates are first-order attribution's
    top ``--ig-first-candidates`` x k plus integrated gradients' top k."""
    common = dict(prompt_field="question", solution_field="answer", keep_fraction=None)
    with Stopwatch() as sw_ig:
        ig = attribution_scan(model, tok, probe, batch_size=min(4, args.batch_size), ig_steps=args.ig_steps, **common)
    rho, recall = agreement(exact, ig, k)
    print(f"integrated gradients ({args.ig_steps} steps): {sw_ig.wall:.1f} s, spearman {rho:.3f}, "
          f"top-5% recall {recall:.3f}")
    with Stopwatch() as sw:
        refined = refined_head_scan(model, tok, probe, keep_fraction=None, k=k, candidates=args.ig_first_candidates,
                                    bound_candidates=0, ig_steps=args.ig_steps, batch_size=args.batch_size,
                                    spec=ProbeSpec("question", "answer"))
    refined_recall = len(top_exact & set(refined.components)) / k
    print(f"refined with integrated gradients ({refined.meta['candidates']} candidates): {sw.wall:.1f} s "
          f"({naive_s / sw.wall:.1f}x faster than naive), top-5% recall {refined_recall:.3f}")
    return {"ig_steps": args.ig_steps, "ig_s": round(sw_ig.wall, 2), "ig_spearman": round(rho, 4),
            "ig_top5pct_recall": round(recall, 4), "refined_ig_s": round(sw.wall, 2),
            "refined_ig_recall": round(refined_recall, 4), "refined_ig_candidates": refined.meta["candidates"],
            "refined_ig_first_candidates": args.ig_first_candidates,
            "refined_ig_speedup": round(naive_s / sw.wall, 2), "refined_ig_speedup_cpu": round(naive_cpu / sw.cpu, 2)}


def agreement(exact, other, k: int) -> tuple[float, float]:
    """``other``'s query-head scores against the exact scan's: Spearman over every exact-scanned head, and the
    share of the exact top k heads in ``other``'s top k."""
    heads = sorted(exact.scores)
    rho = spearman([exact.scores[c] for c in heads], [other.scores[c] for c in heads])
    top_exact, top_other = ({h for h, _ in c.ranked(["q"])[:k]} for c in (exact, other))
    return rho, len(top_exact & top_other) / k


def head_scores(circuit) -> dict[str, float]:
    """``{"layer.head": score}`` of every query head ``circuit`` scored."""
    return {f"{c.layer}.{c.index}": s for c, s in circuit.scores.items() if c.kind == "q"}


def recall_by_candidates(exact, att, k: int, multiples=(1.0, 1.5, 2.0, 2.5, 3.0)) -> dict[str, float]:
    """Top-k recall the refined scan would reach with ``m`` x k candidates, for each ``m``: the exact
    scores of attribution's top ``ceil(m k)`` heads ranked (the exact scan scores a head the same
    whichever other heads it scans, so this equals running ``refined_head_scan`` at each ``m``)."""
    top_exact = {c for c, _ in exact.ranked(["q"])[:k]}
    by_attribution = [c for c, _ in att.ranked(["q"])]
    out = {}
    for m in multiples:
        pool = by_attribution[: math.ceil(m * k)]
        kept = sorted(pool, key=lambda c: exact.scores[c], reverse=True)[:k]
        out[f"{m:g}"] = round(len(top_exact & set(kept)) / k, 4)
    return out


def run_dcm(args, model, tok, train) -> dict:
    records = contrastive_records(model, tok, train[args.probe_rows : args.probe_rows + 4 * args.dcm_records])
    records = records[: args.dcm_records]
    t = time.perf_counter()
    dcm = learn_masks(model, records, epochs=args.dcm_epochs, tokenizer=tok)
    dcm_s = time.perf_counter() - t
    masks = list(dcm.scores.values())
    print(f"DCM on {len(records)} records: {dcm_s:.1f} s, {dcm.meta['epochs_run']} epochs / {dcm.meta['steps']} "
          f"steps, kept {len(dcm.components)} of {dcm.total_components()} "
          f"(mask min {min(masks):.3f}, mean {sum(masks) / len(masks):.3f}); "
          f"margin {dcm.meta['history'][0]['margin']:.3f} -> {dcm.meta['history'][-1]['margin']:.3f}")
    if args.out:
        dcm.save(Path(args.out) / "dcm.json")
    return {"dcm_s": round(dcm_s, 2), "dcm_kept_fraction": round(dcm.component_fraction(), 6),
            "dcm_records": len(records), "dcm_epochs_run": dcm.meta["epochs_run"],
            "dcm_mask_min": round(min(masks), 4), "dcm_margin_first_last": [
                round(dcm.meta["history"][0]["margin"], 4), round(dcm.meta["history"][-1]["margin"], 4)]}


if __name__ == "__main__":
    main()
