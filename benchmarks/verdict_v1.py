"""The primary verdict of the pre-registered run verdict_v1 (benchmarks/preregistered/verdict_v1.md, section 7).

Reads the ``compare.json`` of each (model, task) folder of the run, takes the primary comparisons P1-P5 at the
two budgets (10 paired t tests over seeds), applies ONE Holm correction over the 10 p-values, and reads each row
by the registered decision rule: "A ahead" / "A behind" (Holm-adjusted p < 0.05, by the sign of the mean
difference) or "no difference shown", and "level" when the unadjusted 95 % t-interval of the paired difference
lies inside +/- 0.05 (else "undecided"). Writes ``primary.json`` and ``primary.md`` beside the folders.

    python benchmarks/verdict_v1.py --results benchmarks/results/verdict_v1

Refuses (naming the file) a folder whose run has not finished or a primary test it does not hold. Final line:
the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from circuit_peft.compare.verdict import holm, t_two_sided_p
from circuit_peft.files import atomic_write_json, atomic_write_text

ALPHA, LEVEL = 0.05, 0.05
PRIMARY: tuple[tuple[str, str, str, str], ...] = (  # (row, folder, A, B)
    ("P1", "smollm2_comparison", "located@gradient_contrast", "twin@gradient_contrast"),
    ("P2", "smollm2_comparison", "located@gradient_contrast", "lora"),
    ("P3", "smollm2_comparison", "cca_mask", "cca_nomask"),
    ("P4", "gemma3_comparison", "located@ablation", "twin@ablation"),
    ("P5", "gemma3_comparison", "located@ablation", "lora"),
)
BUDGETS: tuple[tuple[str, str], ...] = (("B1", "lora"), ("B2", "lora/10"))


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile (q > 0.5) of Student's t with ``df`` degrees of freedom, by bisection on the p-value."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > 2 * (1 - q) else (lo, mid)
    return (lo + hi) / 2


def _test(result: dict[str, Any], path: Path, a: str, b: str, budget: str) -> dict[str, Any]:
    for t in result["tests"]:
        if (t["a"], t["b"], t["budget"]) == (a, b, budget):
            return t
    raise SystemExit(f"{path}: no test {a} - {b} at budget {budget!r}; rerun compare with --comparisons {a}:{b}")


def reading(test: dict[str, Any]) -> dict[str, Any]:
    """The registered reading of one row: direction by the adjusted p, "level" by the unadjusted 95 % interval."""
    half = t_quantile(0.975, test["df"]) * test["se"] if test.get("se") is not None else None
    low, high = (test["diff"] - half, test["diff"] + half) if half is not None else (None, None)
    shown = test["p_holm"] is not None and test["p_holm"] < ALPHA
    direction = ("A ahead" if test["diff"] > 0 else "A behind") if shown else "no difference shown"
    level = "level" if half is not None and -LEVEL < low and high < LEVEL else "undecided"
    return {"decision": direction, "equivalence": level, "ci95": [low, high]}


def primary(results_dir: Path) -> dict[str, Any]:
    """The 10 primary tests with one Holm correction and their readings (see the module docstring)."""
    rows = []
    for row, folder, a, b in PRIMARY:
        path = results_dir / folder / "compare.json"
        if not path.exists():
            raise SystemExit(f"{path}: missing; the folder's run has not finished (rerun its compare command)")
        result = json.loads(path.read_text())
        for label, budget in BUDGETS:
            t = _test(result, path, a, b, budget)
            rows.append({"row": row, "model": result["model"], "a": a, "b": b, "budget": label, "budget_arm": budget,
                         "budget_kl": t["budget_kl"], "diff": t["diff"], "se": t["se"], "t": t["t"], "df": t["df"],
                         "p": t["p"], "seeds": t["seeds"], "diffs": t["diffs"]})
    for r, adjusted in zip(rows, holm([r["p"] for r in rows])):
        r["p_holm"] = adjusted
        r.update(reading(r))
    return {"preregistration": "benchmarks/preregistered/verdict_v1.md", "alpha": ALPHA, "level_margin": LEVEL,
            "tests": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| row | model | A - B | budget (KL) | diff +/- SE | p | p (Holm, 10) | reading |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in result["tests"]:
        lines.append(f"| {r['row']} | {r['model']} | {r['a']} - {r['b']} | {r['budget']} ({r['budget_kl']:.4g}) | "
                     f"{r['diff']:+.3f} +/- {r['se']:.3f} | {r['p']:.3g} | {r['p_holm']:.3g} | "
                     f"{r['decision']}, {r['equivalence']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/verdict_v1"))
    args = parser.parse_args(argv)
    result = primary(args.results)
    atomic_write_json(args.results / "primary.json", result)
    atomic_write_text(args.results / "primary.md", markdown(result))
    print(markdown(result))
    print(json.dumps({"tests": len(result["tests"]), "shown": sum(r["decision"] != "no difference shown"
                                                                  for r in result["tests"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
