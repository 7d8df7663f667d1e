"""``compare``: the grid, the budgets, the verdict, the table, the plot and the chosen arm's adapter.

:func:`compare` writes into its run folder, besides the stages of :mod:`.grid`:

- ``compare.json``: budgets, per arm and budget the test accuracy at the budget (mean, SE, per seed, the
  chosen points), the paired t tests with Holm-adjusted p-values, the rates each arm ran;
- ``table.md``: the same as a markdown table; ``frontier.png``: :func:`~.plot.plot_frontier`;
- ``adapter/``: among the trained points within the first budget of the arms that train an adapter, the arm
  with the best mean *validation* accuracy (its seed with the best one); its model card holds the table and
  the plot.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import CircuitPeftError
from ..files import atomic_write_json, atomic_write_text
from ..recipe.context import RunFolder
from .grid import SCRATCH_DIR, CompareConfig, GridResult, run_grid, run_settings, seed_data, text_chunk_pool
from .verdict import resolve_budgets, verdict

RESULT_FILE, TABLE_FILE, PLOT_FILE = "compare.json", "table.md", "frontier.png"


def check_plan(cfg: CompareConfig) -> None:
    """Refuse, before any work, comparisons and budgets that name arms the run does not have, and
    ``--load-in-4bit`` with the ``full`` arm (4-bit weights cannot train)."""
    names = [a.name for a in cfg.arms]
    load = getattr(cfg.train, "load", None)
    if load is not None and any(a.kind == "full" for a in cfg.arms):  # refuses --load-in-4bit with --arms full
        load.for_full_training("--arms full")
    for a, b in cfg.comparisons:
        for arm in (a, b):
            if arm not in names:
                raise CircuitPeftError(f"--comparisons {a}:{b}: {arm!r} is not in --arms ({', '.join(names)})")
    for spec in cfg.budgets:
        try:
            if float(spec) < 0:
                raise CircuitPeftError(f"--budgets {spec}: a KL budget is >= 0")
        except ValueError:
            arm = spec.partition("/")[0]
            if arm not in names or arm == "base":
                raise CircuitPeftError(f"--budgets {spec}: {arm!r} is not a trained arm of --arms ({', '.join(names)}); "
                                       "give a number (nats per token) or ARM or ARM/N") from None
    if not cfg.budgets:
        raise CircuitPeftError("--budgets: give at least one budget")


def compare(model_name: str, rows: Sequence[dict[str, Any]], heldout: Sequence[dict[str, Any]] | None,
            output_dir: str | Path, cfg: CompareConfig, command: str | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every arm over its rates, checkpoints and seeds on the user's rows, then the verdict (see the module
    docstring). Resumable: a re-run with the same data and recipe reuses every finished stage."""
    from ..taskdata.prompts import default_prompt_style
    from ..models import load_tokenizer

    check_plan(cfg)
    tokenizer = load_tokenizer(model_name)
    chunks = text_chunk_pool(tokenizer, cfg)
    datas = {seed: seed_data(rows, heldout, cfg, seed, chunks) for seed in cfg.seeds}
    run = RunFolder(output_dir, run_settings(model_name, rows, heldout, cfg))
    run.open()
    try:
        style = cfg.train.prompt_style or default_prompt_style(tokenizer, log=log)
        grid = run_grid(run, model_name, tokenizer, style, datas, cfg, log)
        result = verdict(grid.points, resolve_budgets(cfg.budgets, grid.points), cfg.comparisons, cfg.alpha)
        result.update(model=model_name, seeds=list(cfg.seeds), checkpoints=cfg.checkpoints, grids=grid.grids,
                      at_edge=grid.at_edge, sizes=grid.sizes, command=command,
                      base={s: {k: b.get(k) for k in ("val_acc", "test_acc", "max_new_tokens", "capped_fraction", "test_capped",
                                                       "caps_tried")} for s, b in grid.bases.items()},
                      n={s: {"fit": len(d.fit), "val": len(d.val), "test": len(d.test)} for s, d in datas.items()})
        from .plot import plot_frontier

        plot_frontier(grid.points, result["budgets"], run.path / PLOT_FILE, title=f"{model_name}: accuracy vs drift")
        result["adapter"] = _save_chosen(run, cfg, grid, result, log)
        shutil.rmtree(run.path / SCRATCH_DIR, ignore_errors=True)
        atomic_write_json(run.path / RESULT_FILE, result)
        atomic_write_text(run.path / TABLE_FILE, markdown(result))
        log(markdown(result))
        return result
    finally:
        run.close()


def _chosen_point(cfg: CompareConfig, points: dict[str, dict[int, list[dict[str, Any]]]],
                  budget: float) -> tuple[str, int, dict[str, Any]] | None:
    """(arm, seed, point) of the adapter to save: among the trained points (the base excluded) within
    ``budget``, per arm and seed the best validation accuracy; the arm with the best mean of those over its
    seeds (ties: the earlier arm of ``--arms``), and its seed with the best one. None when no arm that
    trains an adapter has a trained point within the budget. The table says whether it beats the base."""
    from .verdict import best_at_budget

    ranked = []
    for order, arm in enumerate(a for a in cfg.arms if a.spec.adapter):
        best = {s: best_at_budget([p for p in pts if p["lr"] is not None], budget)
                for s, pts in points[arm.name].items()}
        best = {s: p for s, p in best.items() if p is not None}
        if best:
            seed = max(best, key=lambda s: (best[s]["val_acc"], -s))
            ranked.append((sum(p["val_acc"] for p in best.values()) / len(best), -order, arm.name, seed, best[seed]))
    if not ranked:
        return None
    *_, arm, seed, point = max(ranked, key=lambda r: r[:2])
    return arm, seed, point


def _save_chosen(run: RunFolder, cfg: CompareConfig, grid: GridResult, result: dict[str, Any], log) -> dict | None:
    """Rebuild the chosen arm (:func:`_chosen_point`), load its checkpoint's weights, write ``adapter/``."""
    from ..recipe.report import save_adapter
    from ..recipe.rates import load_weights
    from .grid import POINTS_DIR

    first = next(iter(result["budgets"]))
    chosen = _chosen_point(cfg, grid.points, result["budgets"][first])
    if chosen is None:
        log("[adapter] no trained arm within the first budget: no adapter written")
        return None
    name, seed, point = chosen
    arm = next(a for a in cfg.arms if a.name == name)
    model, _ = arm.spec.build(arm, grid.contexts[seed])
    load_weights(model, run.path / POINTS_DIR / f"point_{name}_lr{point['lr']:g}_seed{seed}_step{point['step']}.safetensors")
    facts = {"arm": name, "seed": seed, "lr": point["lr"], "step": point["step"], "budget": first,
             "val_acc": point["val_acc"], "val_kl": point["val_kl"], "test_acc": point["test_acc"]}
    card = "\n".join([f"# {name} adapter for {result['model']}", "",
                      f"Chosen by `circuit-peft compare` (seed {seed}, lr {point['lr']:g}, step {point['step']}): "
                      "among the trained points within the first drift budget, the arm with the best mean validation "
                      "accuracy. Whether it beats the untrained base is in the table.", "",
                      markdown({**result, "adapter": facts}), f"![frontier]({PLOT_FILE})", ""])
    save_adapter(model, run.path, card, images=(PLOT_FILE,))
    log(f"[adapter] {name} (seed {seed}, lr {point['lr']:g}, step {point['step']}) written to {run.path / 'adapter'}")
    return facts


def _cell(stats: dict[str, Any]) -> str:
    se = stats["se"]
    return f"{stats['test_acc']:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def markdown(result: dict[str, Any]) -> str:
    """The verdict as markdown: test accuracy at each budget per arm, then the tests with Holm-adjusted p."""
    budgets = result["budgets"]
    lines = [f"## Accuracy at a drift budget: {result['model']}, seeds {', '.join(map(str, result['seeds']))}", "",
             "Test accuracy of each arm at each budget B (per seed: among its points with validation KL <= B, the "
             "one with the best validation accuracy; mean ± SE over seeds). Budgets: "
             + ", ".join(f"{k} = {v:.4g} nats/token" for k, v in budgets.items()) + ".", "",
             "| arm | trainable parameters | rates run | " + " | ".join(f"B = {k}" for k in budgets) + " |",
             "| --- | ---: | --- | " + " | ".join("---:" for _ in budgets) + " |"]
    for arm, by_budget in result["arms"].items():
        grid = result["grids"].get(arm, [])
        rates = ", ".join(f"{lr:g}" for lr in grid) + (" (edge chosen: the best rate may lie outside)"
                                                        if result["at_edge"].get(arm) else "")
        params = result["sizes"].get(arm, {}).get("trainable_params", 0)
        lines.append(f"| {arm} | {params:,} | {rates or '-'} | " + " | ".join(_cell(by_budget[b]) for b in budgets) + " |")
    lines += ["", "Every answer of a seed capped at the base's cap (raised until at most --max-cut-share of the base's "
              "validation answers were cut; the test split chooses nothing): " + "; ".join(
                  f"seed {s} {b['max_new_tokens']} new tokens, {100 * b['capped_fraction']:.0f} % of the base's validation "
                  "answers cut" + (f" ({100 * b['test_capped']:.0f} % of its test answers)" if b.get("test_capped") is not None
                                   else "") for s, b in result["base"].items()) + ".", ""]
    tests = result["tests"]
    if tests:
        lines += [f"Paired t over seeds; Holm over the {len(tests)} tests below (alpha {result['alpha']:g}).", "",
                  "| comparison | B | difference ± SE | t | p | Holm p | verdict |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        lines += [_test_row(t) for t in tests]
        lines.append("")
    if result.get("adapter"):
        a = result["adapter"]
        lines += [f"Adapter saved: {a['arm']} (seed {a['seed']}, lr {a['lr']:g}, step {a['step']}; validation accuracy "
                  f"{a['val_acc']:.3f}, KL {a['val_kl']:.4g}, test accuracy {a['test_acc']:.3f}): of the trained points "
                  f"within B = {a['budget']}, the arm with the best mean validation accuracy.", ""]
    return "\n".join(lines)


def _test_row(t: dict[str, Any]) -> str:
    se = f" ± {t['se']:.3f}" if t["se"] is not None else ""
    num = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    if t["p_holm"] is None:
        word = "not tested (one seed)"
    elif t["significant"]:
        word = f"{t['a']} {'ahead' if t['diff'] > 0 else 'behind'}"
    else:
        word = "no difference shown"
    return (f"| {t['a']} - {t['b']} | {t['budget']} | {t['diff']:+.3f}{se} | {num(t['t'], '.2f')} | "
            f"{num(t['p'], '.4f')} | {num(t['p_holm'], '.4f')} | {word} |")


__all__ = ["PLOT_FILE", "RESULT_FILE", "TABLE_FILE", "check_plan", "compare", "markdown"]
