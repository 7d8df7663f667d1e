"""Each arm's learning rate chosen on a validation split of the training rows (``--lrs``).

A rate that suits one arm can be wrong for another: on Gemma-3-270M a located circuit trained at the
rate chosen for a different circuit looked worse than a random one; at its own rate, chosen on
validation, it tied (``benchmarks/README.md``, recipes.py). So with ``TrainConfig.learning_rates`` the
circuit and every control train once per rate from the same initial weights, are measured on rows held
back from training (:func:`validation_split`), and keep their best rate. A small validation split ties
often (32 problems: two rates at 14 right each), and a fixed tie rule can by itself make one arm look
better than another; so ties go to the rate with the lower validation loss of the gold solutions (a
continuous score; :func:`choose_rate`), and only then to the first rate of the grid. The held-out rows that
the report measures are never seen while choosing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn


def seeded_split(rows: Sequence[Any], k: int, seed: int) -> tuple[list[Any], list[Any]]:
    """``(rest, held)``: ``k`` of ``rows`` drawn by a seeded shuffle, and the others in shuffled order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[k:]], [rows[i] for i in order[:k]]


def validation_split(rows: Sequence[dict[str, Any]], fraction: float,
                     seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(fit, validation)``: a seeded ``fraction`` of ``rows`` held back to choose the learning rate."""
    k = round(len(rows) * fraction)
    if k < 1 or k >= len(rows):
        raise ValueError(f"validation_fraction (--validation-fraction) {fraction} of {len(rows)} training rows "
                         "leaves an empty split: give more rows or another fraction")
    return seeded_split(rows, k, seed)


def save_weights(model: nn.Module, path: Path) -> None:
    """The PEFT adapter's weights of ``model`` into a safetensors file, written atomically."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ..files import atomic_path

    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_weights(model: nn.Module, path: Path) -> None:
    """Put the adapter weights saved by :func:`save_weights` back into ``model``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path)))


@dataclass
class RateChoice:
    """The rate kept, the validation accuracy of every rate tried and, where measured, its validation loss
    (nats per gold-solution token; keys written as ``f"{lr:g}"``)."""

    lr: float
    validation_accuracy: dict[str, float]
    validation_loss: dict[str, float] = field(default_factory=dict)
    at_edge: bool = False  # still the grid's lowest or highest rate after widening: the optimum may lie outside
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # what ``train_at`` returned per rate, if anything


class AdapterWeights:
    """What :func:`fit_on_grid` resets between rates and saves per rate: the PEFT adapter's weights (the default)."""

    def snapshot(self, model: nn.Module) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)

    def save(self, model: nn.Module, path: Path) -> None:
        save_weights(model, path)

    def load(self, model: nn.Module, path: Path) -> None:
        load_weights(model, path)


class FullWeights(AdapterWeights):
    """Every weight of a model without an adapter (full fine-tuning): ``state_dict`` in memory, and safetensors'
    ``save_model`` / ``load_model`` on disk (tied weights stored once)."""

    def snapshot(self, model: nn.Module) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(state)

    def save(self, model: nn.Module, path: Path) -> None:
        from safetensors.torch import save_model

        from ..files import atomic_path

        with atomic_path(path) as tmp:
            save_model(model, str(tmp))

    def load(self, model: nn.Module, path: Path) -> None:
        from safetensors.torch import load_model

        load_model(model, str(path))


def choose_rate(rates: Sequence[float], accuracy: dict[float, float], loss: dict[float, float] | None = None) -> float:
    """The rate with the best ``accuracy``; among equal accuracies the lowest ``loss`` (a rate without
    one counts as worst); then the first in ``rates``."""
    loss = loss or {}
    ranked = sorted(range(len(rates)), key=lambda i: (-accuracy[rates[i]], loss.get(rates[i], math.inf), i))
    return rates[ranked[0]]


GRID_EXTENSIONS = 2  # rates added beyond a grid's edge at most (per arm) while the edge keeps being chosen


def beyond_edge(rates: Sequence[float], chosen: float) -> float | None:
    """The next rate outside a grid of >= 2 rates whose lowest or highest rate was ``chosen``: one step of
    the grid's outermost ratio further (3e-3 chosen from 3e-4, 1e-3, 3e-3: 9e-3); None when ``chosen`` is
    inside the grid (or the grid has one rate: nothing says where its edge is)."""
    ordered = sorted(rates)
    if len(ordered) < 2 or ordered[0] < chosen < ordered[-1]:
        return None
    if chosen == ordered[-1]:
        return float(f"{ordered[-1] * ordered[-1] / ordered[-2]:.3g}")
    return float(f"{ordered[0] * ordered[0] / ordered[1]:.3g}")


def fit_on_grid(run, tag: str, model: nn.Module, train_at: Callable[[nn.Module, float], dict[str, Any] | None],
                measure: Callable[[nn.Module], float], rates: Sequence[float],
                log: Callable[[str], None], tie_break: Callable[[nn.Module], float] | None = None,
                extensions: int = 0, weights: AdapterWeights | None = None) -> RateChoice:
    """Train ``model``'s adapter at each of ``rates`` from the same initial weights, one resumable stage
    ``<tag>_lr<rate>`` of ``run`` each (its weights saved beside it), score each with ``measure`` (a
    validation accuracy) and ``tie_break`` (a validation loss, lower is better; optional), and leave
    ``model`` holding the weights of the rate :func:`choose_rate` keeps. While the kept rate is the grid's
    edge, up to ``extensions`` rates beyond it (:func:`beyond_edge`) are tried too; ``at_edge`` says
    whether the edge was still kept at the end. ``weights``: what is reset and saved (default
    :class:`AdapterWeights`; :class:`FullWeights` for a model trained whole); a dict ``train_at`` returns (facts
    about that fit, e.g. the step an update kept) is saved with the rate and returned in ``facts``."""
    weights = weights or AdapterWeights()
    initial = weights.snapshot(model)
    scores: dict[float, float] = {}
    losses: dict[float, float] = {}
    facts: dict[str, dict[str, Any]] = {}
    rates, added = list(rates), 0
    for lr in rates:  # the list grows while the edge is chosen
        stage = f"{tag}_lr{lr:g}"
        path = run.path / "stages" / f"{stage}.safetensors"

        def fit_one(lr: float = lr, path: Path = path) -> dict[str, Any]:
            weights.restore(model, initial)
            fit = train_at(model, lr)  # data-parallel on every process under a launcher
            if not getattr(run, "is_main", True):  # measured and saved once, by the main process
                return {}
            weights.save(model, path)
            out = {"lr": lr, "validation_accuracy": measure(model)}
            if tie_break is not None:
                out["validation_loss"] = tie_break(model)
            if fit:
                out["facts"] = fit
            return out

        result = run.stage(stage, fit_one, log, **({"every_process": True} if hasattr(run, "is_main") else {}))
        scores[lr] = result["validation_accuracy"]
        if "validation_loss" in result:
            losses[lr] = result["validation_loss"]
        if "facts" in result:
            facts[f"{lr:g}"] = result["facts"]
        log(f"[{tag}] lr {lr:g}: validation accuracy {scores[lr]:.3f}"
            + (f", loss {losses[lr]:.4f}" if lr in losses else ""))
        if lr == rates[-1] and added < extensions:
            wider = beyond_edge(rates, choose_rate(rates, scores, losses))
            if wider is not None and wider not in rates:
                log(f"[{tag}] the grid's edge was chosen: trying {wider:g} too")
                rates.append(wider)
                added += 1
    best = choose_rate(rates, scores, losses)
    weights.load(model, run.path / "stages" / f"{tag}_lr{best:g}.safetensors")
    return RateChoice(best, {f"{lr:g}": scores[lr] for lr in rates}, {f"{lr:g}": losses[lr] for lr in losses},
                      at_edge=beyond_edge(rates, best) is not None, facts=facts)


def arms_with_chosen_rate(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The arms of a :func:`~circuit_peft.recipe.train` report (``circuit`` and each control) whose rate a
    grid chose: ``{name: {"lr", "validation_accuracy", "n_validation", ...}}`` (empty without ``--lrs``)."""
    arms = {"circuit": report.get("training") or {}, **(report.get("controls") or {})}
    return {name: a for name, a in arms.items() if "validation_accuracy" in a}


__all__ = ["GRID_EXTENSIONS", "AdapterWeights", "FullWeights", "RateChoice", "arms_with_chosen_rate", "beyond_edge", "choose_rate", "fit_on_grid", "load_weights", "save_weights", "seeded_split",
           "validation_split"]
