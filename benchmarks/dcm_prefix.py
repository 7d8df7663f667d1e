"""DCM with the records' shared prompt prefix run once vs every record run whole: seconds per mask step.

Records are built the way CCA's branching miner leaves them on a short-answer task: the model's prompt (its
default style, with the task's worked examples) plus the first ``--pivot`` tokens of the gold solution, the
gold's next token as ``desired`` and the other number's last token as ``undesired`` (for ``comparison``, the
answer the model could wrongly give; for other tasks just another token: speed depends only on the context
lengths and the batch). A mined file can be given with ``--records`` instead. Both runs take the
same ``--steps`` mask steps on the same records (the step schedule, one thread); the final JSON line has each
run's CPU and wall seconds per step, the speedup, and the largest difference between the two runs' final
masks (exactness: the masks act only at the last position, after the prefix).

Usage: python benchmarks/dcm_prefix.py [--model smollm2] [--task comparison] [--records R.jsonl] [--out F]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import Stopwatch, final_line  # noqa: E402
from circuit_peft.cca import TASKS, make_problems  # noqa: E402
from circuit_peft.files import read_rows  # noqa: E402
from circuit_peft.locate import learn_masks  # noqa: E402
from circuit_peft.models import load_model, load_tokenizer  # noqa: E402
from circuit_peft.taskdata.prompts import build_prompt_ids, default_prompt_style  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="comparison", choices=sorted(TASKS))
    p.add_argument("--records", default=None, help="mined records.jsonl (default: built from --task problems)")
    p.add_argument("--n", type=int, default=32, help="records built from the task")
    p.add_argument("--pivot", type=int, default=5, help="gold solution tokens before the pivot")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p.parse_args(argv)


def task_records(model, tokenizer, task: str, n: int, pivot: int) -> list[dict]:
    """``n`` records: prompt + the gold's first ``pivot`` tokens; desired its next token, undesired the
    other operand's last token (for ``comparison``, a wrong answer the model could give)."""
    style = default_prompt_style(tokenizer)
    rows = []
    for p in make_problems(n, "train", seed=0, kinds=TASKS[task]["kinds"]):
        gold = tokenizer(p["answer"], add_special_tokens=False)["input_ids"]
        other = tokenizer(" " + str(p["a"] if str(p["b"]) in p["answer"].split("####")[-1] else p["b"]),
                          add_special_tokens=False)["input_ids"]
        context = build_prompt_ids(tokenizer, p["question"], style, TASKS[task]["shots"]) + gold[:pivot]
        desired, undesired = gold[pivot], other[-1]
        if desired != undesired:
            rows.append({"context_ids": context, "desired_id": desired, "undesired_id": undesired,
                         "problem_id": p["id"]})
    return rows


def timed_run(model, records: list[dict], args: argparse.Namespace, share: bool) -> tuple[dict, object]:
    """One :func:`learn_masks` run of ``args.steps`` steps; its seconds per step and circuit."""
    with Stopwatch() as watch:
        circuit = learn_masks(model, records, lr=0.05, steps=args.steps, check_every=args.steps, patience=0,
                              batch_size=args.batch_size, share_prompt_prefix=share, progress=False)
    shared = circuit.meta["settings"]["shared_prefix"]
    return {"cpu_s_per_step": watch.cpu / args.steps, "wall_s_per_step": watch.wall / args.steps,
            "shared_prefix": shared}, circuit


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    records = read_rows(args.records) if args.records else task_records(model, tokenizer, args.task, args.n, args.pivot)
    lengths = [len(r["context_ids"]) for r in records]
    result: dict = {"model": args.model, "records": len(records), "context_tokens_mean": sum(lengths) / len(lengths),
                    "settings": vars(args)}
    (result["shared"], a), (result["whole"], b) = (timed_run(model, records, args, s) for s in (True, False))
    result["speedup_cpu"] = result["whole"]["cpu_s_per_step"] / result["shared"]["cpu_s_per_step"]
    result["max_mask_difference"] = max(abs(a.scores[k] - b.scores[k]) for k in b.scores)
    result["kept_equal"] = set(a.components) == set(b.components)
    print(f"shared prefix {result['shared']['shared_prefix']} of {result['context_tokens_mean']:.0f} tokens: "
          f"{result['shared']['cpu_s_per_step']:.2f} vs {result['whole']['cpu_s_per_step']:.2f} CPU s a step "
          f"({result['speedup_cpu']:.1f}x); masks differ by {result['max_mask_difference']:.1e}")
    return final_line(result, args.out)


if __name__ == "__main__":
    main()
