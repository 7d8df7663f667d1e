"""The report of ``benchmarks/recipes.py``: mean and standard error over seeds per arm and metric, the paired
located - other arm gaps, the markdown table, the printed table and the two plots. Reads only saved results
(the per-(arm, seed) dicts), never a model."""

from __future__ import annotations

from typing import Any

from _bench import mean_se


def summarise(results: dict[str, list[dict[str, Any]]], fractions: list[float], locators: list[str]) -> dict[str, Any]:
    """Mean and standard error over seeds per arm and metric, and the paired located - random gaps."""
    out: dict[str, Any] = {"arms": {}}
    for arm, rows in results.items():
        stats = {}
        extra = sorted({k for r in rows for k in r if k.startswith("transfer_cap") and k != "transfer_capped"})
        for key in ("test_acc", "transfer_acc", "val_acc", "test_capped", "transfer_capped", "kl", "mmlu_delta",
                    "truthfulqa_delta", "trainable_params", *extra):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                stats[key], stats[f"{key}_se"] = mean_se(vals)
        stats["seeds"] = [r["seed"] for r in rows]
        stats["lr"] = rows[0].get("lr")
        out["arms"][arm] = stats
    capped = sorted({k.removesuffix("_acc") for rows in results.values() for r in rows for k in r
                     if k.startswith("transfer_cap") and k.endswith("_acc")})  # --also-transfer-cap splits
    for f in fractions:
        for loc in locators:
            for split in ("test", "transfer", *capped):
                gap = paired_gap(results, f"located_{loc}@{f:g}", f"random_layer_{loc}@{f:g}", f"{split}_acc")
                if gap is not None:
                    tag = f"{loc}@{f:g}" + ("" if split == "test" else f"_{split}")
                    out[f"located_minus_random_layer_acc_{tag}"], out[f"located_minus_random_layer_acc_{tag}_se"] = gap
    arms = out["arms"]
    base = arms.get("base", {})
    out["base_capped_fraction"] = base.get("test_capped")
    main = f"located_{locators[0]}@{max(fractions):g}"
    if main in arms:
        out["located_minus_random_layer_acc"] = out.get(f"located_minus_random_layer_acc_{locators[0]}@{max(fractions):g}")
        out["located_minus_random_layer_acc_se"] = out.get(
            f"located_minus_random_layer_acc_{locators[0]}@{max(fractions):g}_se")
        out["circuit_acc"], out["circuit_kl"] = arms[main].get("test_acc"), arms[main].get("kl")
        if "lora16" in arms:
            out["lora_weighted_acc"], out["lora_kl"] = arms["lora16"].get("test_acc"), arms["lora16"].get("kl")
            out["circuit_params_fraction_of_lora"] = arms[main]["trainable_params"] / arms["lora16"]["trainable_params"]
        out["located_minus"] = gaps_to_every_arm(results, main)
    return out


def gaps_to_every_arm(results, main: str) -> dict[str, dict[str, Any]]:
    """Paired ``main`` - other arm accuracy (test and held-out format) over the seeds both ran."""
    out = {}
    for other in results:
        if other in (main, "base"):
            continue
        seeds = sorted({r["seed"] for r in results[main]} & {r["seed"] for r in results[other]})
        if seeds:
            gaps = {split: paired_gap(results, main, other, f"{split}_acc") for split in ("test", "transfer")}
            out[other] = {"seeds": seeds, **{f"{k}_gap": v[0] for k, v in gaps.items()},
                          **{f"{k}_gap_se": v[1] for k, v in gaps.items()}}
    return out


def paired_gap(results, a: str, b: str, key: str) -> tuple[float, float] | None:
    ra = {r["seed"]: r[key] for r in results.get(a, [])}
    rb = {r["seed"]: r[key] for r in results.get(b, [])}
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    return mean_se([ra[s] - rb[s] for s in seeds])


def plot_gaps(summary: dict[str, Any], path: str) -> str:
    """Bars of the paired located - layer-matched random accuracy (test and held-out format) per
    locator and size, with one standard error; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = "located_minus_random_layer_acc_"
    tags = sorted({k[len(prefix):].removesuffix("_transfer") for k in summary
                   if k.startswith(prefix) and not k.endswith("_se")})
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(tags) + 2), 3.2))
    for j, (suffix, label) in enumerate((("", "test (training format)"), ("_transfer", "held-out format"))):
        xs = [i + 0.2 * (2 * j - 1) for i in range(len(tags))]
        ys = [summary.get(f"{prefix}{t}{suffix}", float("nan")) for t in tags]
        es = [finite(summary.get(f"{prefix}{t}{suffix}_se")) for t in tags]
        ax.bar(xs, ys, width=0.4, yerr=es, capsize=3, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(tags)), [f"{t}\n{len(summary['arms'].get('located_' + t, {}).get('seeds', []))} seeds"
                                      for t in tags], fontsize=8)
    ax.set_ylabel("accuracy: located - random")
    ax.set_title(f"{summary.get('model', '')} {summary.get('settings', {}).get('task', 'arithmetic')}: "
                 "does locating beat a random circuit?", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes, not over the points
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tradeoff(summary: dict[str, Any], path: str) -> str:
    """Test accuracy (y) against mean KL on general text (x, log scale) per trained arm, one standard
    error both ways, the base's accuracy as a line; a PNG at ``path``. Up and left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    arms = [(a, st) for a, st in summary["arms"].items() if a != "base" and st.get("kl") is not None]
    for i, (arm, st) in enumerate(arms):  # 20 colours x 4 markers: no two arms look alike
        lr = "" if st.get("lr") is None else f", lr {st['lr']:g}"
        ax.errorbar(st["kl"], st["test_acc"], xerr=finite(st.get("kl_se")), yerr=finite(st.get("test_acc_se")),
                    fmt="osD^"[i // 20 % 4], color=plt.cm.tab20(i % 20), capsize=3,
                    label=f"{arm} ({len(st['seeds'])} seeds{lr})")
    if "base" in summary["arms"]:
        ax.axhline(summary["arms"]["base"]["test_acc"], color="grey", ls="--", lw=0.8, label="base model")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("KL on general text (drift; lower is better)")
    ax.set_ylabel("held-out accuracy (training format)")
    ax.set_title(f"{summary.get('model', '')}: accuracy against drift, each arm at its own learning rate", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes, not over the points
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def finite(x: float | None) -> float:
    """An error bar's length: 0 for a missing or NaN standard error (one seed)."""
    return 0.0 if x is None or x != x else x


def markdown_table(summary: dict[str, Any]) -> str:
    """The arms as a markdown table (mean +/- standard error over seeds)."""
    def cell(stats, key, digits=3):
        if key not in stats:
            return "-"
        se = stats.get(f"{key}_se")
        return f"{stats[key]:.{digits}f}" + ("" if se is None or se != se else f" ± {se:.{digits}f}")

    rows = ["| arm | seeds | trainable params | test acc | held-out-format acc | capped (test / held-out) | KL | "
            "MMLU Δ | TruthfulQA Δ |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm, st in summary["arms"].items():
        rows.append(f"| {arm} | {len(st['seeds'])} | {st.get('trainable_params', 0):,.0f} | {cell(st, 'test_acc')} | "
                    f"{cell(st, 'transfer_acc')} | {cell(st, 'test_capped', 2)} / {cell(st, 'transfer_capped', 2)} | "
                    f"{cell(st, 'kl', 4)} | "
                    f"{cell(st, 'mmlu_delta')} | {cell(st, 'truthfulqa_delta')} |")
    return "\n".join(rows)


def print_table(summary: dict[str, Any]) -> None:
    print(f"\n{'arm':34s} {'params':>10s} {'test acc':>15s} {'transfer acc':>15s} {'capped':>7s} {'KL':>8s}")
    for arm, s in summary["arms"].items():
        print(f"{arm:34s} {s.get('trainable_params', 0):10.0f} {s['test_acc']:.3f} ± {s.get('test_acc_se', 0):.3f}  "
              f"{s['transfer_acc']:.3f} ± {s.get('transfer_acc_se', 0):.3f}  {s['test_capped']:7.3f} "
              f"{s.get('kl', 0):8.4f}")
