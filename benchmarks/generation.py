"""Greedy evaluation decoding: ``model.generate`` on the shared prefix's KV cache (the library's path) vs the
hand-written decoder it replaced, and optionally plain ``model.generate`` (no prefix sharing).

All decode the same chat prompts (system message + two worked examples + one arithmetic question, the prompt
of ``benchmarks/recipes.py``) greedily for ``--max-new-tokens`` tokens, the prompts' shared prefix run once:

* ``generate``: ``circuit_peft.evaluate.generation.generate_with_shared_prefix``: ``model.generate`` continues
  a copy of the prefix's KV cache in each batch of ``--batch`` prompts (padded between prefix and question);
* ``hand``: the hand-written loop the library ran before (one forward per token with explicit position ids,
  argmax, the same cache and padding), kept here as the measured peer;
* ``plain`` (``--plain``): ``model.generate`` on left-padded batches of ``--hf-batch`` whole prompts.

The arms alternate ``--repeats`` times in this one process, with ``--threads`` torch threads (the fastest
repeat of each is reported, as the box is shared); the JSON gives wall seconds, the ratio and the share of
completions that are token-identical to the ``generate`` arm's.

    python benchmarks/generation.py --n 50 --threads 1 --out benchmarks/results/generation_smollm2.json

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--n", type=int, default=50, help="problems")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--plain", action="store_true", help="also time model.generate without prefix sharing")
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the JSON result here")
    return p.parse_args(argv)


@torch.no_grad()
def hand_decoder(model, tok, prompts: list[list[int]], max_new_tokens: int, batch: int) -> list[list[int]]:
    """The hand-written greedy loop (what the library ran before): the shared prefix once, then per batch one
    forward per new token with explicit position ids, stopping when every row produced a stop id."""
    from circuit_peft.batching import continue_after_prefix, left_pad
    from circuit_peft.prefix import prefix_kv_cache, repeat_cache, shared_prefix_ids

    stops = {tok.pad_token_id, tok.eos_token_id}
    prefix = shared_prefix_ids(prompts)
    cache0 = prefix_kv_cache(model, torch.tensor([prefix])) if prefix else None
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        b = continue_after_prefix(left_pad([prompts[i][len(prefix):] for i in idx], tok.pad_token_id), len(prefix))
        ids, mask, pos = b["input_ids"], b["attention_mask"], b["position_ids"]
        cache = repeat_cache(cache0, len(idx)) if cache0 is not None else None
        running = [True] * len(idx)
        for _ in range(max_new_tokens):
            o = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
            cache, nxt = o.past_key_values, o.logits[:, -1].float().argmax(-1)
            for r, t in enumerate(nxt.tolist()):
                running[r] = running[r] and t not in stops
                if running[r]:
                    out[idx[r]].append(t)
            if not any(running):
                break
            ids, pos = nxt[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(len(idx), 1)], 1)
    return out


@torch.no_grad()
def plain_generate(model, tok, prompts: list[list[int]], max_new_tokens: int, batch: int) -> list[list[int]]:
    """``model.generate`` on left-padded batches of whole prompts, completions cut at the first pad/EOS id."""
    from circuit_peft.batching import pad_batch

    stops = {tok.pad_token_id, tok.eos_token_id}
    out = []
    for start in range(0, len(prompts), batch):
        ids, mask = pad_batch(prompts[start : start + batch], tok.pad_token_id)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, temperature=None, top_k=None, top_p=None)
        for row in gen[:, ids.shape[1] :].tolist():
            out.append(row[: next((j for j, t in enumerate(row) if t in stops), len(row))])
    return out


def _prompts(args, tok) -> list[list[int]]:
    from circuit_peft.cca.problems import ARITHMETIC_SHOTS, make_problems
    from circuit_peft.taskdata.prompts import build_prompt, default_prompt_style, encode_prompts

    style = default_prompt_style(tok, log=print)
    rows = make_problems(args.n, "test", seed=0, kinds=("add", "sub"))
    return encode_prompts(tok, [build_prompt(tok, r["question"], style, list(ARITHMETIC_SHOTS)) for r in rows], style)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from circuit_peft.evaluate.generation import generate_with_shared_prefix
    from circuit_peft.models import load_model, load_tokenizer

    tok, model = load_tokenizer(args.model), load_model(args.model).eval()
    prompts = _prompts(args, tok)
    arms = {"generate": lambda: generate_with_shared_prefix(model, tok, prompts, args.max_new_tokens, args.batch,
                                                            progress=False),
            "hand": lambda: hand_decoder(model, tok, prompts, args.max_new_tokens, args.batch)}
    if args.plain:
        arms["plain"] = lambda: plain_generate(model, tok, prompts, args.max_new_tokens, args.hf_batch)
    times: dict[str, list[float]] = {k: [] for k in arms}
    outs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, run in arms.items():
            t0 = time.perf_counter()
            outs[name] = run()
            times[name].append(round(time.perf_counter() - t0, 2))
    best = {k: min(v) for k, v in times.items()}
    result = {
        "benchmark": "generation", "model": args.model, "problems": args.n, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "batch": args.batch, "repeats": args.repeats,
        "seconds": times, "best_s": best, "hand_over_generate": round(best["hand"] / best["generate"], 3),
        "identical": {k: sum(a == b for a, b in zip(outs[k], outs["generate"])) / len(prompts) for k in outs},
        "new_tokens_mean": sum(map(len, outs["generate"])) / len(prompts),
        "threads": args.threads, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    if args.out:
        from circuit_peft.files import atomic_write_json

        atomic_write_json(args.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
