"""Does DCM prune? The paper's schedule vs the step schedule at the same step budget, on mined CCA records.

Both runs learn masks on the same training records (``circuit-peft mine`` output) with the same step
budget (the paper's run: whole epochs covering at least that many steps; early stops may end either sooner); each circuit is then scored on held-out records (other problems) by its
faithfulness (circuit - empty) / (full - empty) of the mean logit difference desired - undesired
(:func:`circuit_peft.locate.circuit_margin`): "circuit" zero-ablates every component outside it at the
last position, "empty" every component, "full" none. (Mined CCA records are where the model goes
wrong, so the full margin is often negative: a plain circuit / full ratio would mean nothing.) A layer-matched random circuit of the step run's size (same kinds and counts per layer) is
the control (what any circuit of that size keeps).

Keys of the final JSON line, per run (``paper``, ``steps``): ``kept`` (components), ``kept_fraction``
(of all q/k/v heads and neurons), ``kept_by_kind``, ``faithfulness``, ``seconds``, ``steps``;
``margin``; plus ``full_margin`` / ``empty_margin`` / ``random_margin`` (held-out) and
``random_faithfulness``. When the full model's margin is below the empty circuit's (mined records are
where the model is wrong), faithfulness is not a share of anything: read the margins.

Usage: python benchmarks/dcm.py --records A/records.jsonl,B/records.jsonl --heldout C/records.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import final_line  # noqa: E402
from circuit_peft.arch import get_arch  # noqa: E402
from circuit_peft.circuit import Circuit  # noqa: E402
from circuit_peft.files import read_rows  # noqa: E402
from circuit_peft.locate import circuit_margin, learn_masks, random_circuit  # noqa: E402
from circuit_peft.models import load_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--records", required=True, help="training records: comma-separated records.jsonl files")
    p.add_argument("--heldout", required=True, help="held-out records (other problems): comma-separated files")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps of both runs")
    p.add_argument("--lr", type=float, default=0.05, help="step schedule's Adam lr (the paper's run keeps 5e-3)")
    p.add_argument("--lambda-l1", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--check-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--only", choices=("paper", "steps"), default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p.parse_args(argv)


def read_records(paths: str) -> list[dict]:
    return [r for path in paths.split(",") if path for r in read_rows(path)]


def faithfulness(margin: float, ends: tuple[float, float]) -> float:
    """(margin - empty) / (full - empty) for ``ends = (full, empty)``."""
    full, empty = ends
    return (margin - empty) / (full - empty)


def summarise(circuit, seconds: float, margin: float, ends: tuple[float, float]) -> dict:
    return {"kept": len(circuit.components), "kept_fraction": circuit.component_fraction(),
            "kept_by_kind": circuit.counts(), "margin": margin, "faithfulness": faithfulness(margin, ends), "seconds": seconds,
            "steps": circuit.meta["steps"], "stopped_early": circuit.meta["stopped_early"]}


def empty_circuit(model) -> Circuit:
    """The empty circuit (every component ablated by :func:`circuit_margin`)."""
    return Circuit([], fingerprint=get_arch(model).fingerprint(), method="empty")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train, heldout = read_records(args.records), read_records(args.heldout)
    overlap = {r["problem_id"] for r in train} & {r["problem_id"] for r in heldout}
    if overlap:
        raise SystemExit(f"--heldout shares {len(overlap)} problems with --records (e.g. {sorted(overlap)[:3]})")
    model = load_model(args.model)
    full = circuit_margin(model, heldout)
    empty = circuit_margin(model, heldout, empty_circuit(model))
    result: dict = {"records": len(train), "heldout_records": len(heldout), "full_margin": full,
                    "empty_margin": empty, "settings": vars(args)}
    per_epoch = -(-len(train) // args.batch_size)
    runs = {"paper": dict(epochs=-(-args.steps // per_epoch)),
            "steps": dict(lr=args.lr, steps=args.steps, check_every=args.check_every)}
    for name, kw in runs.items():
        if args.only not in (None, name):
            continue
        t = time.perf_counter()
        circuit = learn_masks(model, train, lambda_l1=args.lambda_l1, batch_size=args.batch_size,
                              patience=args.patience, **kw)
        seconds = time.perf_counter() - t
        result[name] = summarise(circuit, seconds, circuit_margin(model, heldout, circuit), (full, empty))
        print(f"{name}: kept {result[name]['kept']} ({result[name]['kept_fraction']:.2%}) "
              f"{result[name]['kept_by_kind']}, faithfulness {result[name]['faithfulness']:.3f}, {seconds:.0f} s")
        if name == "steps":
            control = random_circuit(circuit, match="layer", seed=0)
            result["random_margin"] = circuit_margin(model, heldout, control)
            result["random_faithfulness"] = faithfulness(result["random_margin"], (full, empty))
            print(f"layer-matched random circuit: faithfulness {result['random_faithfulness']:.3f}")
    return final_line(result, args.out)


if __name__ == "__main__":
    main()
