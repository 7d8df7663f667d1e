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
validation accuracy on the first seed, then used for every seed (ties: the first rate of the grid, the
rule every saved arm was chosen by; with ``--tie-break loss`` the lower gold-solution loss on the validation
problems, as ``circuit-peft train --lrs`` does; ``--val-loss-at`` measures that loss for saved arms' tied rates). Test accuracy is reported on the
training format (``add``/``sub``: "What is 47 + 38?") and on a held-out format that training never
saw (word problems), with the fraction of generations that hit ``--max-new-tokens``. Side effects:
mean KL on general text, MMLU and TruthfulQA deltas. Each finished (arm, seed) is saved under
``--work-dir`` and reused on a re-run with the same settings. The last line printed is JSON.

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import _bench
from _bench import ArmBench, mean_se

# the short locator tags of arm names and result files -> the registered locators (circuit_peft.locate.registry)
LOCATORS = {"attr": "attribution", "grad": "gradient", "gradc": "gradient_contrast", "dcm": "dcm", "scan": "ablation"}
DCM_SETTINGS = {"lambda_l1": 0.05, "lr": 0.05, "steps": 60, "check_every": 10}  # benchmarks/dcm.py: keeps 1.3 %
SCAN_ROWS = 8  # the scan locator's default probe size: the probe size of benchmarks/locate.py
CCA_DEFAULTS = {"cca_steps": 16, "cca_records": 48}  # results saved before the cca arm keep their keys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="arithmetic", choices=("arithmetic", "multiplication"),
                   help="arithmetic: two-digit + and - (SmolLM2 right ~20 %%); multiplication: digit x two-digit "
                        "(25 %%); held-out format: word problems of the same operation")
    p.add_argument("--data-dir", default="../shared/data", help="mmlu/test, truthfulqa/, text/ (side effects)")
    p.add_argument("--seeds", default="0,1,2", help="training seed and problem draw, comma-separated")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-transfer", type=int, default=50, help="held-out-format test problems (word problems)")
    p.add_argument("--transfer-max-new-tokens", type=int, default=None,
                   help="token cap of the held-out-format answers (default: --max-new-tokens); a larger cap "
                        "checks that a held-out-format gap is not made by answers cut at the cap")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--also-transfer-cap", type=int, default=None,
                   help="also measure the held-out format under this token cap (transfer_capN_acc; an extra "
                        "measurement, so results saved without it keep their key)")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pivotal-weight", type=float, default=5.0)
    p.add_argument("--fractions", default="0.005,0.02", help="circuit sizes (share of each kind)")
    p.add_argument("--locators", default="attr,grad")
    p.add_argument("--arms", default=None,
                   help="comma-separated arm names, groups separated by ';' (run group by group, seed by seed "
                        "inside a group; default: all arms in one group)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout of the LoRA arms (0: PEFT's default, the prompt prefix runs once per batch; the "
                        "results saved before session 18 used 0.1 and are rerun, not reused, under another value)")
    p.add_argument("--circuit-lrs", default="3e-4,1e-3,3e-3", help="learning-rate grid of circuit and LoRA arms")
    p.add_argument("--full-lrs", default="1e-5,3e-5,1e-4", help="learning-rate grid of full fine-tuning")
    p.add_argument("--cca-steps", type=int, default=CCA_DEFAULTS["cca_steps"], help="cca arm: full-batch update steps")
    p.add_argument("--cca-records", type=int, default=CCA_DEFAULTS["cca_records"],
                   help="cca arm: at most this many pivot records (seeded draw)")
    p.add_argument("--scan-rows", type=int, default=SCAN_ROWS,
                   help="scan locator: the exact head-ablation scan reads the first N training problems (8, the "
                        "probe size of benchmarks/locate.py: the scan costs about half a forward per head)")
    p.add_argument("--mmlu-subjects", default="elementary_mathematics,high_school_geography")
    p.add_argument("--mmlu-limit", type=int, default=10)
    p.add_argument("--truthfulqa-limit", type=int, default=30)
    p.add_argument("--kl-chunks", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes: locate the circuits (seeds dealt out) and then train the arms (split by "
                        "expected cost) in this many processes at once, --threads shared among them; then summarise "
                        "what they saved")
    p.add_argument("--work-dir", default="/tmp/recipes_bench")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--plot", default=None, help="PNG: located - layer-matched random per locator and size (mean, SE)")
    p.add_argument("--plot-tradeoff", default=None,
                   help="PNG: test accuracy against KL drift on general text, one point per trained arm (mean, SE)")
    p.add_argument("--locate-only", action="store_true",
                   help="mine and score the circuits of --seeds and --locators (cached), then stop: lets a second "
                        "process prepare later seeds while the first seed's learning-rate grid runs")
    p.add_argument("--tie-break", default="first", choices=("first", "loss"),
                   help="rates of equal validation accuracy: keep the first of the grid (every saved result), or "
                        "the lower gold-solution loss on the validation problems (`circuit-peft train --lrs`)")
    p.add_argument("--val-loss-at", default=None,
                   help="comma-separated rates: no test evaluation; train each --arms arm on the first seed at each "
                        "rate and save its validation accuracy and gold-solution loss (the loss is how `circuit-peft "
                        "train --lrs` breaks a tie in validation accuracy; the saved arms were chosen before it)")
    p.add_argument("--from-saved", action="store_true",
                   help="no model work: summarise the (arm, seed) results already saved under --work-dir")
    p.add_argument("--quick", action="store_true",
                   help="one seed, 64 training / 32 val / 100 test / 50 transfer problems, 2 %% gradient circuit vs "
                        "layer-matched random vs LoRA r=16, one lr")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    if args.quick:
        args.seeds, args.n_train, args.n_val, args.n_test, args.n_transfer = "0", 64, 32, 100, 50
        args.fractions, args.circuit_lrs, args.full_lrs, args.locators = "0.02", "1e-3", "3e-5", "grad"
        args.arms = args.arms or "base,located_grad@0.02,random_layer_grad@0.02,lora16"
        args.mmlu_limit, args.truthfulqa_limit, args.kl_chunks = 15, 30, 4
        args.epochs, args.max_new_tokens = 3.0, 40  # the measured --quick (benchmarks/README.md)
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


def arm_names(fractions: list[float], locators: list[str]) -> list[str]:
    names = ["base"]
    for f in fractions:
        for loc in locators:
            names += [f"located_{loc}@{f:g}", f"random_layer_{loc}@{f:g}"]
    big = max(fractions)
    names += [f"random_anywhere_{locators[0]}@{big:g}", f"located_{locators[0]}@{big:g}_unweighted",
              "lora16", f"lora_matched_{locators[0]}@{big:g}", "full", f"cca_{locators[0]}@{big:g}"]
    return names


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
            circuit = self._locate(locator, seed)
            circuit.save(path)
            self.log(f"located ({locator}, seed {seed}) in {time.perf_counter() - t0:.0f} s")
        self.circuits[(locator, seed)] = circuit
        return circuit

    def _locate(self, locator: str, seed: int):
        from circuit_peft.recipe import SFTSettings, TrainConfig
        from circuit_peft.recipe.stages.locate import locate_for_training

        if locator == "dcm":
            return self._dcm(seed)
        cfg = TrainConfig(locate=LOCATORS[locator], shots=self.shots, max_new_tokens=self.args.max_new_tokens, seed=seed,
                          side_effect_data_dir=self.args.data_dir,
                          sft=SFTSettings(pivotal_weight=self.args.pivotal_weight))
        rows = self.problems(seed)["train"][: self.args.scan_rows if locator == "scan" else None]
        return locate_for_training(self.base, self.tok, rows, self.style, cfg,
                                   self.mining_dir(seed), keep_fraction=None, progress=False)

    def _dcm(self, seed: int):
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
        """The circuit ``arm`` trains: the located one, or its layer-matched / anywhere random draw."""
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

    # ----- models -------------------------------------------------------------------------------
    def trainable(self, arm: ArmSpec, seed: int):
        """A fresh model prepared for ``arm`` and the size facts of what it trains."""
        from peft import get_peft_model

        from circuit_peft.models import load_model
        from circuit_peft.recipe import control_model
        from circuit_peft.tuner import circuit_size

        model = load_model(self.args.model)
        if arm.kind == "full":
            return model, {"trainable_params": sum(p.numel() for p in model.parameters())}
        if arm.kind in ("lora16", "lora_matched"):  # the same LoRA arms as `circuit-peft train --controls lora,lora_matched`
            circuit = None if arm.kind == "lora16" else self.circuit_for(arm.located, seed)
            return control_model("lora" if arm.kind == "lora16" else "lora_matched", model, circuit,
                                 lambda c: c.to_config(projections="paper"), seed, self.args.lora_dropout)
        circuit = self.circuit_for(arm, seed)
        config = circuit.to_config(projections="paper")
        model = get_peft_model(model, config)
        size = circuit_size(config, model)
        return model, {"trainable_params": size["trainable_params"], "components": size["components"],
                       "component_fraction": size["component_fraction"], "counts": circuit.counts(),
                       "layers": sorted({c.layer for c in circuit.components})}

    def train(self, name: str, seed: int, lr: float):
        """A fresh model trained as arm ``name`` says (SFT on the gold solutions, or the CCA update) at ``lr``."""
        from circuit_peft.recipe.sft import SFTSettings, gold_examples, train_sft

        arm = ArmSpec.parse(name)
        if arm.kind == "cca":
            return self.cca_update(arm, seed, lr)
        model, size = self.trainable(arm, seed)
        weight = self.args.pivotal_weight if arm.weighted else 1.0
        settings = SFTSettings(learning_rate=lr, epochs=self.args.epochs, batch_size=self.args.batch_size,
                               pivotal_weight=weight, seed=seed)
        examples = gold_examples(self.tok, self.problems(seed)["train"], self.style, self.shots)
        train_sft(model, self.tok, examples, settings, str(self.work / f"trainer-{os.getpid()}"), style=self.style)
        return model, size

    def cca_update(self, arm: ArmSpec, seed: int, lr: float):
        """The CCA update of ``located_<rest of arm>``'s circuit (the library's one CCA update), the best
        validation step kept."""
        from circuit_peft.cca.fit import CCAUpdateSpec, cca_update
        from circuit_peft.cca.update import UpdateConfig, accuracy_validator
        from circuit_peft.models import load_model

        circuit = self.circuit_for(arm.located, seed)
        validate = accuracy_validator(self.tok, self.problems(seed)["val"], style=self.style, shots=self.shots,
                                      max_new_tokens=self.args.max_new_tokens, batch_size=50)
        records = self.pivot_records(seed, self.args.cca_records)
        update = UpdateConfig(steps=self.args.cca_steps, lr=lr, optimizer="adam", loss="logsigmoid", eval_every=4,
                              patience=2)
        result = cca_update(load_model(self.args.model), records, circuit, CCAUpdateSpec(update, "best_validated"),
                            validate, tokenizer=self.tok, progress=False)
        return result.model, {"trainable_params": result.size["trainable_params"], "counts": circuit.counts(),
                              "cca_best_step": result.best_step, "cca_records": len(records)}

    # ----- arms ---------------------------------------------------------------------------------
    def grid(self, arm: str) -> list[float]:
        text = self.args.full_lrs if arm == "full" else self.args.circuit_lrs
        return [float(x) for x in text.split(",")]

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

    def val_loss(self, model, rows: list[dict]) -> float:
        """Mean gold-solution loss of ``rows`` (nats/token, unweighted): the library's tie-break."""
        from circuit_peft.recipe import SFTSettings, TrainConfig
        from circuit_peft.recipe.examples import gold_solution_batches, gold_solution_loss

        cfg = TrainConfig(shots=self.shots, sft=SFTSettings(pivotal_weight=self.args.pivotal_weight))
        return gold_solution_loss(model, gold_solution_batches(model, self.tok, rows, self.style, cfg))

    def val_fit(self, arm: str, seed: int, lr: float) -> dict[str, Any]:
        """Validation accuracy and :meth:`val_loss` of ``arm`` trained on seed ``seed`` at ``lr`` (saved;
        reused on a re-run)."""
        from circuit_peft.files import atomic_write_json

        path = self.arms_dir / f"valfit-{arm}-seed{seed}-lr{lr:g}.json"
        if path.exists():
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        model, _ = self.train(arm, seed, lr)
        val = self.problems(seed)["val"]
        out = {"arm": arm, "seed": seed, "lr": lr, "val_acc": self.accuracy(model, val).accuracy,
               "val_loss": self.val_loss(model, val)}
        out["seconds"] = time.perf_counter() - t0
        atomic_write_json(path, out)
        self.log(f"{arm} seed {seed} lr {lr:g}: val acc {out['val_acc']:.3f}, val loss {out['val_loss']:.4f}")
        return out

    def chosen_lr(self, arm: str, first_seed: int) -> float | None:
        saved = self.load_arm(arm, first_seed)
        return None if saved is None else saved.get("lr")

    def run_arm(self, arm: str, seed: int, first_seed: int, baseline: dict[str, Any]) -> dict[str, Any]:
        saved = self.load_arm(arm, seed)
        if saved is not None:
            return saved
        t0 = time.perf_counter()
        probs = self.problems(seed)
        if arm == "base":
            model, size, lr, val_by_lr, loss_by_lr = self.base, {"trainable_params": 0}, None, {}, {}
        elif seed == first_seed:
            model, size, lr, val_by_lr, loss_by_lr = self.pick_lr(arm, seed, probs["val"])
        else:
            lr = self.chosen_lr(arm, first_seed)
            model, size = self.train(arm, seed, lr)
            val_by_lr, loss_by_lr = {}, {}
        result = {"arm": arm, "seed": seed, "lr": lr, "val_by_lr": val_by_lr, **size}
        if loss_by_lr:
            result["val_loss_by_lr"] = loss_by_lr
        if val_by_lr:  # the chosen learning rate's validation accuracy was measured while choosing it
            result["val_acc"] = val_by_lr[str(lr)]
        splits = ("val", "test", "transfer") if arm == "base" else ("test", "transfer")
        for split in splits:
            acc = self.accuracy(model, probs[split], self.args.transfer_max_new_tokens if split == "transfer" else None)
            result[f"{split}_acc"], result[f"{split}_capped"] = acc.accuracy, acc.capped_fraction
        if self.args.also_transfer_cap:
            cap = self.args.also_transfer_cap
            acc = self.accuracy(model, probs["transfer"], cap)
            result[f"transfer_cap{cap}_acc"], result[f"transfer_cap{cap}_capped"] = acc.accuracy, acc.capped_fraction
        if arm != "base":
            result.update(self.effects(model, arm, baseline))
        result["seconds"] = time.perf_counter() - t0
        self.save_arm(arm, seed, result)
        self.log(f"{arm} seed {seed}: test {result['test_acc']:.3f} (capped {result['test_capped']:.2f}), "
                 f"transfer {result['transfer_acc']:.3f}, KL {result.get('kl', 0):.4f}, lr {lr} "
                 f"({result['seconds']:.0f} s)")
        return result

    def pick_lr(self, arm: str, seed: int, val: list[dict]):
        """Train ``arm`` at each rate of its grid; keep the best validation accuracy (ties: the first rate of
        the grid, or with ``--tie-break loss`` the lower :meth:`val_loss`, as ``circuit-peft train --lrs``)."""
        from circuit_peft.recipe.rates import choose_rate

        best = None
        seen, accuracy, loss = [], {}, {}
        for lr in self.grid(arm):
            model, size = self.train(arm, seed, lr)
            seen.append(lr)
            accuracy[lr] = self.accuracy(model, val).accuracy
            if self.args.tie_break == "loss":
                loss[lr] = self.val_loss(model, val)
            if choose_rate(seen, accuracy, loss) == lr:  # kept only if it beats every rate trained so far
                best = (model, size, lr)
        return (*best, {str(lr): a for lr, a in accuracy.items()}, {str(lr): x for lr, x in loss.items()})

    def effects(self, model, arm: str, baseline: dict[str, Any]) -> dict[str, Any]:
        from circuit_peft.evaluate.side_effects import side_effects

        a = self.args
        se = side_effects(model, self.tok, a.data_dir, base=self.base if arm == "full" else None,
                          mmlu_subjects=self.subjects, mmlu_limit=a.mmlu_limit, truthfulqa_limit=a.truthfulqa_limit,
                          kl_chunks=a.kl_chunks, baseline=baseline, progress=False)
        return {"mmlu_delta": se["mmlu_delta"], "truthfulqa_delta": se["truthfulqa_delta"], "kl": se["kl"]}

    def baseline(self) -> dict[str, Any]:
        from circuit_peft.evaluate.data import load_mmlu, load_truthfulqa
        from circuit_peft.evaluate.side_effects import mmlu_accuracy, truthfulqa_mc1

        path = self.work / f"baseline-{self.locating_key}.json"
        if path.exists():
            return json.loads(path.read_text())
        a = self.args
        mmlu = mmlu_accuracy(self.base, self.tok, load_mmlu(a.data_dir, self.subjects), 5, "letter", a.mmlu_limit, 8,
                             False)["accuracy"]
        tqa = truthfulqa_mc1(self.base, self.tok, load_truthfulqa(a.data_dir, a.truthfulqa_limit), 8, False)["accuracy"]
        from circuit_peft.files import atomic_write_json

        out = {"mmlu_base": mmlu, "truthfulqa_base": tqa}
        atomic_write_json(path, out)
        return out


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
                gap = _paired_gap(results, f"located_{loc}@{f:g}", f"random_layer_{loc}@{f:g}", f"{split}_acc")
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
        out["located_minus"] = _gaps_to_every_arm(results, main)
    return out


def _gaps_to_every_arm(results, main: str) -> dict[str, dict[str, Any]]:
    """Paired ``main`` - other arm accuracy (test and held-out format) over the seeds both ran."""
    out = {}
    for other in results:
        if other in (main, "base"):
            continue
        seeds = sorted({r["seed"] for r in results[main]} & {r["seed"] for r in results[other]})
        if seeds:
            gaps = {split: _paired_gap(results, main, other, f"{split}_acc") for split in ("test", "transfer")}
            out[other] = {"seeds": seeds, **{f"{k}_gap": v[0] for k, v in gaps.items()},
                          **{f"{k}_gap_se": v[1] for k, v in gaps.items()}}
    return out


def _paired_gap(results, a: str, b: str, key: str) -> tuple[float, float] | None:
    ra = {r["seed"]: r[key] for r in results.get(a, [])}
    rb = {r["seed"]: r[key] for r in results.get(b, [])}
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    return mean_se([ra[s] - rb[s] for s in seeds])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if argv and argv[0] == "--table-from":  # render a saved result as markdown, no model work
        saved = json.loads(Path(argv[1]).read_text())
        print(markdown_table(saved))
        return saved
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from circuit_peft.evaluate.data import load_mmlu, load_text, load_truthfulqa
    from circuit_peft.files import atomic_write_text

    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    locators = [x for x in args.locators.split(",") if x]
    bad = [x for x in locators if x not in LOCATORS]
    if bad:
        raise SystemExit(f"--locators: unknown {bad}; choose from {', '.join(LOCATORS)}")
    all_arms = arm_names(fractions, locators)
    groups = [all_arms] if args.arms is None else [[a for a in g.split(",") if a] for g in args.arms.split(";")]
    arms = [a for g in groups for a in g]
    unknown = [a for a in arms if a not in all_arms]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {all_arms}")
    if args.from_saved:
        return summarise_saved(args, groups, seeds, fractions, locators)
    subjects = tuple(s for s in args.mmlu_subjects.split(",") if s)
    load_mmlu(args.data_dir, subjects), load_truthfulqa(args.data_dir, 1), load_text(args.data_dir)  # fail early
    bench = Bench(args)
    bench.subjects, bench.fractions, bench.locators = subjects, fractions, locators
    if args.locate_only:
        for seed in seeds:
            for locator in locators:
                bench.scored_circuit(locator, seed)
        return {"located": [[loc, seed] for seed in seeds for loc in locators]}
    if args.val_loss_at:
        return tie_break(bench, arms, seeds[0], [float(x) for x in args.val_loss_at.split(",")])
    if args.jobs > 1:
        return run_in_jobs(bench, args, arms, seeds, fractions, locators)
    baseline = bench.baseline()
    results: dict[str, list[dict[str, Any]]] = {}
    for group in groups:  # group by group; inside a group seed by seed, so a stopped run has whole pairs
        for seed in seeds:
            for arm in group:
                results.setdefault(arm, []).append(bench.run_arm(arm, seed, seeds[0], baseline))
            if args.out:
                partial = {"partial": True, "settings": vars(args), **summarise(results, fractions, locators)}
                atomic_write_text(args.out, json.dumps(partial, default=float) + "\n")
    summary = summarise(results, fractions, locators)
    res = {"model": args.model, "settings": vars(args), "baseline": baseline, **summary,
           "seconds": time.perf_counter() - bench.started}
    print_table(summary)
    return _finish(res, args)


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
    skip = {"help", "jobs", "arms", "threads", "out", "plot", "plot_tradeoff", "quick", "from_saved", "locate_only",
            "val_loss_at", *overrides}
    out = []
    for action in build_parser()._actions:
        if action.dest in skip or not action.option_strings:
            continue
        value = getattr(args, action.dest)
        if isinstance(action, argparse._StoreTrueAction):
            out += [action.option_strings[0]] if value else []
        elif value is not None:
            out += [action.option_strings[0], str(value)]
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


def run_in_jobs(bench: Bench, args: argparse.Namespace, arms: list[str], seeds: list[int], fractions, locators):
    """``args.jobs`` worker processes sharing ``--work-dir`` (``--threads`` split among them): they locate
    the seeds' circuits (seeds dealt out in turn), then, after the baseline here, train ``arms`` (split by
    expected cost); the summary is of what they saved."""
    threads = str(max(1, args.threads // args.jobs))
    seed_groups = [seeds[i :: args.jobs] for i in range(min(args.jobs, len(seeds)))]
    run_workers(bench, args, [{"seeds": ",".join(map(str, g)), "locate_only": "", "threads": threads}
                              for g in seed_groups], "locate")
    bench.baseline()
    run_workers(bench, args, [{"arms": ",".join(g), "threads": threads} for g in split_arms(arms, args.jobs)], "job")
    return summarise_saved(args, [arms], seeds, fractions, locators, seconds=time.perf_counter() - bench.started)


def tie_break(bench: Bench, arms: list[str], seed: int, lrs: list[float]) -> dict[str, Any]:
    """Per arm, the validation accuracy and loss at each rate, and the rate `circuit-peft train --lrs` would
    keep (best accuracy, ties: the lower loss); the final line is JSON."""
    from circuit_peft.recipe.rates import choose_rate

    res: dict[str, Any] = {"seed": seed, "arms": {}}
    for arm in arms:
        fits = [bench.val_fit(arm, seed, lr) for lr in lrs]
        chosen = choose_rate(lrs, {f["lr"]: f["val_acc"] for f in fits}, {f["lr"]: f["val_loss"] for f in fits})
        res["arms"][arm] = {"by_lr": {f"{f['lr']:g}": {k: f[k] for k in ("val_acc", "val_loss")} for f in fits},
                            "chosen_lr": chosen}
    print(json.dumps(res))
    return res


def summarise_saved(args: argparse.Namespace, groups, seeds, fractions, locators,
                    seconds: float | None = None) -> dict[str, Any]:
    """The summary of every saved (arm, seed) result of these settings (arms/seeds not run are left out);
    ``seconds``: the wall time of the run that saved them, when there was one."""
    arms_dir = Path(args.work_dir) / f"arms-{settings_key(args)}"
    results: dict[str, list[dict[str, Any]]] = {}
    for arm in [a for g in groups for a in g]:
        for seed in seeds:
            path = arms_dir / f"{arm}-seed{seed}.json"
            if path.exists():
                results.setdefault(arm, []).append(json.loads(path.read_text()))
    baseline_file = Path(args.work_dir) / f"baseline-{settings_key(args, locating=True)}.json"
    res = {"model": args.model, "settings": vars(args), "from_saved": seconds is None,
           "baseline": json.loads(baseline_file.read_text()) if baseline_file.exists() else None,
           **summarise(results, fractions, locators)}
    if seconds is not None:
        res["seconds"] = seconds
    print(markdown_table(res))
    return _finish(res, args)


def _finish(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
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
        es = [_finite(summary.get(f"{prefix}{t}{suffix}_se")) for t in tags]
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
        ax.errorbar(st["kl"], st["test_acc"], xerr=_finite(st.get("kl_se")), yerr=_finite(st.get("test_acc_se")),
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


def _finite(x: float | None) -> float:
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


if __name__ == "__main__":
    main(sys.argv[1:])
