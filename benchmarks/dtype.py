"""float32 vs bfloat16: the demo's ``circuit-peft train`` run (``make demo`` settings, side effects left out)
once per dtype on the same rows, then how far apart the two came out.

    python benchmarks/dtype.py --model smollm2 --threads 1 --out benchmarks/results/dtype_smollm2.json

Each dtype runs in its own resumable run folder under ``--work`` (a stopped benchmark resumes). Reported:
the located circuits (components kept by both / by either), the held-out accuracy before and after in each
dtype, the paired difference bfloat16 - float32 on the same held-out problems (mean and standard error),
and each stage's seconds. The same circuit and an accuracy difference within about 2 standard errors is
what "bfloat16 changes nothing that matters" looks like; on a CPU without bfloat16 instructions the
bfloat16 run is slower, not faster.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="bench-dtype", help="folder of the two run folders (resumable)")
    p.add_argument("--out", default="benchmarks/results/dtype_smollm2.json")
    return p


def run_one(model: str, dtype: str, folder: Path) -> dict[str, Any]:
    """The demo's train command line in ``dtype`` on the CPU; its report and wall seconds."""
    from circuit_peft.cli import build_parser as cli_parser
    from circuit_peft.commands.demo import TRAIN_DEMO_ARGS
    from circuit_peft.commands.train import config_from_args, split_examples
    from circuit_peft.recipe import train

    args = cli_parser().parse_args(["train", "--model", model, *TRAIN_DEMO_ARGS, "--device", "cpu", "--dtype", dtype,
                                    "--out", str(folder)])
    rows, held = split_examples(args)
    t0 = time.perf_counter()
    report = train(model, rows, held, folder, config_from_args(args)).report
    return {"report": report, "seconds": time.perf_counter() - t0}


def compare(a: dict[str, Any], b: dict[str, Any], folders: dict[str, Path]) -> dict[str, Any]:
    """Circuit overlap and paired accuracy differences (b - a) of two reports."""
    from circuit_peft.recipe.controls import paired_gap

    kept = {d: {tuple(c) for c in json.loads((f / "circuit.json").read_text())["components"]}
            for d, f in folders.items()}
    ka, kb = kept.values()
    out: dict[str, Any] = {"components_both": len(ka & kb), "components_either": len(ka | kb),
                           "components_only_float32": sorted(map(list, ka - kb)),
                           "components_only_bfloat16": sorted(map(list, kb - ka))}
    for stage in ("before", "after"):
        gap, se = paired_gap(b[stage]["correct"], a[stage]["correct"])
        out[f"{stage}_bf16_minus_fp32"] = {"mean": gap, "se": se}
    return out


def main() -> None:
    args = build_parser().parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    folders = {d: work / d for d in DTYPES}
    runs = {d: run_one(args.model, d, folders[d]) for d in DTYPES}
    summary = {d: {"before": {k: r["report"]["before"][k] for k in ("accuracy", "stderr", "count")},
                   "after": {k: r["report"]["after"][k] for k in ("accuracy", "stderr", "count")},
                   "components": r["report"]["locate"]["components"], "wall_seconds": r["seconds"],
                   "stage_seconds": {s: r["report"][s].get("seconds") for s in ("locate", "before", "after")}}
               for d, r in runs.items()}
    result = {"model": args.model, "threads": args.threads, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "runs": summary,
              "comparison": compare(*(runs[d]["report"] for d in DTYPES), folders)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
