"""Does the located circuit beat a random one? The controlled comparison of training recipes.

Every arm trains on the same gold solutions of the same problems with the same SFT recipe
(``circuit_peft.recipe.train_sft``: Trainer, AdamW, cosine, ``--epochs``, ``--batch-size``) and is
measured the same way; only what is trained (and, where named, the loss weights) differs:

* ``located_<locator>@<f>``: the circuit located on the training problems, keeping the top ``f`` of
  each kind (q/k/v heads, MLP neurons): ``attr`` = logit-difference attribution on first-wrong-digit
  pivots (CCA stage 2), ``grad`` = norm of the SFT-loss gradient on the component's slices, ``gradc`` =
  that norm divided by the same norm of the LM-loss gradient on general text (what the task moves
  more than everything else), ``dcm`` = the DCM mask learned on the same pivots (60 Adam steps at 0.05
  with cosine decay, L1 weight 0.05: the schedule that prunes in ``benchmarks/dcm.py``; masks clamp at
  1, so equal masks are ordered by a seeded random draw: DCM cannot tell them apart), ``scan`` = the
  exact head-ablation scan of the gold solutions' loss on the first ``--scan-rows`` training problems
  (``locate="ablation"``: query heads only, so ``f`` is a share of query heads and the circuit trains
  their q rows);
* ``random_layer_<locator>@<f>``: a random circuit with the same kinds and counts in the same layers;
* ``random_anywhere_<locator>@<f>``: the same kinds and counts, random layers;
* ``located_<locator>@<f>_unweighted``: the located circuit without pivotal weights;
* ``lora16``: LoRA r=16, alpha 32, dropout ``--lora-dropout`` (0, PEFT's default; 0.1 before session 18), all linear
  layers, the same pivotal weights;
* ``lora_matched_<locator>@<f>``: LoRA with the rank whose trainable parameters come closest to
  ``located_<locator>@<f>``'s (first locator, largest size);
* ``full``: full fine-tuning with the same pivotal weights;
* ``cca_<locator>@<f>``: the CCA update instead of SFT: the located circuit trained on (at most
  ``--cca-records``) first-wrong-digit pivot records of the base model (Adam, bounded log-sigmoid
  loss, ``--cca-steps`` full-batch steps, the step kept by validation accuracy).

Choices are made on validation only: each arm's learning rate is picked from its grid by
validation accuracy on the first seed, then used for every seed. The grid is the library's
(``circuit_peft.recipe.rates.fit_on_grid``: every rate trained from the same initial weights, one resumable
stage of a run folder ``grid-<arm>-seed<seed>/`` per rate, removed once the arm is saved); only its tie rule
is the benchmark's by default: ties go to the first rate of the grid, the rule every saved arm was chosen by;
with ``--tie-break loss`` to the lower gold-solution loss on the validation problems, the library's rule
(``circuit-peft train --lrs``); ``--val-loss-at`` measures that loss for saved arms' tied rates. Test accuracy
is reported on the training format (``add``/``sub``: "What is 47 + 38?") and on a held-out format that training
never saw (word problems), with the fraction of generations that hit ``--max-new-tokens``. Side effects:
mean KL on general text, MMLU and TruthfulQA deltas. Each finished (arm, seed) is saved under
``--work-dir`` (``arms-<settings key>/<arm>-seed<seed>.json``) and reused on a re-run with the same settings; the
summary, tables and plots are ``recipes_report.py``'s. The last line printed is JSON.

The defaults are the settings of the SmolLM2 results in ``benchmarks/README.md`` (64 training, 32 validation,
100 test, 50 held-out-format problems, 4 epochs, 32 new tokens, the grids {3e-4, 1e-3, 3e-3} and {1e-5, 3e-5,
1e-4}). Every arm at seeds 0-2 was run in sessions 16-17 (two segments, ~3.9 h of two-worker time on a loaded
box); since session 18 (the CCA update runs the records' shared prompt prefix once, LoRA arms train at dropout 0 so
the trainer shares it too) the per-arm times sum to 17,088 worker-seconds: about 2.6 hours with ``--jobs 2``
including locating (projected from per-arm times; benchmarks/README.md).

    python benchmarks/recipes.py --quick                     # 4 arms, one seed: 12 min on 2 idle cores
    python benchmarks/recipes.py --quick --jobs 2            # the same in two worker processes: 10 min
    python benchmarks/recipes.py --out benchmarks/results/recipes_smollm2.json   # every arm, seeds 0-2
    python benchmarks/recipes.py --table-from benchmarks/results/recipes_smollm2.json   # markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import _bench
from _bench import ArmBench
from recipes_report import markdown_table, plot_gaps, plot_tradeoff, print_table, summarise

# the short locator tags of arm names and result files -> the registered locators (circuit_peft.locate.registry)
LOCATORS = {"attr": "attribution", "grad": "gradient", "gradc": "gradient_contrast", "dcm": "dcm", "scan": "ablation"}
DCM_SETTINGS = {"lambda_l1": 0.05, "lr": 0.05, "steps": 60, "check_every": 10}  # benchmarks/dcm.py: keeps 1.3 %
SCAN_ROWS = 8  # the scan locator's default probe size: the probe size of benchmarks/locate.py
CCA_DEFAULTS = {"cca_steps": 16, "cca_records": 48}  # results saved before the cca arm keep their keys

# ----- the command line: one declarative table (flag, argparse keywords) ---------------------------------------
FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--model", dict(default="smollm2")),
    ("--task", dict(default="arithmetic", choices=("arithmetic", "multiplication"),
                    help="arithmetic: two-digit + and - (SmolLM2 right ~20 %%); multiplication: digit x two-digit "
                         "(25 %%); held-out format: word problems of the same operation")),
    ("--data-dir", dict(default="../shared/data", help="mmlu/test, truthfulqa/, text/ (side effects)")),
    ("--seeds", dict(default="0,1,2", help="training seed and problem draw, comma-separated")),
    ("--n-train", dict(type=int, default=64)),
    ("--n-val", dict(type=int, default=32)),
    ("--n-test", dict(type=int, default=100)),
    ("--n-transfer", dict(type=int, default=50, help="held-out-format test problems (word problems)")),
    ("--transfer-max-new-tokens", dict(type=int, default=None,
                                       help="token cap of the held-out-format answers (default: --max-new-tokens); a "
                                            "larger cap checks that a held-out-format gap is not made by answers cut "
                                            "at the cap")),
    ("--max-new-tokens", dict(type=int, default=32)),
    ("--also-transfer-cap", dict(type=int, default=None,
                                 help="also measure the held-out format under this token cap (transfer_capN_acc; an "
                                      "extra measurement, so results saved without it keep their key)")),
    ("--epochs", dict(type=float, default=4.0)),
    ("--batch-size", dict(type=int, default=8)),
    ("--pivotal-weight", dict(type=float, default=5.0)),
    ("--fractions", dict(default="0.005,0.02", help="circuit sizes (share of each kind)")),
    ("--locators", dict(default="attr,grad")),
    ("--arms", dict(default=None, help="comma-separated arm names, groups separated by ';' (run group by group, seed "
                                       "by seed inside a group; default: all arms in one group)")),
    ("--lora-dropout", dict(type=float, default=0.0,
                            help="dropout of the LoRA arms (0: PEFT's default, the prompt prefix runs once per batch; "
                                 "the results saved before session 18 used 0.1 and are rerun, not reused, under "
                                 "another value)")),
    ("--circuit-lrs", dict(default="3e-4,1e-3,3e-3", help="learning-rate grid of circuit and LoRA arms")),
    ("--full-lrs", dict(default="1e-5,3e-5,1e-4", help="learning-rate grid of full fine-tuning")),
    ("--cca-steps", dict(type=int, default=CCA_DEFAULTS["cca_steps"], help="cca arm: full-batch update steps")),
    ("--cca-records", dict(type=int, default=CCA_DEFAULTS["cca_records"],
                           help="cca arm: at most this many pivot records (seeded draw)")),
    ("--scan-rows", dict(type=int, default=SCAN_ROWS,
                         help="scan locator: the exact head-ablation scan reads the first N training problems (8, the "
                              "probe size of benchmarks/locate.py: the scan costs about half a forward per head)")),
    ("--mmlu-subjects", dict(default="elementary_mathematics,high_school_geography")),
    ("--mmlu-limit", dict(type=int, default=10)),
    ("--truthfulqa-limit", dict(type=int, default=30)),
    ("--kl-chunks", dict(type=int, default=4)),
    ("--threads", dict(type=int, default=2)),
    ("--jobs", dict(type=int, default=1,
                    help="worker processes: locate the circuits (seeds dealt out) and then train the arms (split by "
                         "expected cost) in this many processes at once, --threads shared among them; then "
                         "summarise what they saved")),
    ("--work-dir", dict(default="/tmp/recipes_bench")),
    ("--out", dict(default=None, help="also write the JSON result here")),
    ("--plot", dict(default=None, help="PNG: located - layer-matched random per locator and size (mean, SE)")),
    ("--plot-tradeoff", dict(default=None, help="PNG: test accuracy against KL drift on general text, one point per "
                                                "trained arm (mean, SE)")),
    ("--locate-only", dict(action="store_true",
                           help="mine and score the circuits of --seeds and --locators (cached), then stop: lets a "
                                "second process prepare later seeds while the first seed's learning-rate grid runs")),
    ("--tie-break", dict(default="first", choices=("first", "loss"),
                         help="rates of equal validation accuracy: keep the first of the grid (every saved result), "
                              "or the lower gold-solution loss on the validation problems (`circuit-peft train "
                              "--lrs`)")),
    ("--val-loss-at", dict(default=None,
                           help="comma-separated rates: no test evaluation; train each --arms arm on the first seed "
                                "at each rate and save its validation accuracy and gold-solution loss (the loss is "
                                "how `circuit-peft train --lrs` breaks a tie in validation accuracy; the saved arms "
                                "were chosen before it)")),
    ("--from-saved", dict(action="store_true",
                          help="no model work: summarise the (arm, seed) results already saved under --work-dir")),
    ("--quick", dict(action="store_true",
                     help="one seed, 64 training / 32 val / 100 test / 50 transfer problems, 2 %% gradient circuit vs "
                          "layer-matched random vs LoRA r=16, one lr")),
)
QUICK = {"seeds": "0", "n_train": 64, "n_val": 32, "n_test": 100, "n_transfer": 50, "fractions": "0.02",
         "circuit_lrs": "1e-3", "full_lrs": "3e-5", "locators": "grad", "mmlu_limit": 15, "truthfulqa_limit": 30,
         "kl_chunks": 4, "epochs": 3.0, "max_new_tokens": 40}  # the measured --quick (benchmarks/README.md)
QUICK_ARMS = "base,located_grad@0.02,random_layer_grad@0.02,lora16"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, kwargs in FLAGS:
        p.add_argument(flag, **kwargs)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    if args.quick:
        vars(args).update(QUICK)
        args.arms = args.arms or QUICK_ARMS
    return args


@dataclass(frozen=True)
class ArmSpec:
    """An arm, parsed once from its name (``base``, ``lora16``, ``full``, or ``<kind>_<locator>@<f>`` with
    ``_unweighted`` for the located circuit without pivotal weights): what is trained (``kind``), on which
    circuit (``locator``, ``fraction`` of each kind) and with which loss weights."""

    name: str
    kind: str  # base | located | random_layer | random_anywhere | lora16 | lora_matched | full | cca
    locator: str | None = None
    fraction: float | None = None
    weighted: bool = True

    @classmethod
    def parse(cls, name: str) -> "ArmSpec":
        if "@" not in name:
            if name not in ("base", "lora16", "full"):
                raise SystemExit(f"unknown arm {name!r}")
            return cls(name, name)
        head, frac = name.split("@")
        kind, locator = head.rsplit("_", 1)
        return cls(name, kind, locator, float(frac.removesuffix("_unweighted")), not frac.endswith("_unweighted"))

    @property
    def located(self) -> "ArmSpec":
        """The located circuit this arm's circuit is drawn from (or matched to)."""
        return ArmSpec(f"located_{self.locator}@{self.fraction:g}", "located", self.locator, self.fraction)

    @property
    def control(self) -> str | None:
        """The library's control (:data:`circuit_peft.recipe.controls.CONTROLS`) this arm is, if a LoRA one."""
        return {"lora16": "lora", "lora_matched": "lora_matched"}.get(self.kind)


def arm_names(fractions: list[float], locators: list[str]) -> list[str]:
    names = ["base"]
    for f in fractions:
        for loc in locators:
            names += [f"located_{loc}@{f:g}", f"random_layer_{loc}@{f:g}"]
    big = max(fractions)
    names += [f"random_anywhere_{locators[0]}@{big:g}", f"located_{locators[0]}@{big:g}_unweighted",
              "lora16", f"lora_matched_{locators[0]}@{big:g}", "full", f"cca_{locators[0]}@{big:g}"]
    return names


@dataclass(frozen=True)
class Plan:
    """What one invocation runs: ``seeds`` (the first chooses each arm's rate), circuit ``fractions``,
    ``locators`` (short tags) and the arm ``groups`` (run group by group, seed by seed inside a group)."""

    seeds: list[int]
    fractions: list[float]
    locators: list[str]
    groups: list[list[str]]

    @property
    def arms(self) -> list[str]:
        return [a for g in self.groups for a in g]

    @classmethod
    def of(cls, args: argparse.Namespace) -> "Plan":
        locators = [x for x in args.locators.split(",") if x]
        bad = [x for x in locators if x not in LOCATORS]
        if bad:
            raise SystemExit(f"--locators: unknown {bad}; choose from {', '.join(LOCATORS)}")
        fractions = [float(f) for f in args.fractions.split(",")]
        every = arm_names(fractions, locators)
        groups = [every] if args.arms is None else [[a for a in g.split(",") if a] for g in args.arms.split(";")]
        unknown = [a for g in groups for a in g if a not in every]
        if unknown:
            raise SystemExit(f"--arms: unknown {unknown}; choose from {every}")
        return cls([int(s) for s in args.seeds.split(",")], fractions, locators, groups)


def settings_key(args: argparse.Namespace, locating: bool = False) -> str:
    """What changes a single (arm, seed) result (the list of seeds and arms to run does not); with
    ``locating``, what changes the mined records, the circuits' scores and the base's side effects."""
    ignored = ("threads", "jobs", "work_dir", "out", "arms", "quick", "seeds", "from_saved", "fractions", "locators", "plot",
               "plot_tradeoff", "also_transfer_cap", "locate_only", "val_loss_at",
               "lora_dropout")  # only the LoRA arms depend on it: their saved results carry it (load_arm)
    if args.task == "arithmetic":  # the default task keeps the keys of results saved before --task existed
        ignored += ("task",)
    if args.transfer_max_new_tokens is None or locating:  # keys saved before the flag existed stay valid
        ignored += ("transfer_max_new_tokens",)
    if locating or all(getattr(args, k) == v for k, v in CCA_DEFAULTS.items()):
        ignored += tuple(CCA_DEFAULTS)  # the cca arm's settings train it; they do not change what is located
    if locating or args.tie_break == "first":  # results saved before --tie-break keep their key
        ignored += ("tie_break",)
    if locating or args.scan_rows == SCAN_ROWS:  # the scan's cache name carries its row count; arm results
        ignored += ("scan_rows",)              # saved with the default keep their key
    if locating:  # the learning-rate grids train the arms; they do not change what is mined or located
        ignored += ("circuit_lrs", "full_lrs")
    return _bench.settings_key(args, ignored)


class Bench(ArmBench):
    """The shared state of one benchmark run: model, problems per seed, circuits, saved arms."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(args, settings_key(args))
        self.locating_key = settings_key(args, locating=True)  # records, scores, baseline: shared across caps
        self.circuits: dict[tuple[str, int], Any] = {}
        self.subjects = tuple(s for s in args.mmlu_subjects.split(",") if s)

    # ----- data ---------------------------------------------------------------------------------
    def problems(self, seed: int) -> dict[str, list[dict]]:
        from circuit_peft.cca.problems import make_problems

        a = self.args
        held = make_problems(a.n_val + a.n_test, "test", seed=seed, kinds=self.task["kinds"])
        return {"train": make_problems(a.n_train, "train", seed=seed, kinds=self.task["kinds"]),
                "val": held[: a.n_val], "test": held[a.n_val :],
                "transfer": make_problems(a.n_transfer, "test", seed=seed, kinds=self.task["transfer_kinds"])}

    def accuracy(self, model, rows, max_new_tokens: int | None = None) -> Any:
        from circuit_peft.evaluate.accuracy import evaluate_accuracy

        return evaluate_accuracy(model, self.tok, rows, style=self.style, shots=self.shots,
                                 max_new_tokens=max_new_tokens or self.args.max_new_tokens, batch_size=50,
                                 progress=False)

    def recipe(self):
        """The library's :class:`~circuit_peft.recipe.TrainConfig` of this benchmark's prompts and answer weights."""
        from circuit_peft.recipe import SFTSettings, TrainConfig

        return TrainConfig(shots=self.shots, max_new_tokens=self.args.max_new_tokens,
                           side_effect_data_dir=self.args.data_dir,
                           sft=SFTSettings(pivotal_weight=self.args.pivotal_weight))

    # ----- circuits -----------------------------------------------------------------------------
    def scored_circuit(self, locator: str, seed: int):
        """Every component scored by ``locator`` on seed ``seed``'s training problems (cached)."""
        if (locator, seed) in self.circuits:
            return self.circuits[(locator, seed)]
        from circuit_peft import Circuit

        tag = f"scan{self.args.scan_rows}" if locator == "scan" else locator
        path = self.work / f"scores-{self.locating_key}-{tag}-{seed}.json"
        if path.exists():
            circuit = Circuit.load(path)
        else:
            t0 = time.perf_counter()
            circuit = self.dcm(seed) if locator == "dcm" else self.locate(locator, seed)
            circuit.save(path)
            self.log(f"located ({locator}, seed {seed}) in {time.perf_counter() - t0:.0f} s")
        self.circuits[(locator, seed)] = circuit
        return circuit

    def locate(self, locator: str, seed: int):
        """The registered locator ``LOCATORS[locator]`` run as ``train`` runs it, every component scored."""
        from dataclasses import replace

        from circuit_peft.recipe.stages.locate import locate_for_training

        cfg = replace(self.recipe(), locate=LOCATORS[locator], seed=seed)
        rows = self.problems(seed)["train"][: self.args.scan_rows if locator == "scan" else None]
        return locate_for_training(self.base, self.tok, rows, self.style, cfg,
                                   self.mining_dir(seed), keep_fraction=None, progress=False)

    def dcm(self, seed: int):
        """DCM masks learned on every pivot record the ``attr`` locator mined for ``seed``; scores = final
        mask plus a seeded draw below 1e-6, so masks DCM left equal (e.g. clamped at 1) are ordered at random."""
        import random

        from circuit_peft import Circuit
        from circuit_peft.locate import learn_masks

        masks = learn_masks(self.base, self.mined_records(seed), tokenizer=self.tok, seed=seed, progress=False, **DCM_SETTINGS)
        draw = random.Random(seed)
        scores = {c: m + 1e-6 * draw.random() for c, m in sorted(masks.scores.items())}
        return Circuit(masks.components, scores, masks.fingerprint, "dcm", masks.meta)

    def mining_dir(self, seed: int) -> Path:
        """Where the ``attr`` locator mines seed ``seed``'s pivot records (shared with the cca arm)."""
        return self.work / f"mining-{self.locating_key}-{seed}"

    def circuit_for(self, arm: ArmSpec, seed: int):
        """The circuit ``arm`` trains: the located one, or its layer-matched / anywhere random draw (the library's
        random controls, :func:`circuit_peft.locate.random_circuit`)."""
        from circuit_peft.locate import random_circuit

        located = self.scored_circuit(arm.locator, seed).top_each_kind(arm.fraction)
        if arm.kind in ("random_layer", "random_anywhere"):
            return random_circuit(located, arm.kind.removeprefix("random_"), seed)
        return located

    def mined_records(self, seed: int) -> list[dict]:
        """Every first-wrong-digit pivot record of the base on seed ``seed``'s training problems (mined by
        the ``attr`` locator, reused from its mining folder)."""
        from circuit_peft.cca.mining import RECORDS_FILE, load_records

        self.scored_circuit("attr", seed)
        return list(load_records(self.mining_dir(seed) / RECORDS_FILE))

    def pivot_records(self, seed: int, limit: int) -> list[dict]:
        """At most ``limit`` of :meth:`mined_records` (a seeded draw)."""
        import random

        rows = self.mined_records(seed)
        return random.Random(seed).sample(rows, min(limit, len(rows)))

    # ----- models: built once, trained at a rate ------------------------------------------------
    def build(self, arm: ArmSpec, seed: int):
        """A fresh model prepared for ``arm`` (the library's LoRA controls; a circuit adapter from ``seed``) and
        the size facts of what it trains."""
        from circuit_peft.models import load_model
        from circuit_peft.recipe import control_model
        from circuit_peft.recipe.controls import seeded_peft_model
        from circuit_peft.tuner import circuit_size

        model = load_model(self.args.model)
        if arm.kind == "full":
            return model, {"trainable_params": sum(p.numel() for p in model.parameters())}
        if arm.control:  # the same LoRA arms as `circuit-peft train --controls lora,lora_matched`
            circuit = self.circuit_for(arm.located, seed) if arm.kind == "lora_matched" else None
            return control_model(arm.control, model, circuit, lambda c: c.to_config(projections="paper"), seed,
                                 self.args.lora_dropout)
        circuit = self.circuit_for(arm.located if arm.kind == "cca" else arm, seed)
        config = circuit.to_config(projections="paper")
        model = seeded_peft_model(model, config, seed)
        size = circuit_size(config, model)
        if arm.kind == "cca":
            return model, {"trainable_params": size["trainable_params"], "counts": circuit.counts(),
                           "cca_records": len(self.pivot_records(seed, self.args.cca_records))}
        return model, {"trainable_params": size["trainable_params"], "components": size["components"],
                       "component_fraction": size["component_fraction"], "counts": circuit.counts(),
                       "layers": sorted({c.layer for c in circuit.components})}

    def trainer(self, arm: ArmSpec, seed: int) -> Callable[[Any, float], dict[str, Any] | None]:
        """``train_at(model, lr)``: SFT on the gold solutions (:func:`circuit_peft.recipe.sft.train_sft`), or for a
        ``cca`` arm the library's one CCA update (best validation step kept; returns the step)."""
        from dataclasses import replace

        from circuit_peft.recipe.examples import training_examples
        from circuit_peft.recipe.sft import train_sft

        if arm.kind == "cca":
            return lambda model, lr: self.cca_update(model, seed, lr)
        a = self.args
        settings = replace(self.recipe().sft, epochs=a.epochs, batch_size=a.batch_size, seed=seed,
                           pivotal_weight=a.pivotal_weight if arm.weighted else 1.0)
        examples = training_examples(self.tok, self.problems(seed)["train"], self.style, self.recipe())

        def train_at(model, lr: float) -> None:
            train_sft(model, self.tok, examples, replace(settings, learning_rate=lr),
                      str(self.work / f"trainer-{os.getpid()}"), style=self.style)
        return train_at

    def cca_update(self, model, seed: int, lr: float) -> dict[str, Any]:
        """The CCA update (:func:`circuit_peft.cca.fit.cca_update`) of ``model``'s circuit adapter in place, on the
        seed's pivot records, the best validation step kept."""
        from circuit_peft.cca.fit import CCAUpdateSpec, cca_update
        from circuit_peft.cca.update import UpdateConfig, accuracy_validator

        validate = accuracy_validator(self.tok, self.problems(seed)["val"], style=self.style, shots=self.shots,
                                      max_new_tokens=self.args.max_new_tokens, batch_size=50)
        update = UpdateConfig(steps=self.args.cca_steps, lr=lr, optimizer="adam", loss="logsigmoid", eval_every=4,
                              patience=2)
        result = cca_update(model, self.pivot_records(seed, self.args.cca_records), None,
                            CCAUpdateSpec(update, "best_validated"), validate, tokenizer=self.tok, progress=False)
        return {"cca_best_step": result.best_step}

    # ----- the rate grid: the library's fit_on_grid ---------------------------------------------
    def grid(self, arm: ArmSpec) -> list[float]:
        text = self.args.full_lrs if arm.kind == "full" else self.args.circuit_lrs
        return [float(x) for x in text.split(",")]

    def val_loss(self, rows: list[dict]) -> Callable[[Any], float]:
        """``model -> mean gold-solution loss of rows`` (nats/token, unweighted): the library's tie-break."""
        from circuit_peft.recipe.examples import gold_solution_batches, gold_solution_loss

        batches: list = []

        def loss(model) -> float:
            batches[:] = batches or gold_solution_batches(model, self.tok, rows, self.style, self.recipe())
            return gold_solution_loss(model, batches)
        return loss

    def fit_grid(self, arm: ArmSpec, seed: int, model, rates: list[float], by_loss: bool, folder: str):
        """``model`` trained as ``arm`` at each of ``rates`` from the same start and left at the best validation
        accuracy (ties: the first rate, or with ``by_loss`` the lower gold-solution loss): the library's
        :func:`~circuit_peft.recipe.rates.fit_on_grid`, each rate a resumable stage of the run folder ``folder``."""
        from circuit_peft.recipe import RunFolder, fit_on_grid
        from circuit_peft.recipe.rates import AdapterWeights, FullWeights

        val = self.problems(seed)["val"]
        run = RunFolder(self.arms_dir / folder, {"arm": arm.name, "seed": seed, "settings": self.key}, "--work-dir")
        run.open()
        try:
            return fit_on_grid(run, arm.name, model, self.trainer(arm, seed), lambda m: self.accuracy(m, val).accuracy,
                               rates, self.log, tie_break=self.val_loss(val) if by_loss else None,
                               weights=FullWeights() if arm.kind == "full" else AdapterWeights())
        finally:
            run.close()

    # ----- arms ---------------------------------------------------------------------------------
    def load_arm(self, arm: str, seed: int) -> dict[str, Any] | None:
        """The saved result of ``arm`` on ``seed``; None if there is none, or if it is a LoRA arm trained at
        another ``--lora-dropout`` (results saved before the flag trained at 0.1)."""
        path = self.arms_dir / f"{arm}-seed{seed}.json"
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved is not None and arm.startswith("lora") and saved.get("lora_dropout", 0.1) != self.args.lora_dropout:
            self.log(f"{path.name}: trained at LoRA dropout {saved.get('lora_dropout', 0.1)}, not "
                     f"{self.args.lora_dropout}: run again")
            return None
        return saved

    def save_arm(self, arm: str, seed: int, result: dict[str, Any]) -> None:
        from circuit_peft.files import atomic_write_json

        atomic_write_json(self.arms_dir / f"{arm}-seed{seed}.json", result)
        shutil.rmtree(self.arms_dir / f"grid-{arm}-seed{seed}", ignore_errors=True)  # the grid's weights: done with

    def trained(self, arm: ArmSpec, seed: int, first_seed: int):
        """``arm`` trained on ``seed``, and the head of its result: on the first seed at the best rate of its grid
        (:meth:`fit_grid`), on later seeds at the rate the first seed chose."""
        head = {"arm": arm.name, "seed": seed}
        if arm.kind == "base":
            return self.base, {**head, "lr": None, "val_by_lr": {}, "trainable_params": 0}
        model, facts = self.build(arm, seed)
        if seed != first_seed:
            saved = self.load_arm(arm.name, first_seed)
            lr = None if saved is None else saved.get("lr")
            facts.update(self.trainer(arm, seed)(model, lr) or {})
            return model, {**head, "lr": lr, "val_by_lr": {}, **facts}
        rates = self.grid(arm)
        choice = self.fit_grid(arm, seed, model, rates, self.args.tie_break == "loss", f"grid-{arm.name}-seed{seed}")
        accuracy = {str(lr): choice.validation_accuracy[f"{lr:g}"] for lr in rates}
        out = {**head, "lr": choice.lr, "val_by_lr": accuracy, **facts, **choice.facts.get(f"{choice.lr:g}", {})}
        if choice.validation_loss:
            out["val_loss_by_lr"] = {str(lr): choice.validation_loss[f"{lr:g}"] for lr in rates}
        out["val_acc"] = accuracy[str(choice.lr)]  # measured while choosing the rate
        return model, out

    def measured(self, model, arm: ArmSpec, seed: int, baseline: dict[str, Any]) -> dict[str, Any]:
        """Test and held-out-format accuracy (and the base's validation accuracy), the extra token cap, side effects."""
        probs, out = self.problems(seed), {}
        for split in ("val", "test", "transfer") if arm.kind == "base" else ("test", "transfer"):
            acc = self.accuracy(model, probs[split], self.args.transfer_max_new_tokens if split == "transfer" else None)
            out[f"{split}_acc"], out[f"{split}_capped"] = acc.accuracy, acc.capped_fraction
        if self.args.also_transfer_cap:
            cap = self.args.also_transfer_cap
            acc = self.accuracy(model, probs["transfer"], cap)
            out[f"transfer_cap{cap}_acc"], out[f"transfer_cap{cap}_capped"] = acc.accuracy, acc.capped_fraction
        if arm.kind != "base":
            out.update(self.effects(model, arm, baseline))
        return out

    def run_arm(self, arm: str, seed: int, first_seed: int, baseline: dict[str, Any]) -> dict[str, Any]:
        """The result of ``arm`` on ``seed``: saved earlier, or trained, measured and saved now."""
        saved = self.load_arm(arm, seed)
        if saved is not None:
            return saved
        t0 = time.perf_counter()
        spec = ArmSpec.parse(arm)
        model, result = self.trained(spec, seed, first_seed)
        result.update(self.measured(model, spec, seed, baseline))
        result["seconds"] = time.perf_counter() - t0
        self.save_arm(arm, seed, result)
        self.log(f"{arm} seed {seed}: test {result['test_acc']:.3f} (capped {result['test_capped']:.2f}), "
                 f"transfer {result['transfer_acc']:.3f}, KL {result.get('kl', 0):.4f}, lr {result['lr']} "
                 f"({result['seconds']:.0f} s)")
        return result

    def effects(self, model, arm: ArmSpec, baseline: dict[str, Any]) -> dict[str, Any]:
        from circuit_peft.evaluate.side_effects import side_effects

        a = self.args
        se = side_effects(model, self.tok, a.data_dir, base=self.base if arm.kind == "full" else None,
                          mmlu_subjects=self.subjects, mmlu_limit=a.mmlu_limit, truthfulqa_limit=a.truthfulqa_limit,
                          kl_chunks=a.kl_chunks, baseline=baseline, progress=False)
        return {"mmlu_delta": se["mmlu_delta"], "truthfulqa_delta": se["truthfulqa_delta"], "kl": se["kl"]}

    def baseline(self) -> dict[str, Any]:
        from circuit_peft.evaluate.data import load_mmlu, load_truthfulqa
        from circuit_peft.evaluate.side_effects import mmlu_accuracy, truthfulqa_mc1
        from circuit_peft.files import atomic_write_json

        path = self.work / f"baseline-{self.locating_key}.json"
        if path.exists():
            return json.loads(path.read_text())
        a = self.args
        mmlu = mmlu_accuracy(self.base, self.tok, load_mmlu(a.data_dir, self.subjects), 5, "letter", a.mmlu_limit, 8,
                             False)["accuracy"]
        tqa = truthfulqa_mc1(self.base, self.tok, load_truthfulqa(a.data_dir, a.truthfulqa_limit), 8, False)["accuracy"]
        out = {"mmlu_base": mmlu, "truthfulqa_base": tqa}
        atomic_write_json(path, out)
        return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if argv and argv[0] == "--table-from":  # render a saved result as markdown, no model work
        saved = json.loads(Path(argv[1]).read_text())
        print(markdown_table(saved))
        return saved
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    plan = Plan.of(args)
    if args.from_saved:
        return summarise_saved(args, plan)
    from circuit_peft.evaluate.data import load_mmlu, load_text, load_truthfulqa

    subjects = tuple(s for s in args.mmlu_subjects.split(",") if s)
    load_mmlu(args.data_dir, subjects), load_truthfulqa(args.data_dir, 1), load_text(args.data_dir)  # fail early
    bench = Bench(args)
    if args.locate_only:
        for seed in plan.seeds:
            for locator in plan.locators:
                bench.scored_circuit(locator, seed)
        return {"located": [[loc, seed] for seed in plan.seeds for loc in plan.locators]}
    if args.val_loss_at:
        return tie_break(bench, plan.arms, plan.seeds[0], [float(x) for x in args.val_loss_at.split(",")])
    if args.jobs > 1:
        return run_in_jobs(bench, args, plan)
    return run_groups(bench, args, plan)


def run_groups(bench: Bench, args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Every arm of ``plan`` in this process, group by group and inside a group seed by seed (so a stopped run
    has whole pairs), the partial summary written to ``--out`` after each seed."""
    from circuit_peft.files import atomic_write_text

    baseline = bench.baseline()
    results: dict[str, list[dict[str, Any]]] = {}
    for group in plan.groups:
        for seed in plan.seeds:
            for arm in group:
                results.setdefault(arm, []).append(bench.run_arm(arm, seed, plan.seeds[0], baseline))
            if args.out:
                partial = {"partial": True, "settings": vars(args), **summarise(results, plan.fractions, plan.locators)}
                atomic_write_text(args.out, json.dumps(partial, default=float) + "\n")
    summary = summarise(results, plan.fractions, plan.locators)
    res = {"model": args.model, "settings": vars(args), "baseline": baseline, **summary,
           "seconds": time.perf_counter() - bench.started}
    print_table(summary)
    return finish(res, args)


ARM_COST = {"lora": 1.0, "cca": 1.2, "full": 1.5, "base": 0.15}  # relative time of an arm (session 18, 3 seeds)


def split_arms(arms: list[str], jobs: int) -> list[list[str]]:
    """``arms`` in ``jobs`` groups of about equal expected cost (:data:`ARM_COST`; 1 for a circuit arm),
    each group in the order given."""
    load, groups = [0.0] * jobs, [[] for _ in range(jobs)]
    cost = {a: next((c for k, c in ARM_COST.items() if a.startswith(k)), 1.0) for a in arms}
    for arm in sorted(arms, key=lambda a: -cost[a]):
        j = load.index(min(load))
        groups[j].append(arm)
        load[j] += cost[arm]
    return [[a for a in arms if a in g] for g in groups if g]


def job_argv(args: argparse.Namespace, **overrides: str) -> list[str]:
    """The command-line options of one worker: every setting of ``args`` written out (so ``--quick``'s
    values carry over), no output files, then ``overrides`` (option dest -> value; ``""`` for a flag)."""
    skip = {"jobs", "arms", "threads", "out", "plot", "plot_tradeoff", "quick", "from_saved", "locate_only",
            "val_loss_at", *overrides}
    out = []
    for flag, kwargs in FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if flag[2:].replace("-", "_") in skip:
            continue
        if kwargs.get("action") == "store_true":
            out += [flag] if value else []
        elif value is not None:
            out += [flag, str(value)]
    for dest, value in overrides.items():
        out += ["--" + dest.replace("_", "-")] + ([value] if value != "" else [])
    return out


def run_workers(bench: Bench, args: argparse.Namespace, overrides: list[dict[str, str]], tag: str) -> None:
    """Run this script once per entry of ``overrides`` (:func:`job_argv`), all at once (logs ``<tag><i>.log``
    in the work folder); raise naming the logs of the workers that failed."""
    import subprocess

    procs = []
    for i, changes in enumerate(overrides):
        log = bench.work / f"{tag}{i}.log"
        bench.log(f"{tag} {i}: {changes} (log {log})")
        cmd = [sys.executable, str(Path(__file__).resolve()), *job_argv(args, **changes)]
        procs.append((subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT), log))
    failed = [str(log) for proc, log in procs if proc.wait() != 0]
    if failed:
        raise SystemExit(f"--jobs: worker(s) failed, see {', '.join(failed)}")


def run_in_jobs(bench: Bench, args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """``args.jobs`` worker processes sharing ``--work-dir`` (``--threads`` split among them): they locate
    the seeds' circuits (seeds dealt out in turn), then, after the baseline here, train the arms (split by
    expected cost); the summary is of what they saved."""
    threads = str(max(1, args.threads // args.jobs))
    seeds = plan.seeds
    seed_groups = [seeds[i :: args.jobs] for i in range(min(args.jobs, len(seeds)))]
    run_workers(bench, args, [{"seeds": ",".join(map(str, g)), "locate_only": "", "threads": threads}
                              for g in seed_groups], "locate")
    bench.baseline()
    run_workers(bench, args, [{"arms": ",".join(g), "threads": threads} for g in split_arms(plan.arms, args.jobs)],
                "job")
    return summarise_saved(args, Plan(seeds, plan.fractions, plan.locators, [plan.arms]),
                           seconds=time.perf_counter() - bench.started)


def tie_break(bench: Bench, arms: list[str], seed: int, lrs: list[float]) -> dict[str, Any]:
    """Per arm, the validation accuracy and loss at each rate, and the rate `circuit-peft train --lrs` would
    keep (best accuracy, ties: the lower loss): the library's rate grid with its loss tie-break, each rate a
    resumable stage of ``valfit-<arm>-seed<seed>/`` in the arms folder; the final line is JSON."""
    res: dict[str, Any] = {"seed": seed, "arms": {}}
    for name in arms:
        arm = ArmSpec.parse(name)
        if arm.kind == "base":
            raise SystemExit("--val-loss-at: the base trains nothing; name trained arms in --arms")
        model, _ = bench.build(arm, seed)
        choice = bench.fit_grid(arm, seed, model, lrs, True, f"valfit-{name}-seed{seed}")
        res["arms"][name] = {"by_lr": {k: {"val_acc": acc, "val_loss": choice.validation_loss[k]}
                                       for k, acc in choice.validation_accuracy.items()}, "chosen_lr": choice.lr}
    print(json.dumps(res))
    return res


def summarise_saved(args: argparse.Namespace, plan: Plan, seconds: float | None = None) -> dict[str, Any]:
    """The summary of every saved (arm, seed) result of these settings (arms/seeds not run are left out);
    ``seconds``: the wall time of the run that saved them, when there was one."""
    arms_dir = Path(args.work_dir) / f"arms-{settings_key(args)}"
    results: dict[str, list[dict[str, Any]]] = {}
    for arm in plan.arms:
        for seed in plan.seeds:
            path = arms_dir / f"{arm}-seed{seed}.json"
            if path.exists():
                results.setdefault(arm, []).append(json.loads(path.read_text()))
    baseline_file = Path(args.work_dir) / f"baseline-{settings_key(args, locating=True)}.json"
    res = {"model": args.model, "settings": vars(args), "from_saved": seconds is None,
           "baseline": json.loads(baseline_file.read_text()) if baseline_file.exists() else None,
           **summarise(results, plan.fractions, plan.locators)}
    if seconds is not None:
        res["seconds"] = seconds
    print(markdown_table(res))
    return finish(res, args)


def finish(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Plot (``--plot``), write (``--out``) and print the result as the final JSON line."""
    from circuit_peft.files import atomic_write_text

    if args.plot:
        print(f"plot written to {plot_gaps(res, args.plot)}")
    if args.plot_tradeoff:
        print(f"plot written to {plot_tradeoff(res, args.plot_tradeoff)}")
    line = json.dumps(res, default=float)
    if args.out:
        atomic_write_text(args.out, line + "\n")
    print(line)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
