"""Training-step cost of a circuit adapter vs LoRA vs full fine-tuning (SmolLM2-135M-Instruct).

Configurations, all trained with AdamW on batches of GSM8K text (``--batch`` x ``--seq-len`` tokens):

* ``top``: a circuit of 5 % of the query heads (with their key/value heads) and 1 % of the MLP
  neurons, all in the top third of the layers (projections "all");
* ``spread``: the same counts spread evenly over all layers;
* ``lora``: LoRA r=16 on every linear layer (``all-linear``);
* ``full``: full fine-tuning;
* ``top_unfused``: ``top`` on the adapter's inference path (frozen matmul, then each slice's own matmul
  added), the peer of the fused training forward (one matmul with the slices scattered in);
* ``floor``: no trainable weights at all, only the residual stream entering the top circuit's lowest
  layer made to require a gradient: the forward of every layer plus the backward (input gradients
  only) of the top third and the LM head. What *any* method that trains something in those layers
  pays; ``top`` minus ``floor`` is what the circuit's own slices cost.

Step time: forward + backward + AdamW step, median over ``--steps`` measured steps after
``--warmup`` steps; the six models live in one process and take their steps in turn. On CPU the
ratios use the process CPU time of each step with one torch thread (on a shared box wall time
swings with the other jobs; CPU time is the work done); wall times are printed too. Training
memory: on CUDA ``max_memory_allocated`` during a step; on CPU the bytes autograd saves for the
backward pass (each storage once, via ``saved_tensors_hooks``) plus gradients and AdamW's two
moments of the trainable parameters (float32) - deterministic, unlike the resident set.

    python benchmarks/adapter_step.py                      # full spec: batch 8 x 256 tokens
    python benchmarks/adapter_step.py --steps 1 --seq-len 32   # quick check

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from _bench import saved_for_backward

CONFIGS = ("top", "top_unfused", "spread", "lora", "full", "floor")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="folder holding gsm8k/train.jsonl")
    p.add_argument("--model", default="smollm2", help="'smollm2', a hub id or a folder")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (default 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core box more threads oversubscribe and slow down)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu' or 'cuda'")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ----- data and configurations ---------------------------------------------------------------------


def gsm8k_batch(data_dir: str, tokenizer: Any, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """``batch`` rows of ``seq_len`` tokens packed from GSM8K training text (labels = inputs)."""
    path = Path(data_dir) / "gsm8k" / "train.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; pass --data-dir pointing at a folder with gsm8k/train.jsonl")
    need = batch * seq_len
    ids: list[int] = []
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            ids += tokenizer(row["question"] + "\n" + row["answer"] + tokenizer.eos_token)["input_ids"]
            if len(ids) >= need:
                break
    x = torch.tensor(ids[:need]).view(batch, seq_len)
    return {"input_ids": x, "labels": x.clone()}


def circuit_components(arch: Any, placement: str, seed: int) -> list[tuple[str, int, int]]:
    """5 % of query heads (plus their key/value heads) and 1 % of neurons, in the top third or spread."""
    d = arch.dims
    n_q = max(1, round(0.05 * d.n_layers * d.n_heads))
    n_mlp = max(1, round(0.01 * d.n_layers * d.n_neurons))
    rng = random.Random(seed)
    if placement == "top":
        layers = list(range(d.n_layers - d.n_layers // 3, d.n_layers))
        heads = rng.sample([(l, h) for l in layers for h in range(d.n_heads)], n_q)
        neurons = rng.sample([(l, i) for l in layers for i in range(d.n_neurons)], n_mlp)
    else:  # evenly over all layers, lowest and highest included
        head_layers = [round(i * (d.n_layers - 1) / max(1, n_q - 1)) for i in range(n_q)]
        heads = [(l, rng.randrange(d.n_heads)) for l in head_layers]
        per_layer = [n_mlp // d.n_layers + (1 if l < n_mlp % d.n_layers else 0) for l in range(d.n_layers)]
        neurons = [(l, i) for l in range(d.n_layers) for i in rng.sample(range(d.n_neurons), per_layer[l])]
    comps = [("q", l, h) for l, h in heads]
    comps += [(kind, l, arch.kv_head_of(h)) for l, h in heads for kind in ("k", "v")]
    comps += [("mlp", l, i) for l, i in neurons]
    return comps


def build(name: str, model_name: str, seed: int, device: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fresh model prepared for configuration ``name`` and facts about it."""
    from peft import LoraConfig, get_peft_model

    import circuit_peft  # noqa: F401  (registers CIRCUIT)
    from circuit_peft import CircuitConfig, circuit_size, get_arch, load_model

    model = load_model(model_name)
    info: dict[str, Any] = {}
    if name in ("top", "top_unfused", "spread"):
        placement = "spread" if name == "spread" else "top"
        config = CircuitConfig.from_components(circuit_components(get_arch(model), placement, seed))
        size = circuit_size(config, model)
        info.update(components=size["components"], component_fraction=size["component_fraction"])
        model = get_peft_model(model, config)
    elif name == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    elif name == "full":
        model.requires_grad_(True)
    else:  # floor
        model.requires_grad_(False)
        arch = get_arch(model)
        lowest = min(layer for _, layer, _ in circuit_components(arch, "top", seed))
        arch.layers(model)[lowest].register_forward_pre_hook(_residual_needs_grad, with_kwargs=True)
    model.to(device).train()
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name in ("top", "top_unfused", "spread", "lora"):
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            info["adapter_bytes"] = os.path.getsize(Path(tmp) / "adapter_model.safetensors")
    return model, info


def _residual_needs_grad(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of ``floor``: the hidden states entering this layer become a leaf needing a gradient."""
    if args:
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}


@contextmanager
def _two_matmul_path() -> Iterator[None]:
    """Inside the block circuit layers never fuse (``MIN_FUSED_TOKENS`` out of reach), restored after."""
    from circuit_peft.tuner import layer

    min_tokens, layer.MIN_FUSED_TOKENS = layer.MIN_FUSED_TOKENS, 2**62
    try:
        yield
    finally:
        layer.MIN_FUSED_TOKENS = min_tokens


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], fused: bool = True) -> Any:
    """A training step ``() -> (wall_s, cpu_s, saved_activation_bytes)``; ``fused=False``: circuit layers take
    their inference path (base matmul, then the slices' own matmuls)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params or [torch.zeros(1, requires_grad=True)], lr=1e-5, weight_decay=0.01)

    def step() -> tuple[float, float, int]:
        wall, cpu = time.perf_counter(), time.process_time()
        with saved_for_backward() as storages, (nullcontext() if fused else _two_matmul_path()):
            loss = model(**batch).loss  # saved_for_backward: each storage autograd keeps for backward, once
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu, sum(storages.values())

    return step


# ----- run ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from circuit_peft import load_tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    batch = gsm8k_batch(args.data_dir, load_tokenizer(args.model), args.batch, args.seq_len)
    batch = {k: v.to(device) for k, v in batch.items()}

    steps, infos, models = {}, {}, {}
    wall = {n: [] for n in CONFIGS}
    cpu = {n: [] for n in CONFIGS}
    memory: dict[str, int] = {}
    for name in tqdm(CONFIGS, desc="building"):
        models[name], infos[name] = build(name, args.model, args.seed, device)
        steps[name] = make_step(models[name], batch, fused=name != "top_unfused")
    for i in tqdm(range(args.warmup + args.steps), desc=f"steps (round-robin over {len(CONFIGS)} configs)"):
        for name in CONFIGS:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            w, c, saved = steps[name]()
            if device == "cuda":
                memory[name] = max(memory.get(name, 0), torch.cuda.max_memory_allocated() - base)
            else:  # saved activations + gradients + AdamW's two moments (float32)
                memory[name] = saved + 3 * 4 * infos[name]["trainable_params"]
            if i >= args.warmup:
                wall[name].append(w)
                cpu[name].append(c)
    del models, steps

    # On CPU with one thread the process CPU time is the compute time, unaffected by other jobs on the box.
    timing = cpu if device == "cpu" else wall
    median = {n: statistics.median(timing[n]) for n in CONFIGS}
    print(f"\nSmolLM2 step, batch {args.batch} x {args.seq_len} tokens, device {device}, threads {args.threads}, "
          f"{args.steps} measured steps after {args.warmup} warm-up; ratios use "
          f"{'process CPU time' if device == 'cpu' else 'wall time'}")
    print(f"{'config':<8} {'median s':>9} {'cpu s per step':<22} {'wall s per step':<22} {'train mem MiB':>13} "
          f"{'trainable':>12} {'adapter bytes':>14}")
    for n in CONFIGS:
        print(f"{n:<8} {median[n]:>9.2f} {' '.join(f'{t:.1f}' for t in cpu[n]):<22} "
              f"{' '.join(f'{t:.1f}' for t in wall[n]):<22} {memory[n] / 2**20:>13.0f} "
              f"{infos[n]['trainable_params']:>12,} {infos[n].get('adapter_bytes', 0):>14,}")
    result = {
        "top_vs_lora": median["top"] / median["lora"],
        "spread_vs_lora": median["spread"] / median["lora"],
        "top_vs_full": median["top"] / median["full"],
        "floor_vs_lora": median["floor"] / median["lora"],
        "top_vs_floor": median["top"] / median["floor"],
        "top_vs_top_unfused": median["top"] / median["top_unfused"],
        "top_unfused_vs_lora": median["top_unfused"] / median["lora"],
        "circuit_trainable_params": infos["top"]["trainable_params"],
        "lora_trainable_params": infos["lora"]["trainable_params"],
        "circuit_adapter_bytes": infos["top"]["adapter_bytes"],
        "lora_adapter_bytes": infos["lora"]["adapter_bytes"],
        "spread_trainable_params": infos["spread"]["trainable_params"],
        "circuit_components": infos["top"]["components"],
        "median_step_s": median,
        "timing": "process_cpu" if device == "cpu" else "wall",
        "median_wall_s": {n: statistics.median(wall[n]) for n in CONFIGS},
        "train_memory_bytes": memory,
        "memory_measure": "cuda_max_allocated" if device == "cuda" else "saved_activations+grads+adam",
        "memory_top_vs_lora": memory["top"] / memory["lora"],
        "memory_top_vs_full": memory["top"] / memory["full"],
        "device": device,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "threads": args.threads,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
