"""The primary verdict of the pre-registered run verdict_v1 (benchmarks/preregistered/verdict_v1.md, section 7).

Reads the tier-1 ``compare.json`` of each (model, task) folder of the run (``tier1/compare.json`` once tier 2 ran), takes the primary comparisons P1-P5 at the
two budgets (10 paired t tests over seeds), applies ONE Holm correction over the 10 p-values, and reads each row
by the registered decision rule: "A ahead" / "A behind" (Holm-adjusted p < 0.05, by the sign of the mean
difference) or "no difference shown", and "level" when the unadjusted 95 % t-interval of the paired difference
lies inside +/- 0.05 (else "undecided"). Writes ``primary.json`` and ``primary.md`` beside the folders.

    python benchmarks/verdict_v1.py --results benchmarks/results/verdict_v1

Refuses (naming the file) a folder whose run has not finished or a primary test it does not hold. Final line:
the JSON summary. ``--secondary`` writes section 8's ``secondary.json`` / ``.md`` instead: the S-a family (tier 2,
one Holm over its tests), the S-b family (arithmetic, P1-P5 there, one Holm), and per folder that ran CCA arms the
records mined per problem, the DCM mask's kept fraction and epochs, and the paper's rule per CCA run.
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


def tier1_result(folder: Path) -> Path:
    """The folder's tier-1 ``compare.json``: kept in ``tier1/`` once its tier-2 command (which rewrites
    ``compare.json`` with the secondary comparisons) has started (verdict_v1.md, deviation 8)."""
    kept = folder / "tier1" / "compare.json"
    return kept if kept.exists() else folder / "compare.json"


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


def _family(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r, adjusted in zip(rows, holm([r["p"] for r in rows])):
        r["p_holm"] = adjusted
        r.update(reading(r))
    return rows


def _row(row: str, model: str, a: str, b: str, label: str, kl: float, t: dict[str, Any]) -> dict[str, Any]:
    return {"row": row, "model": model, "a": a, "b": b, "budget": label, "budget_kl": kl,
            **{k: t[k] for k in ("diff", "se", "t", "df", "p", "seeds", "diffs")}}


def _budget_rows(path: Path, row: str, a: str, b: str) -> list[dict[str, Any]]:
    """The registered comparison A - B of the folder result at ``path``, at B1 and B2 (``BUDGETS``)."""
    result = json.loads(path.read_text())
    rows = []
    for label, budget in BUDGETS:
        t = _test(result, path, a, b, budget)
        rows.append({**_row(row, result["model"], a, b, label, t["budget_kl"], t), "budget_arm": budget})
    return rows


def primary(results_dir: Path) -> dict[str, Any]:
    """The 10 primary tests with one Holm correction and their readings (see the module docstring)."""
    rows = []
    for row, folder, a, b in PRIMARY:
        path = tier1_result(results_dir / folder)
        if not path.exists():
            raise SystemExit(f"{path}: missing; the folder's run has not finished (rerun its compare command)")
        rows += _budget_rows(path, row, a, b)
    return {"preregistration": "benchmarks/preregistered/verdict_v1.md", "alpha": ALPHA, "level_margin": LEVEL,
            "tests": _family(rows)}


# ----- secondary (section 8): reported, Holm within each family, never the verdict ------------------------------

S_A_IN_FOLDER: tuple[tuple[str, str, str], ...] = (  # (folder, A, B): the tier-2 compare.json of the folder holds them
    ("smollm2_comparison", "cca_mask", "cca_twin"), ("smollm2_comparison", "cca_sft", "cca_mask"),
    ("smollm2_comparison", "cca_sft", "located@gradient_contrast"),
    ("smollm2_comparison", "located@gradient_contrast", "lora_matched@gradient_contrast"),
    ("smollm2_comparison", "located@gradient_contrast", "full"),
    ("smollm2_comparison_grad2", "located@gradient", "twin@gradient"),
    ("gemma3_comparison", "cca_mask", "cca_nomask"), ("gemma3_comparison", "cca_mask", "cca_twin"),
)
S_A_ACROSS = ("smollm2_comparison_grad2", "located@gradient", "smollm2_comparison", "lora")  # same seeds and test rows
S_B = tuple((row, folder.replace("_comparison", "_arithmetic"), a, b) for row, folder, a, b in PRIMARY)
CCA_ARMS = ("cca_mask", "cca_nomask", "cca_twin")


def _finished(results_dir: Path, folder: str) -> dict[str, Any] | None:
    path = results_dir / folder / "compare.json"
    return json.loads(path.read_text()) if path.exists() else None


def _budget_keys(result: dict[str, Any]) -> list[str]:
    """The folder's two budget names in the order B1, B2 (``lora``, ``lora/10`` or tier 1's two numbers)."""
    return list(result["budgets"])


def family_s_a(results_dir: Path) -> list[dict[str, Any]] | str:
    """S-a: the tier-2 comparisons of the comparison folders and the 2 % gradient folder, one Holm over them."""
    from circuit_peft.compare.verdict import paired_t

    folders = {f: _finished(results_dir, f) for f in {f for f, _, _ in S_A_IN_FOLDER} | {S_A_ACROSS[2]}}
    missing = [f for f, r in folders.items() if r is None]
    if missing:
        return f"not finished: {', '.join(sorted(missing))}"
    unfinished = sorted({f for f, a, b in S_A_IN_FOLDER if not any((t["a"], t["b"]) == (a, b) for t in folders[f]["tests"])})
    if unfinished:
        return f"tier 2 not finished: {', '.join(unfinished)}"
    rows = []
    for i, (folder, a, b) in enumerate(S_A_IN_FOLDER):
        result, path = folders[folder], results_dir / folder / "compare.json"
        for label, budget in zip(("B1", "B2"), _budget_keys(result)):
            rows.append(_row(f"S-a{i + 1}", result["model"], a, b, label, result["budgets"][budget],
                             _test(result, path, a, b, budget)))
    fa, a, fb, b = S_A_ACROSS
    for label, ka, kb in zip(("B1", "B2"), _budget_keys(folders[fa]), _budget_keys(folders[fb])):
        if folders[fa]["budgets"][ka] != folders[fb]["budgets"][kb]:
            raise SystemExit(f"{results_dir / fa / 'compare.json'}: budget {label} {folders[fa]['budgets'][ka]!r} is not "
                             f"{fb}'s {folders[fb]['budgets'][kb]!r} (deviation 8: grad2 runs at tier 1's numbers)")
        xa, xb = folders[fa]["arms"][a][ka]["per_seed"], folders[fb]["arms"][b][kb]["per_seed"]
        seeds = sorted(set(xa) & set(xb))
        t = {**paired_t([xa[s] for s in seeds], [xb[s] for s in seeds]), "seeds": seeds}
        rows.append(_row(f"S-a{len(S_A_IN_FOLDER) + 1}", folders[fa]["model"], a, b, label,
                         folders[fa]["budgets"][ka], t))
    return _family(rows)


def family_s_b(results_dir: Path) -> list[dict[str, Any]] | str:
    """S-b: P1-P5 on the arithmetic task, one Holm over its 10 tests."""
    rows = []
    for row, folder, a, b in S_B:
        path = results_dir / folder / "compare.json"
        if not path.exists():
            return f"not finished: {folder}"
        rows += _budget_rows(path, row, a, b)
    return _family(rows)


def cca_facts(folder: Path) -> dict[str, Any]:
    """Per seed: records mined per problem, the DCM mask's kept fraction and epochs; per CCA arm, rate and seed:
    the paper's rule (test accuracy at the best validated step of the update, no budget)."""
    cca = folder / "cca"
    seeds = {}
    for stats in sorted(cca.glob("dcm_seed*_stats.json")):
        seed = int(stats.stem.removeprefix("dcm_seed").removesuffix("_stats"))
        s, meta = json.loads(stats.read_text()), json.loads((cca / f"dcm_seed{seed}.json").read_text())["meta"]
        seeds[seed] = {"problems": s["mining"]["problems"], "records": s["records"],
                       "records_per_problem": s["records"] / max(s["mining"]["problems"], 1),
                       "dcm_kept": s["kept"], "dcm_kept_fraction": s["component_fraction"],
                       "dcm_epochs": meta.get("epochs_run"), "dcm_stopped_early": meta.get("stopped_early")}
    rule = {}
    for arm in CCA_ARMS:
        for path in sorted(cca.glob(f"{arm}_lr*_seed*.json")):
            r = json.loads(path.read_text())
            rule[path.stem] = {"best_step": r["best_step"], "best_val": r["best_val"],
                               "test_acc": (r.get("point") or {}).get("test_acc")}
    return {"seeds": seeds, "paper_rule": rule}


def secondary(results_dir: Path) -> dict[str, Any]:
    """Section 8: the S-a and S-b families (each its own Holm; a family whose folders have not finished says so)
    and the CCA facts of every folder that ran CCA arms."""
    cca = {f.name: cca_facts(f) for f in sorted(results_dir.iterdir())
           if (f / "cca").is_dir() and not f.name.endswith("_helper")}  # a helper's copy (verdict_v1_run.sh) repeats its folder
    return {"preregistration": "benchmarks/preregistered/verdict_v1.md", "section": 8,
            "S-a": family_s_a(results_dir), "S-b": family_s_b(results_dir), "cca": cca}


def _num(x: float | None, spec: str) -> str:
    """``x`` formatted, or "-" (a test over fewer than two seeds has no SE or p)."""
    return "-" if x is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    lines = ["| row | model | A - B | budget (KL) | diff +/- SE | p | p (Holm, 10) | reading |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in result["tests"]:
        lines.append(f"| {r['row']} | {r['model']} | {r['a']} - {r['b']} | {r['budget']} ({r['budget_kl']:.4g}) | "
                     f"{_num(r['diff'], '+.3f')} +/- {_num(r['se'], '.3f')} | {_num(r['p'], '.3g')} | "
                     f"{_num(r['p_holm'], '.3g')} | {r['decision']}, {r['equivalence']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/verdict_v1"))
    parser.add_argument("--secondary", action="store_true", help="write secondary.json/.md (section 8) instead")
    args = parser.parse_args(argv)
    if args.secondary:
        return write_secondary(args.results)
    result = primary(args.results)
    atomic_write_json(args.results / "primary.json", result)
    atomic_write_text(args.results / "primary.md", markdown(result))
    print(markdown(result))
    print(json.dumps({"tests": len(result["tests"]), "shown": sum(r["decision"] != "no difference shown"
                                                                  for r in result["tests"])}))
    return 0


def secondary_markdown(result: dict[str, Any]) -> str:
    parts = []
    for family in ("S-a", "S-b"):
        rows = result[family]
        body = markdown({"tests": rows}).replace("(Holm, 10)", f"(Holm, {len(rows)})") if isinstance(rows, list) else rows
        parts.append(f"### {family}\n\n{body}")
    for folder, facts in result["cca"].items():
        lines = [f"### CCA in {folder}", "", "| seed | problems | records | records per problem | DCM kept (fraction) "
                 "| DCM epochs |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {s} | {f['problems']} | {f['records']} | {f['records_per_problem']:.2f} | {f['dcm_kept']} "
                  f"({f['dcm_kept_fraction']:.2%}) | {f['dcm_epochs']} |" for s, f in facts["seeds"].items()]
        lines += ["", "| arm, rate, seed | paper rule: best validated step | its validation accuracy | its test accuracy |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {k} | {r['best_step']} | {r['best_val']} | {r['test_acc']} |" for k, r in facts["paper_rule"].items()]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def write_secondary(results_dir: Path) -> int:
    result = secondary(results_dir)
    atomic_write_json(results_dir / "secondary.json", result)
    atomic_write_text(results_dir / "secondary.md", secondary_markdown(result))
    print(secondary_markdown(result))
    print(json.dumps({family: len(result[family]) if isinstance(result[family], list) else result[family]
                      for family in ("S-a", "S-b")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
