"""The library on a CUDA GPU: the same numbers as on CPU, family by family.

For every supported family, a tiny random model (float32) on CPU and an identical copy on CUDA:

* ``adapter``: a circuit adapter's logits and the gradients of its slices after one backward, CUDA vs CPU;
  ``merge``: the merged weights, CUDA vs CPU;
* ``scan``: the exact head-ablation scan (shared prompt prefix, several heads per pass) on CUDA against its
  naive per-head forwards on CUDA, and against the same scan on CPU;
* ``attribution``: the ablation-target attribution scores, CUDA vs CPU;
* ``gradient``: the SFT-loss gradient locator's scores (pivotal-weighted rows), CUDA vs CPU;
* ``seer``: CircuitSeer's per-example scores (attention variance of three heads), CUDA vs CPU;
* ``update``: one CCA update (4 steps, lower-layer cache and shared prompt prefix on): final margin, CUDA vs CPU;
* ``trainer``: 4 steps of Transformers' ``Trainer`` on the adapter on CUDA: the loss falls and only the
  adapter's slices change.

A check passes when its largest relative difference is under ``--rtol`` (the absolute difference under ``--score-atol``
for scan and attribution scores, in nats per solution token; TF32 off: CUDA float32 matmuls differ from CPU's in
summation order only). Needs a CUDA device; CI never runs it.

    python benchmarks/gpu_check.py [--families llama,gemma3] [--rtol 1e-3]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch

from circuit_peft import CircuitConfig, supported_families, tiny_model
from circuit_peft.cca.update import amplify_update
from circuit_peft.locate import attribution_scan, gradient_scan, head_ablation_scan
from circuit_peft.select.scoring import CircuitSeerScorer

DEVICE = "cuda"  # --device
CIRCUIT = [("q", 1, 0), ("k", 1, 1), ("v", 2, 1), ("mlp", 1, 3), ("mlp", 2, 7)]
BOS = 2


def probe_rows(n: int = 6, prefix: int = 20, seed: int = 0) -> list[dict[str, list[int]]]:
    """Pre-tokenised probe rows sharing a ``prefix``-token prompt start (the scan runs it once)."""
    g = torch.Generator().manual_seed(seed)
    shared = [BOS] + torch.randint(10, 120, (prefix - 1,), generator=g).tolist()
    return [{"prompt_ids": shared + torch.randint(10, 120, (int(torch.randint(3, 9, (1,), generator=g)),),
                                                  generator=g).tolist(),
             "solution_ids": torch.randint(10, 120, (3,), generator=g).tolist()} for _ in range(n)]


def records(n: int = 10, prefix: int = 20, seed: int = 1) -> list[dict[str, Any]]:
    """Contrastive CCA records with a shared prompt prefix."""
    return [{"context_ids": r["prompt_ids"], "desired_id": 5 + i % 7, "undesired_id": 40 + i % 5,
             "problem_id": f"p{i}"} for i, r in enumerate(probe_rows(n, prefix, seed))]


def sft_rows(seed: int = 0) -> list[dict[str, list]]:
    """Pivotal-weighted SFT rows (the gradient locator's input): 3 prompt tokens, the rest completion."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (7, 9, 6, 12):
        ids = torch.randint(3, 120, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * 3 + [1] * (n - 3), "undesired_ids": [-100] * n,
                     "token_weights": [1.0] * (n - 1) + [5.0], "labels": [-100] * 3 + ids[3:]})
    return rows


class _NoTokenizer:
    pad_token_id, bos_token_id = 0, 1


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (floored at 1e-6), both moved to CPU float64."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


def score_diff(a: dict, b: dict) -> float:
    """max |a[c] - b[c]| over components c (scores in nats per solution token)."""
    return max(abs(a[c] - b[c]) for c in b)


def on_both(family: str, fn: Callable[[torch.nn.Module], Any]) -> tuple[Any, Any]:
    """``fn`` on a fresh tiny model of ``family`` on the device and on CPU (same weights)."""
    return fn(tiny_model(family).to(DEVICE)), fn(tiny_model(family))


def adapter_outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    from peft import get_peft_model

    peft_model = get_peft_model(model, CircuitConfig.from_components(CIRCUIT))
    g = torch.Generator().manual_seed(0)  # the same nonzero slices on both devices (init draws per-device RNGs)
    with torch.no_grad():
        for p in (p for p in peft_model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ids = torch.randint(3, 120, (2, 24), generator=torch.Generator().manual_seed(0)).to(model.device)
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    merged = peft_model.merge_and_unload()
    return out.logits, grads, {n: p.detach().clone() for n, p in merged.named_parameters()}


def check_family(family: str) -> dict[str, float]:
    (lc, gc, mc), (l0, g0, m0) = on_both(family, adapter_outputs)
    out = {"adapter": max([rel_diff(lc, l0)] + [rel_diff(gc[n], g0[n]) for n in g0]),
           "merge": max(rel_diff(mc[n], m0[n]) for n in m0)}

    probe = probe_rows()
    scan = dict(batch_size=4, heads_per_pass=3, min_shared_prefix=8, keep_fraction=None, progress=False)
    fast = head_ablation_scan(tiny_model(family).to(DEVICE), None, probe, **scan)
    naive = head_ablation_scan(tiny_model(family).to(DEVICE), None, probe, naive=True, **scan)
    cpu = head_ablation_scan(tiny_model(family), None, probe, **scan)
    out["scan_vs_naive"] = score_diff(fast.scores, naive.scores)
    out["scan"] = score_diff(fast.scores, cpu.scores)

    att = on_both(family, lambda m: attribution_scan(m, None, probe, keep_fraction=None, progress=False).scores)
    out["attribution"] = score_diff(*att)

    grad = on_both(family, lambda m: gradient_scan(m, sft_rows(), keep_fraction=None, progress=False).scores)
    out["gradient"] = rel_diff(torch.tensor([grad[0][c] for c in grad[1]]), torch.tensor(list(grad[1].values())))
    ids = [r["input_ids"] for r in sft_rows(1)]
    seer = on_both(family, lambda m: CircuitSeerScorer(m, _NoTokenizer(), [(0, 1), (1, 0), (1, 3)], batch_size=4,
                                                       progress=False).score_ids(ids))
    out["seer"] = rel_diff(torch.as_tensor(seer[0]), torch.as_tensor(seer[1]))
    upd = on_both(family, lambda m: amplify_update(
        m, records(), CircuitConfig.from_components(CIRCUIT, projections="paper"), steps=4, lr=1e-2,
        micro_batch_size=5, min_shared_prefix=8, progress=False).final_margin)
    out["update"] = abs(upd[0] - upd[1]) / max(abs(upd[1]), 1e-6)
    out.update(trainer_check(family))
    return out


def trainer_check(family: str) -> dict[str, float]:
    """4 Trainer steps on CUDA: the loss falls and weights outside the adapter stay put."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_model(family), CircuitConfig.from_components(CIRCUIT, init_weights=False))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = torch.randint(3, 120, (8, 24), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(tmp, per_device_train_batch_size=8, max_steps=4, learning_rate=5e-2,
                                 logging_steps=1, report_to=[], save_strategy="no", use_cpu=DEVICE == "cpu")
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    on_device = next(model.parameters()).device.type == DEVICE
    moved = max(float((p.detach().cpu() - frozen[n]).abs().max()) for n, p in model.named_parameters()
                if not p.requires_grad)
    return {"trainer_on_device": float(on_device), "trainer_loss_drop": losses[0] - losses[-1],
            "trainer_frozen_moved": moved}


def passed(r: dict[str, float], rtol: float, score_atol: float) -> bool:
    """Every difference under its tolerance; the Trainer ran on the device, lowered the loss, kept frozen weights."""
    return (all(r[k] < rtol for k in ("adapter", "merge", "gradient", "seer", "update"))
            and all(r[k] < score_atol for k in ("scan_vs_naive", "scan", "attribution"))
            and r["trainer_on_device"] == 1.0 and r["trainer_loss_drop"] > 0 and r["trainer_frozen_moved"] == 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=None, help="comma-separated (default: every supported family)")
    p.add_argument("--rtol", type=float, default=1e-4, help="logits, gradients, merged weights, CCA margin")
    p.add_argument("--score-atol", type=float, default=1e-5,
                   help="scan and attribution scores (nats per solution token; differences of losses)")
    p.add_argument("--device", default="cuda",
                   help="'cpu' checks the script itself (CPU against CPU: every difference 0 but scan_vs_naive)")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = False
    families = args.families.split(",") if args.families else [f.split(" ")[0] for f in supported_families()]
    results, start = {}, time.perf_counter()
    for family in families:
        try:
            r = check_family(family)
            r["passed"] = passed(r, args.rtol, args.score_atol)
        except Exception as e:  # report every family, not only the first failure
            r = {"passed": False, "error": f"{type(e).__name__}: {e}", "where": traceback.format_exc()[-1500:]}
        results[family] = r
        print(family, json.dumps(r), flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
                      "torch": torch.__version__, "rtol": args.rtol, "score_atol": args.score_atol,
                      "all_passed": all(r["passed"] for r in results.values()),
                      "seconds": round(time.perf_counter() - start, 1), "families": results}))


if __name__ == "__main__":
    main()
