"""``circuit-peft demo``: train a small circuit adapter on SmolLM2 for a few steps, offline.

A first demo of the adapter alone (the full CCA pipeline replaces it later): it takes a fixed,
hand-picked circuit in the upper layers (no locating step), trains it on a few bundled GSM8K
problems with AdamW, prints the loss before and after, and saves the adapter.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from typing import Any

import torch
from peft import get_peft_model
from tqdm import tqdm

from ..arch import get_arch
from ..models import load_model, load_tokenizer
from ..tuner import CircuitConfig, circuit_size


def demo_problems() -> list[dict[str, str]]:
    """The bundled GSM8K problems: ``{"question", "answer"}`` rows."""
    text = resources.files("circuit_peft").joinpath("data/gsm8k_demo.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def demo_circuit(model: torch.nn.Module) -> CircuitConfig:
    """A fixed small circuit: 2 query heads (with their key/value head) in each of the 3 layers at
    3/4 depth, and 32 neurons in the layer above. Hand-picked, not located."""
    arch = get_arch(model)
    n = arch.dims.n_layers
    first = (3 * n) // 4
    comps = []
    for layer in range(first, min(first + 3, n)):
        comps += [("q", layer, 0), ("q", layer, 1), ("k", layer, arch.kv_head_of(0)), ("v", layer, arch.kv_head_of(0))]
    top = min(first + 3, n - 1)
    comps += [("mlp", top, i) for i in range(0, min(32, arch.dims.n_neurons))]
    return CircuitConfig.from_components(comps)


def _batch(tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> dict[str, torch.Tensor]:
    """Chat-formatted prompt + answer; loss only on the answer tokens. Returns input_ids/attention_mask/labels (B, T)."""
    ids, labels = [], []
    for r in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                               add_generation_prompt=True)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(r["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        seq = (p + a)[:max_length]
        ids.append(seq)
        labels.append(([-100] * len(p) + a)[:max_length])
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in ids]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids]),
        "labels": torch.tensor([l + [-100] * (width - len(l)) for l in labels]),
    }


def run_demo(model_name: str = "smollm2", steps: int = 6, lr: float = 2e-3, output_dir: str = "circuit-demo-adapter",
             problems: int = 4, max_length: int = 128) -> dict[str, float]:
    """Train the demo circuit; returns ``{"loss_before", "loss_after", "seconds"}``."""
    if not 1 <= problems <= len(demo_problems()):
        raise ValueError(f"--problems must be between 1 and {len(demo_problems())}")
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name), load_tokenizer(model_name, padding_side="right")
    config = demo_circuit(model)
    size = circuit_size(config, model)
    print(f"circuit: {size['components']} components of {size['total_components']} "
          f"({100 * size['component_fraction']:.3f} %), {size['trainable_params']:,} trainable parameters "
          f"({100 * size['param_fraction']:.3f} % of {size['total_params']:,})")
    model = get_peft_model(model, config)
    batch = _batch(tokenizer, demo_problems()[:problems], max_length)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    before = loss_now()
    print(f"loss before: {before:.4f}")
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(steps), desc="training the circuit"):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - start
    after = loss_now()
    print(f"loss after {steps} steps: {after:.4f} ({seconds:.1f} s)")
    model.save_pretrained(output_dir)
    print(f"adapter saved to {output_dir}/ (load: import circuit_peft; PeftModel.from_pretrained(base, {output_dir!r}))")
    return {"loss_before": before, "loss_after": after, "seconds": seconds}


def run(args: argparse.Namespace) -> int:
    run_demo(args.model, steps=args.steps, lr=args.lr, output_dir=args.output_dir, problems=args.problems)
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="train a small circuit adapter on SmolLM2 for a few steps (offline)")
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), a hub id, or a folder")
    p.add_argument("--steps", type=int, default=6, help="training steps (default 6)")
    p.add_argument("--problems", type=int, default=4, help="bundled GSM8K problems to train on (1-8, default 4)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--output-dir", default="circuit-demo-adapter", help="where to save the adapter")
    p.set_defaults(func=run)
