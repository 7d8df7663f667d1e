"""Every (arm, learning rate, seed) trained once, measured at checkpoints, saved as it finishes.

:func:`run_grid` works in a run folder (:class:`~circuit_peft.recipe.RunFolder`: ``run.json`` refuses a
folder made with other settings, ``stages/<name>.json`` written atomically as each stage finishes, so a
killed run resumes at the stage it was in). Per seed: the rows are split into fit / validation / test
(the test split as ``train`` draws its held-out split, the validation split as ``train --lrs`` does);
general text is cut into 128-token chunks, the first ``kl_chunks`` for validation and the next
``kl_chunks`` for test. Stages:

- ``base_seed<k>``: the base model's accuracy on validation and test, at a token cap that cuts at most
  ``max_cut_share`` of its answers (:mod:`circuit_peft.recipe.caps`); every arm of the seed is measured
  at that cap;
- ``locate_<locator>_seed<k>``: the circuit of ``circuit_fraction`` located on the fit rows
  (``circuits/<locator>_seed<k>.json``);
- ``point_<arm>_lr<lr>_seed<k>``: the arm trained at ``lr``; at each checkpoint its validation and test
  accuracy and KL(base || arm) on the validation and test text (``*_step<n>.safetensors``: the adapter's
  weights there).

While an arm's best point (validation accuracy, any drift) sits at its grid's lowest or highest rate on
some seed, one more rate beyond that edge is run for every seed (:func:`~circuit_peft.recipe.rates.beyond_edge`),
up to ``grid_extensions`` times; the report says where the edge is still chosen.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from ..recipe.config import TrainConfig
from ..recipe.context import RunFolder
from ..runs import RunSchema, fingerprint
from .arms import ArmContext, ArmSpec

POINTS_DIR = "stages"
SCRATCH_DIR = "scratch"  # trainer output folders while a point trains; removed when the comparison ends


@dataclass
class CompareConfig:
    """What :func:`run_grid` runs. ``train``: the recipe (SFT settings, circuit fraction, caps, fields,
    ``kl_chunks`` chunks of ``side_effect_data_dir``'s text per split); ``arms``; ``lrs``: a grid per arm
    name (arms not named: their kind's default grid); ``checkpoints`` per run; ``seeds``; ``budgets``
    (see :func:`~circuit_peft.compare.verdict.resolve_budgets`); ``comparisons`` (pairs of arm names);
    ``heldout_fraction``: the test split drawn from the rows when no held-out rows are given."""

    train: TrainConfig
    arms: list[ArmSpec]
    lrs: dict[str, tuple[float, ...]] = field(default_factory=dict)
    checkpoints: int = 3
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[str, ...] = ("lora", "lora/10")
    comparisons: tuple[tuple[str, str], ...] = ()
    alpha: float = 0.05
    heldout_fraction: float = 0.2
    data_seed: int = 0  # the seed that drew generated rows (recorded in the run settings; not a training seed)

    def grid(self, arm: ArmSpec) -> tuple[float, ...]:
        return tuple(self.lrs.get(arm.name, self.lrs.get(arm.kind, arm.spec.lrs)))


# What a compare folder is keyed by (circuit_peft.runs): the recipe (TrainConfig, under "recipe"), checkpoints, the
# held-out fraction and data seed beside the inputs, as the first compare folders were. Volatile: the recipe's
# fields compare does not read (each arm names its locator and update, seeds are compare's own) and those that
# only add stages (search bounds, grid widening), so arms, rates and seeds may be added to a finished folder.
# data_seed came later: keyed only away from 0.
COMPARE_SCHEMA = RunSchema(
    "compare", version=1, nest=None, added={"data_seed": 0},
    volatile=tuple(f"recipe.{name}" for name in (
        "controls", "learning_rates", "max_new_tokens_limit", "max_cut_share", "grid_extensions", "seed", "select",
        "select_fraction", "update", "update_steps", "locate", "cca_kept_step")))


def run_settings(model_name: str, rows, heldout, cfg: CompareConfig) -> dict[str, Any]:
    """What a run folder must share to be resumed (:data:`COMPARE_SCHEMA`): model, data, recipe (with the resolved
    dtype, not the device: train's rule) and checkpoints; the held-out fraction only when no held-out rows are given."""
    recipe = asdict(cfg.train)
    recipe.update(cfg.train.load.settings())
    recipe.pop("load")
    values = {"recipe": recipe, "checkpoints": cfg.checkpoints, "data_seed": cfg.data_seed,
              "heldout_fraction": None if heldout else cfg.heldout_fraction}
    return COMPARE_SCHEMA.settings(values, model=model_name, rows=fingerprint(rows),
                                   heldout=fingerprint(heldout) if heldout else None)


@dataclass
class SeedData:
    """One seed's splits and text chunks."""

    fit: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]
    val_chunks: list[list[int]]
    test_chunks: list[list[int]]


def seed_data(rows, heldout, cfg: CompareConfig, seed: int, chunks: list[list[int]]) -> SeedData:
    """Seed ``seed``'s fit / validation / test rows (drawn as ``train`` and ``train --lrs`` draw them)."""
    from ..errors import CircuitPeftError
    from ..recipe.rates import seeded_split, validation_split

    rows = [dict(r) for r in rows]
    if heldout:
        train, test = rows, [dict(r) for r in heldout]
    else:
        k = int(len(rows) * cfg.heldout_fraction)
        if k < 1 or k >= len(rows):
            raise CircuitPeftError(f"--heldout-fraction {cfg.heldout_fraction} of {len(rows)} rows leaves an empty split")
        train, test = seeded_split(rows, k, seed)
    fit, val = validation_split(train, cfg.train.validation_fraction, seed)
    n = cfg.train.kl_chunks
    return SeedData(fit, val, test, chunks[:n], chunks[n : 2 * n])


def text_chunk_pool(tokenizer, cfg: CompareConfig) -> list[list[int]]:
    """2 x ``kl_chunks`` chunks of 128 tokens of the general text (validation, then test); refuses a short text."""
    from ..errors import CircuitPeftError
    from ..evaluate.data import load_text
    from ..evaluate.side_effects import text_chunks

    if cfg.train.side_effect_data_dir is None:
        raise CircuitPeftError("--side-effects-data: compare measures drift as KL on general text; give a folder "
                               "with text/tinyshakespeare.txt")
    chunks = text_chunks(tokenizer, load_text(cfg.train.side_effect_data_dir), 128, None)
    if len(chunks) < 2 * cfg.train.kl_chunks:
        raise CircuitPeftError(f"--kl-chunks {cfg.train.kl_chunks}: the text has {len(chunks)} chunks of 128 tokens, "
                               f"fewer than the {2 * cfg.train.kl_chunks} that validation and test need")
    return chunks


class Measure:
    """Accuracy on validation and test rows at the seed's cap and KL(base || model) on both text splits."""

    def __init__(self, tokenizer, style: str, data: SeedData, cfg: TrainConfig, base: nn.Module):
        self.tokenizer, self.style, self.data, self.cfg, self.base = tokenizer, style, data, cfg, base

    def split_accuracy(self, model: nn.Module, cap: int, split: str) -> dict[str, Any]:
        """Accuracy and cut share of the ``"val"`` or ``"test"`` rows at ``cap`` (keys prefixed by the split)."""
        from ..recipe.stages.evaluate import measure_accuracy

        rows = self.data.val if split == "val" else self.data.test
        result = measure_accuracy(model, self.tokenizer, rows, self.style, replace(self.cfg, max_new_tokens=cap))
        return {f"{split}_acc": result["accuracy"], f"{split}_capped": result["capped_fraction"]}

    def validation(self, model: nn.Module, cap: int) -> dict[str, Any]:
        """Validation accuracy at ``cap``; ``capped_fraction`` (what the cap is chosen on, .caps) is the
        validation rows' share: the test split chooses nothing."""
        val = self.split_accuracy(model, cap, "val")
        return {**val, "capped_fraction": val["val_capped"]}

    def accuracy(self, model: nn.Module, cap: int) -> dict[str, Any]:
        """Validation and test accuracy (and their cut shares) at ``cap``."""
        return {**self.validation(model, cap), **self.split_accuracy(model, cap, "test")}

    def __call__(self, model: nn.Module, cap: int) -> dict[str, Any]:
        from ..evaluate.generation import eval_mode
        from ..evaluate.side_effects import chunks_kl

        base = None if hasattr(model, "disable_adapter") else self.base
        with eval_mode(model):
            out = self.accuracy(model, cap)
            for split, chunks in (("val", self.data.val_chunks), ("test", self.data.test_chunks)):
                out[f"{split}_kl"] = chunks_kl(base, model, chunks, progress=False)["kl"]
        return out


def _point(run: RunFolder, arm: ArmSpec, lr: float, seed: int, ctx: ArmContext, measure: Measure, cap: int,
           log: Callable[[str], None]) -> dict[str, Any]:
    """Build ``arm`` fresh, train it at ``lr`` and measure it at every checkpoint (weights saved there)."""
    from ..recipe.rates import save_weights

    model, size = arm.spec.build(arm, ctx)
    stem = f"point_{arm.name}_lr{lr:g}_seed{seed}"
    points: list[dict[str, Any]] = []

    def on_checkpoint(m: nn.Module, step: int) -> None:
        point = {"lr": lr, "step": step, **measure(m, cap)}
        if arm.spec.adapter:
            save_weights(m, run.path / POINTS_DIR / f"{stem}_step{step}.safetensors")
        log(f"[{arm.name} lr {lr:g} seed {seed}] step {step}: validation accuracy {point['val_acc']:.3f}, "
            f"KL {point['val_kl']:.4f}; test accuracy {point['test_acc']:.3f}")
        points.append(point)

    log(f"[{arm.name} lr {lr:g} seed {seed}] training {size['trainable_params']:,} parameters")
    arm.spec.train(model, arm, ctx, lr, on_checkpoint)
    last = max(p["step"] for p in points) if points else 0
    for p in points:
        p["fraction"] = p["step"] / last if last else 1.0
    return {"arm": arm.name, "lr": lr, "seed": seed, "size": size, "points": points}


def _base(run: RunFolder, seed: int, model: nn.Module, measure: Measure, cfg: TrainConfig, log) -> dict[str, Any]:
    from ..recipe.caps import uncut_measure

    def fn() -> dict[str, Any]:
        out = uncut_measure(lambda cap: measure.validation(model, cap), cfg.max_new_tokens, cfg.max_new_tokens_limit,
                            cfg.max_cut_share, log, what="the base model on the validation rows")
        test = measure.split_accuracy(model, out["max_new_tokens"], "test")  # the test split once, at the chosen cap
        return {**out, **test, "val_kl": 0.0, "test_kl": 0.0}

    base = run.stage(f"base_seed{seed}", fn, log)
    log(f"[base seed {seed}] validation accuracy {base['val_acc']:.3f}, test {base['test_acc']:.3f} at "
        f"{base['max_new_tokens']} new tokens ({100 * base['val_capped']:.0f} % of validation, "
        f"{100 * base['test_capped']:.0f} % of test answers cut)")
    return base


def _locate(run: RunFolder, locator: str, seed: int, model, tokenizer, style, data: SeedData, cfg: TrainConfig, log):
    """The circuit of ``locator`` on the fit rows of ``seed`` (located once, then read from its file)."""
    from ..circuit import Circuit
    from ..recipe.stages.locate import locate_for_training

    path = run.path / "circuits" / f"{locator}_seed{seed}.json"

    def fn() -> dict[str, Any]:
        circuit = locate_for_training(model, tokenizer, data.fit, style, replace(cfg, locate=locator, seed=seed),
                                      run.path / f"mining_seed{seed}", cfg.circuit_fraction)
        circuit.save(path)
        return {"components": len(circuit.components), "component_fraction": circuit.component_fraction()}

    run.stage(f"locate_{locator}_seed{seed}", fn, log)
    return Circuit.load(path, model)


@dataclass
class GridResult:
    """What :func:`run_grid` measured: ``points[arm][seed]`` (the base point, drift 0, first; then every rate
    x checkpoint), the rates each arm ran (``grids``), whether its best rate is still a grid edge
    (``at_edge``), each arm's size, each seed's base measurement and arm context."""

    points: dict[str, dict[int, list[dict[str, Any]]]]
    grids: dict[str, list[float]]
    at_edge: dict[str, bool]
    sizes: dict[str, dict[str, Any]]
    bases: dict[int, dict[str, Any]]
    contexts: dict[int, ArmContext]


class _Seed:
    """One seed's data, measurement, cap and arm context (its circuits located on first use)."""

    def __init__(self, run: RunFolder, seed: int, model_name: str, tokenizer, style: str, base: nn.Module,
                 data: SeedData, cfg: CompareConfig, log):
        from ..models import load_model

        self.seed, self.data = seed, data
        train_cfg = replace(cfg.train, seed=seed, sft=replace(cfg.train.sft, seed=seed))
        self.measure = Measure(tokenizer, style, data, train_cfg, base)
        self.base = _base(run, seed, base, self.measure, train_cfg, log)
        circuits: dict[str, Any] = {}

        def circuit(locator: str):
            if locator not in circuits:
                circuits[locator] = _locate(run, locator, seed, base, tokenizer, style, data, train_cfg, log)
            return circuits[locator]

        spec = getattr(cfg.train, "load", None)
        cap = self.base["max_new_tokens"]
        self.ctx = ArmContext(model_name, tokenizer, style, data.fit, train_cfg, circuit, cfg.checkpoints,
                              run.path / SCRATCH_DIR / f"seed{seed}",
                              lambda: load_model(model_name, **({"spec": spec} if spec is not None else {})),
                              folder=run.path, validate=lambda m: self.measure.validation(m, cap)["val_acc"],
                              measure=lambda m: self.measure(m, cap))

    def base_point(self) -> dict[str, Any]:
        b = self.base
        return {"lr": None, "step": 0, "fraction": 0.0, "val_acc": b["val_acc"], "test_acc": b["test_acc"],
                "val_kl": 0.0, "test_kl": 0.0}


class PointProgress:
    """The comparison's (arm, rate, seed) points, planned and done: a line before each point it computes, with
    the time left estimated from this process's points so far (a resumed run counts its reused points done)."""

    def __init__(self, planned: int, log: Callable[[str], None]):
        self.planned, self.computed, self.seconds, self.log = planned, 0, 0.0, log
        self.stages: set[str] = set()  # the points done (a widened grid passes its first rates again)

    @property
    def done(self) -> int:
        return len(self.stages)

    def widen(self, points: int) -> None:
        """A grid was widened: ``points`` more points are planned."""
        self.planned += points

    def point(self, run: RunFolder, name: str, label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The point's stage ``name`` of ``run``: reused when done, else ``fn`` run, logged and timed; done after."""

        def timed() -> dict[str, Any]:
            left = ""
            if self.computed:
                each = self.seconds / self.computed
                left = f"; about {each * (self.planned - self.done) / 3600:.1f} h left at {each / 60:.1f} min a point"
            self.log(f"[compare] point {self.done + 1} of {self.planned}: {label}{left}")
            start = time.perf_counter()
            out = fn()
            self.seconds, self.computed = self.seconds + time.perf_counter() - start, self.computed + 1
            return out

        done = run.stage(name, timed, self.log)
        self.stages.add(name)
        return done


def _arm_points(run: RunFolder, arm: ArmSpec, seeds: list[_Seed], rates: list[float],
                progress: PointProgress) -> tuple[dict[int, list[dict[str, Any]]], dict[str, Any]]:
    """Every (rate, seed) of ``arm`` (each a stage: reused when done): ``({seed: [points]}, size facts)``."""
    out: dict[int, list[dict[str, Any]]] = {}
    size: dict[str, Any] = {}
    log = progress.log
    for s in seeds:
        cap = s.base["max_new_tokens"]
        out[s.seed] = []
        for lr in rates:
            done = progress.point(run, f"point_{arm.name}_lr{lr:g}_seed{s.seed}",
                                  f"{arm.name} lr {lr:g} seed {s.seed}",
                                  lambda lr=lr, s=s: _point(run, arm, lr, s.seed, s.ctx, s.measure, cap, log))
            out[s.seed] += done["points"]
            size = done["size"]
    return out, size


def _run_arm(run: RunFolder, arm: ArmSpec, seeds: list[_Seed], rates: list[float], extensions: int,
             progress: PointProgress):
    """``arm`` over its grid, widened while a seed's best point is at the grid's edge; (points, rates, edge, size)."""
    from ..recipe.rates import beyond_edge
    from .verdict import best_at_budget

    rates = list(rates)
    for added in range(extensions + 1):
        by_seed, size = _arm_points(run, arm, seeds, rates, progress)
        best = {best_at_budget(points, math.inf)["lr"] for points in by_seed.values() if points}
        wider = sorted({w for lr in best if (w := beyond_edge(rates, lr)) is not None} - set(rates))
        if not wider or added == extensions:
            return by_seed, sorted(rates), bool(wider), size
        progress.log(f"[{arm.name}] the best rate is the grid's edge on some seed: adding "
                     f"{', '.join(f'{w:g}' for w in wider)}")
        progress.widen(len(wider) * len(seeds))
        rates += wider
    raise AssertionError("unreachable")


def run_grid(run: RunFolder, model_name: str, tokenizer, style: str, datas: dict[int, SeedData],
             cfg: CompareConfig, log: Callable[[str], None] = print) -> GridResult:
    """Run (or resume) every stage of the comparison in the open ``run``; see the module docstring."""
    from ..models import load_model

    spec = getattr(cfg.train, "load", None)
    base = load_model(model_name, **({"spec": spec} if spec is not None else {}))
    seeds = [_Seed(run, seed, model_name, tokenizer, style, base, datas[seed], cfg, log) for seed in cfg.seeds]
    points = {"base": {s.seed: [s.base_point()] for s in seeds}} if any(a.kind == "base" for a in cfg.arms) else {}
    grids, edges, sizes = {}, {}, {}
    trained = [a for a in cfg.arms if a.kind != "base"]
    progress = PointProgress(sum(len(cfg.grid(a)) for a in trained) * len(seeds), log)
    for arm in trained:
        by_seed, grids[arm.name], edges[arm.name], sizes[arm.name] = _run_arm(
            run, arm, seeds, list(cfg.grid(arm)), cfg.train.grid_extensions, progress)
        points[arm.name] = {s.seed: [s.base_point(), *by_seed[s.seed]] for s in seeds}
    return GridResult(points, grids, edges, sizes, {s.seed: s.base for s in seeds}, {s.seed: s.ctx for s in seeds})


__all__ = ["COMPARE_SCHEMA", "CompareConfig", "GridResult", "Measure", "SeedData", "run_grid", "run_settings",
           "seed_data", "text_chunk_pool"]
