"""Greedy evaluation generation: the library's shared-prefix loop vs ``model.generate`` (its peer).

Both decode the same chat prompts (system message + two worked examples + one arithmetic question,
the prompt of ``benchmarks/recipes.py``) greedily for ``--max-new-tokens`` tokens:

* ``hf_generate``: ``model.generate`` on left-padded batches of ``--hf-batch`` prompts (the library's
  previous evaluation loop);
* ``shared_prefix``: ``circuit_peft.evaluate.generation.generate_with_shared_prefix``: the prompts'
  shared prefix runs once and its KV cache is copied into each batch of ``--batch`` prompts.

Both run in this process, one after the other, with ``--threads`` torch threads; the JSON reports
wall seconds, the ratio and whether every completion is token-identical.

    python benchmarks/generation.py                 # 100 problems, 32 new tokens
    python benchmarks/generation.py --n 32          # quick check

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
    p.add_argument("--n", type=int, default=100, help="problems")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def hf_generate(model, tok, prompts: list[list[int]], max_new_tokens: int, batch: int) -> list[list[int]]:
    """``model.generate`` on left-padded batches, completions cut at the first pad/EOS id."""
    from circuit_peft.batching import pad_batch

    stops = {tok.pad_token_id, tok.eos_token_id}
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            ids, mask = pad_batch(prompts[start : start + batch], tok.pad_token_id)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, temperature=None, top_k=None, top_p=None)
            for row in gen[:, ids.shape[1] :].tolist():
                out.append(row[: next((j for j, t in enumerate(row) if t in stops), len(row))])
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from circuit_peft.cca.problems import ARITHMETIC_SHOTS, make_problems
    from circuit_peft.evaluate.generation import generate_with_shared_prefix
    from circuit_peft.taskdata.prompts import build_prompt, default_prompt_style, encode_prompts
    from circuit_peft.models import load_model, load_tokenizer

    tok, model = load_tokenizer(args.model), load_model(args.model).eval()
    style = default_prompt_style(tok, log=print)
    rows = make_problems(args.n, "test", seed=0, kinds=("add", "sub"))
    prompts = encode_prompts(tok, [build_prompt(tok, r["question"], style, list(ARITHMETIC_SHOTS)) for r in rows],
                             style)
    t0 = time.perf_counter()
    ours = generate_with_shared_prefix(model, tok, prompts, args.max_new_tokens, args.batch, progress=False)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer = hf_generate(model, tok, prompts, args.max_new_tokens, args.hf_batch)
    t_peer = time.perf_counter() - t0
    result = {
        "benchmark": "generation", "model": args.model, "problems": args.n, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "hf_batch": args.hf_batch, "batch": args.batch,
        "hf_generate_s": round(t_peer, 2), "shared_prefix_s": round(t_ours, 2),
        "speedup": round(t_peer / t_ours, 2), "identical": sum(a == b for a, b in zip(ours, peer)) / len(peer),
        "threads": args.threads, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
