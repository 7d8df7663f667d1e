"""CCA update step: the records' shared prompt prefix run once per micro-batch vs every record run whole.

``amplify_update`` takes full-batch steps on fixed contrastive records whose contexts all start with the
same prompt (system message or few-shot examples, then the question and part of the answer). Three ways
to take the same steps, measured in one run on the same records and circuit:

* ``whole``: every record runs whole through every layer (``cache_lower_layers=False``,
  ``share_prompt_prefix=False``);
* ``cached``: the frozen layers below the circuit's lowest layer run once (the default before session 18);
* ``prefix``: the library's default: the cache above plus the shared prompt prefix run once per micro-batch
  under the adapter, its KV cache repeated for the rows (gradients flow back through it).

Records: pivots on the recipe's own prompt (``recipes.py``: arithmetic, the model's prompt style): the
context is the prompt plus the gold solution up to one of its digits, the desired token that digit, the
undesired one the next digit. Circuits: ``adapter_step.py``'s (5 % of query heads with their key/value
heads, 1 % of neurons) in the top third of the layers (``top``) or spread over all layers (``spread``:
the lowest layer is 0, so the lower-layer cache cannot help). Time: process CPU seconds per step with one
thread (steady while other jobs share the box) of ``--steps`` steps, each mode's one-off set-up (the lower-layer
cache) and final margin included: what a user pays; wall seconds per step beside it. The margins of the three modes must agree (``max_margin_diff``).

    python benchmarks/update_step.py --model smollm2
    python benchmarks/update_step.py --model gemma3-270m

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import Stopwatch  # noqa: E402
from adapter_step import circuit_components  # noqa: E402

MODES = {"whole": {"cache_lower_layers": False, "share_prompt_prefix": False},
         "cached": {"cache_lower_layers": True, "share_prompt_prefix": False},
         "prefix": {"cache_lower_layers": True, "share_prompt_prefix": True}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2', 'gemma3-270m', a hub id or a folder")
    p.add_argument("--records", type=int, default=48, help="contrastive records (recipes.py's cca arm: 48)")
    p.add_argument("--steps", type=int, default=3, help="measured update steps per mode")
    p.add_argument("--placements", default="spread,top")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def pivot_records(tokenizer: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` records on the recipe's prompt: prompt + gold solution up to a digit; desired that digit, undesired
    the next one."""
    from circuit_peft.cca.problems import TASKS, make_problems
    from circuit_peft.taskdata.prompts import build_prompt_ids, default_prompt_style

    task = TASKS["arithmetic"]
    style, shots = default_prompt_style(tokenizer, log=print), [dict(s) for s in task["shots"]]
    digit_ids = {tokenizer.convert_tokens_to_ids(str(d)): d for d in range(10)}
    rng, out = random.Random(seed), []
    for i, p in enumerate(make_problems(n, "train", seed=seed, kinds=task["kinds"])):
        prompt = build_prompt_ids(tokenizer, p["question"], style, shots)
        solution = tokenizer(p["answer"], add_special_tokens=False)["input_ids"]
        at = rng.choice([j for j, t in enumerate(solution) if t in digit_ids])
        wrong = str((digit_ids[solution[at]] + 1) % 10)
        out.append({"context_ids": prompt + solution[:at], "desired_id": solution[at],
                    "undesired_id": tokenizer.convert_tokens_to_ids(wrong), "problem_id": p["id"]})
    return out


def time_mode(model, records, components, mode: str, steps: int, tokenizer) -> dict[str, Any]:
    """CPU seconds of ``steps`` update steps in ``mode`` (set-up and the final margin included), the wall seconds
    per step, and the margin after each step; the adapter is removed afterwards."""
    from circuit_peft.cca.update import amplify_update
    from circuit_peft.tuner import CircuitConfig

    config = CircuitConfig.from_components(components, projections="paper")
    with Stopwatch() as sw:
        result = amplify_update(model, records, config, None, tokenizer=tokenizer, steps=steps, lr=3e-4,
                                optimizer="adam", loss="logsigmoid", progress=False, **MODES[mode])
    result.model.unload()
    return {"cpu_s": sw.cpu, "wall_s": sw.wall, "margins": [h["margin"] for h in result.history],
            "step_wall_s": sum(h.get("seconds", 0.0) for h in result.history) / steps}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from circuit_peft.arch import get_arch
    from circuit_peft.models import load_model, load_tokenizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    records = pivot_records(tok, args.records, args.seed)
    lengths = [len(r["context_ids"]) for r in records]
    print(f"{len(records)} records, contexts {min(lengths)}-{max(lengths)} tokens")
    out: dict[str, Any] = {"model": args.model, "records": len(records), "threads": args.threads}
    for placement in args.placements.split(","):
        components = circuit_components(get_arch(model), placement, args.seed)
        times = {m: time_mode(model, records, components, m, args.steps, tok) for m in MODES}
        ref = times["whole"]["margins"]
        res = {f"{m}_{k}": v for m, t in times.items() for k, v in t.items() if k != "margins"}
        res["max_margin_diff"] = max(abs(a - b) for t in times.values() for a, b in zip(t["margins"], ref))
        for m in ("cached", "prefix"):
            res[f"{m}_speedup_cpu"] = times["whole"]["cpu_s"] / times[m]["cpu_s"]
        print(placement, {k: round(v, 4) for k, v in res.items()})
        out[placement] = res
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
