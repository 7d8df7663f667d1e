"""What a finished run of :func:`~circuit_peft.recipe.pipeline.train` shows: the adapter's model card (the top of
its ``README.md``), the summary table the command prints, and the adapter written with its card."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

from ..files import atomic_dir, atomic_write_text
from .rates import arms_with_chosen_rate


def save_adapter(peft_model, out: Path, card: str, images: Sequence[str] = ("circuit.png",)) -> None:
    """Write ``out/adapter`` so that a kill leaves the old adapter or the new one, never a mix; ``images``
    (files of ``out`` the card shows) are copied beside it."""
    with atomic_dir(out / "adapter") as tmp:
        peft_model.save_pretrained(str(tmp))
        readme = tmp / "README.md"
        existing = readme.read_text() if readme.exists() else ""
        front = ""
        if existing.startswith("---"):  # keep PEFT's metadata block first, where the Hub reads it
            end = existing.index("---", 3) + 3
            front, existing = existing[:end] + "\n\n", existing[end:]
        atomic_write_text(readme, front + card + "\n" + existing)
        for image in images:
            shutil.copy(out / image, tmp / image)


def model_card(report: dict[str, Any], command: str | None) -> str:
    """The top of the adapter's README: what it is, the before/after table, the heatmap, the command."""
    b, a = report["before"], report["after"]
    lines = [f"# Circuit adapter for {report['model']}", "",
             f"Trained by circuit-peft: only {report['locate']['components']} components "
             f"({100 * report['locate']['component_fraction']:.2f} % of q/k/v heads and MLP neurons, "
             f"{report['trainable_params']:,} parameters) changed. Load with `PeftModel.from_pretrained` "
             "after `import circuit_peft`.", ""]
    if "loss" in b:  # answer='none': the held-out completion loss
        lines += ["| held-out | completion loss (nats/token) | standard error |", "| --- | ---: | ---: |",
                  f"| before | {b['loss']:.4f} | {b['stderr']:.4f} |", f"| after | {a['loss']:.4f} | {a['stderr']:.4f} |",
                  "", _loss_change(b, a), ""]
    else:
        lines += ["| held-out | accuracy | standard error | answers hitting the token cap |", "| --- | ---: | ---: | ---: |",
                  f"| before | {b['accuracy']:.3f} | {b['stderr']:.3f} | {b['capped_fraction']:.3f} |",
                  f"| after | {a['accuracy']:.3f} | {a['stderr']:.3f} | {a['capped_fraction']:.3f} |", ""]
    effects = report.get("side_effects") or {}
    if effects:
        lines += ["Side effects: " + ", ".join(f"{k} {v:+.4f}" for k, v in effects.items() if k != "seconds"), ""]
    if report.get("controls"):
        lines += ["Controls trained the same way on the same rows (located minus control paired over the held-out "
                  "problems; one training run each, so the SE does not cover another training seed):", "",
                  "| control | trainable parameters | accuracy | located - control |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {name} | {c['trainable_params']:,} | {c['accuracy']:.3f} | {_gap_text(c)} |"
                  for name, c in report["controls"].items()]
        lines += [""]
    lines += [*(f"{line}." for line in _rate_lines(report)), "", "![circuit](circuit.png)", ""]
    if command:
        lines += ["Made with:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def summary_table(report: dict[str, Any]) -> str:
    """A short human summary: before/after accuracy (or completion loss) with standard errors and the circuit size."""
    b, a = report["before"], report["after"]
    if "loss" in b:
        return "\n".join([
            f"{'':8s} {'loss':>9s} {'+/- SE':>7s}   (nats per completion token, {b['count']} held-out rows)",
            f"{'before':8s} {b['loss']:9.4f} {b['stderr']:7.4f}", f"{'after':8s} {a['loss']:9.4f} {a['stderr']:7.4f}",
            f"{_loss_change(b, a)}; circuit {report['locate']['components']} components "
            f"({100 * report['locate']['component_fraction']:.2f} %), {report['trainable_params']:,} trainable parameters",
        ])
    gain = a["accuracy"] - b["accuracy"]
    se = (a["stderr"] ** 2 + b["stderr"] ** 2) ** 0.5
    return "\n".join([
        f"{'':8s} {'accuracy':>9s} {'+/- SE':>7s} {'capped':>7s}   ({b['count']} held-out problems)",
        f"{'before':8s} {b['accuracy']:9.3f} {b['stderr']:7.3f} {b['capped_fraction']:7.3f}",
        f"{'after':8s} {a['accuracy']:9.3f} {a['stderr']:7.3f} {a['capped_fraction']:7.3f}",
        f"change {gain:+.3f} ({gain / se if se else float('nan'):+.1f} SE); circuit "
        f"{report['locate']['components']} components ({100 * report['locate']['component_fraction']:.2f} %), "
        f"{report['trainable_params']:,} trainable parameters",
        *_control_lines(report.get("controls") or {}),
        *_rate_lines(report),
    ])


def _loss_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    """After minus before completion loss, with the standard error paired over the same held-out rows."""
    from ..evaluate.accuracy import ratio_mean_se

    counts = before["counts"]
    diff = [(x - y) * n for x, y, n in zip(after["losses"], before["losses"], counts)]
    change = ratio_mean_se(diff, counts)
    se = change["stderr"]
    return (f"change {change['loss']:+.4f} nats/token (paired SE {se:.4f}, "
            f"{change['loss'] / se if se else float('nan'):+.1f} SE)")


def _rate_lines(report: dict[str, Any]) -> list[str]:
    """One line naming each arm's learning rate and its validation accuracy, when a grid chose them."""
    chosen = arms_with_chosen_rate(report)
    if not chosen:
        return []
    n = next(iter(chosen.values()))["n_validation"]
    edge = [name for name, a in chosen.items() if a.get("lr_at_grid_edge")]
    return [f"learning rate chosen per arm on {n} validation rows held back from training (validation accuracy; "
            "ties: the lower gold-solution loss): "
            + ", ".join(f"{name} {a['lr']:g} ({a['validation_accuracy'][format(a['lr'], 'g')]:.3f})"
                        for name, a in chosen.items())
            + (f"; {', '.join(edge)} kept the widened grid's edge: the best rate may lie outside it" if edge else "")]


def _gap_text(control: dict[str, Any]) -> str:
    se = control.get("gap_se")
    return f"{control['gap']:+.3f}" + (f" +/- {se:.3f}" if se is not None else " (unpaired)")


def _control_lines(controls: dict[str, dict[str, Any]]) -> list[str]:
    """The summary's rows for the controls: accuracy like before/after, then located minus control."""
    if not controls:
        return []
    return ["controls: same rows and recipe, one training run each (located - control paired over held-out problems)",
            *[f"{name:16s} {c['accuracy']:9.3f} {c['stderr']:7.3f} {c['capped_fraction']:7.3f}   located - control "
              f"{_gap_text(c)}; {c['trainable_params']:,} parameters" for name, c in controls.items()]]



__all__ = ["model_card", "save_adapter", "summary_table"]
