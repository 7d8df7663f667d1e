"""``circuit-peft amplify``: mine -> locate -> update -> evaluate in one command (CCA)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._args import add_side_effect_sizes, fraction, load_spec, non_negative, positive
from ..cca.fit import KEPT_STEPS
from ..cca.pipeline import LOCATE_METHODS
from ._cca import (
    add_mining_args, add_problem_args, add_runtime_args, load_problem_rows, load_runtime, mining_config, open_run,
)

PACKAGE_SIDE_EFFECT_DATA = "package"
# --preset paper: the flags it sets (circuit_peft.cca.presets.cca_preset; eval_also and keep_start follow from it)
PAPER_FLAGS: dict[str, Any] = {
    "method": "branching", "pivot": "token", "n_samples": 10, "temperature_if_right": 1.2, "temperature_if_wrong": 0.8,
    "locate": "dcm", "circuit_fraction": None, "dcm_lambda": 0.01, "dcm_epochs": 50, "dcm_steps": None,
    "dcm_lr": 5e-3, "steps": 50, "lr": 1e-4, "optimizer": "sgd", "loss": "logit_diff", "eval_every": 5,
    "patience": None, "projections": "paper",
}


class _PresetAction(argparse.Action):
    """``--preset paper``: every flag of :data:`PAPER_FLAGS` still at its default takes the paper's value
    (a flag given after ``--preset``, or before it with another value, keeps the value given)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        for dest, value in PAPER_FLAGS.items():
            if getattr(namespace, dest, None) == parser.get_default(dest):
                setattr(namespace, dest, value)


def add_update_args(u: argparse._ArgumentGroup) -> None:
    """The CCA update's flags (:class:`~circuit_peft.cca.update.UpdateConfig`, the kept step)."""
    u.add_argument("--preset", choices=("paper",), default=None, action=_PresetAction,
                   help="paper: CCA as its paper runs it (10 samples at T 0.8/1.2, token pivots, DCM masks with "
                        "lambda 0.01 and no cap, SGD 1e-4 on the logit difference for 50 steps, validation after "
                        "steps 2, 4, 6, 8 and every 5th, the best validated step kept, never step 0); other flags "
                        "given override it (docs/cca.md)")
    u.add_argument("--target", choices=("circuit", "all_weights", "twin", "projections"), default="circuit",
                   help="what the update trains: circuit (with mask, default), all_weights (without mask: every "
                        "parameter, the paper's update_using_mask=False; loads in float32 whatever --dtype says, "
                        "refuses --load-in-4bit, writes OUT/model/ instead of OUT/adapter/), twin (the circuit's "
                        "layer-matched random twin), projections (every row of the circuit's projections in every "
                        "layer)")
    u.add_argument("--steps", type=positive(int), default=100, help="update steps (default %(default)s)")
    u.add_argument("--lr", type=positive(float), default=1e-4, help="learning rate (default %(default)s; the paper's is 1e-4)")
    u.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="sgd = full-batch gradient descent (default %(default)s)")
    u.add_argument("--loss", choices=("logit_diff", "logsigmoid", "capped"), default="logit_diff",
                   help="logit_diff (paper, unbounded), logsigmoid or capped (bounded); default %(default)s")
    u.add_argument("--margin-cap", type=positive(float), default=5.0)
    u.add_argument("--eval-every", type=positive(int), default=10, help="validate every N steps (default %(default)s)")
    u.add_argument("--patience", type=positive(int), default=None, help="stop after N validations without improvement")
    u.add_argument("--projections", choices=("paper", "all"), default="paper",
                   help="paper: q/k/v rows + up_proj rows; all: every slice of each component")
    u.add_argument("--no-cache", action="store_true", help="run every record whole through every layer at each step: no lower-layer cache, no shared "
                        "prompt prefix (slower; same result)")
    u.add_argument("--kept-step", choices=KEPT_STEPS, default="best_validated",
                   help="the update step kept: best_validated (the best accuracy on the --n-val problems, default) "
                        "or last (validation only recorded), as train --cca-keep chooses")


def add_amplify_args(p: argparse.ArgumentParser) -> None:
    h = p.add_argument_group("held-out problems")
    h.add_argument("--heldout", default=None,
                   help="validation + test problems: a file (first --n-val rows validate, the next --n-test test), "
                        "'arithmetic' or 'demo' (default: the same kind as --problems; a file needs --heldout)")
    h.add_argument("--n-val", type=positive(int), default=32, help="validation problems (pick the best update step; default %(default)s)")
    h.add_argument("--n-test", type=positive(int), default=64, help="test problems (accuracy before/after; default %(default)s)")
    loc = p.add_argument_group("locate")
    loc.add_argument("--locate", choices=LOCATE_METHODS, default="attribution",
                     help="the locator of contrastive records: attribution of the logit difference (fast, default) "
                          "or DCM masks (the paper's)")
    loc.add_argument("--circuit-fraction", type=fraction, default=0.02,
                     help="share of components kept (attribution: per kind; dcm: a cap); default %(default)s")
    loc.add_argument("--dcm-lambda", type=non_negative(float), default=0.01)
    loc.add_argument("--dcm-epochs", type=positive(int), default=50)
    loc.add_argument("--dcm-steps", type=positive(int), default=None,
                     help="DCM step schedule: exactly N steps, cosine lr from --dcm-lr (default: the paper's epochs)")
    loc.add_argument("--dcm-lr", type=positive(float), default=None,
                     help="DCM Adam lr (default 5e-3, the paper's; ~0.05 with --dcm-steps)")
    add_update_args(p.add_argument_group("update"))
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-max-new-tokens", type=positive(int), default=None, help="default: --max-new-tokens")
    e.add_argument("--side-effect-data", default=PACKAGE_SIDE_EFFECT_DATA,
                   help="folder with mmlu/test/, truthfulqa/, text/ (like ../shared/data); 'package' (default): "
                        "the tiny slices shipped with circuit-peft; 'none': skip side effects")
    e.add_argument("--side-effects", default="mmlu,truthfulqa,kl", help="comma-separated subset of mmlu,truthfulqa,kl")
    e.add_argument("--mmlu-subjects", default=None, help="comma-separated MMLU subjects (default: all in the folder's default set)")
    add_side_effect_sizes(e, mmlu_limit=None, truthfulqa_limit=None)


def package_side_effect_dir() -> tuple[str, tuple[str, ...]]:
    """The shipped side-effect slices and their MMLU subjects."""
    from importlib import resources

    from ..evaluate.data import mmlu_subjects_in

    root = str(resources.files("circuit_peft").joinpath("data/side_effects"))
    return root, tuple(mmlu_subjects_in(root))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "amplify",
        help="CCA in one command: mine pivotal tokens, locate the circuit, update only it, evaluate",
        description="Writes OUT/mining/ (records), OUT/circuit.json + circuit.png (heatmap), OUT/adapter/ "
                    "(PEFT adapter; with --target all_weights OUT/model/, the whole updated model in float32) and "
                    "OUT/report.json (accuracy before/after, component and parameter "
                    "fractions, side effects).",
    )
    add_runtime_args(p)
    add_problem_args(p)
    add_mining_args(p)
    add_amplify_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)
    return p


def build_configs(args: argparse.Namespace):
    from ..cca.pipeline import AmplifyConfig
    from ..cca.update import UpdateConfig

    tasks = tuple(t.strip() for t in args.side_effects.split(",") if t.strip())
    data_dir, subjects = args.side_effect_data, None
    if data_dir == PACKAGE_SIDE_EFFECT_DATA:
        data_dir, subjects = package_side_effect_dir()
    elif data_dir == "none":
        data_dir = None
    if args.mmlu_subjects:
        subjects = tuple(s.strip() for s in args.mmlu_subjects.split(",") if s.strip())
    paper = UpdateConfig.paper() if getattr(args, "preset", None) == "paper" else UpdateConfig()
    update = replace(paper, steps=args.steps, lr=args.lr, optimizer=args.optimizer, loss=args.loss,
                     margin_cap=args.margin_cap, eval_every=args.eval_every, patience=args.patience,
                     projections=args.projections, cache_lower_layers=not args.no_cache,
                     share_prompt_prefix=not args.no_cache, target=getattr(args, "target", "circuit"))
    config = AmplifyConfig(locate=args.locate, circuit_fraction=args.circuit_fraction, dcm_lambda=args.dcm_lambda,
                           dcm_epochs=args.dcm_epochs, dcm_steps=args.dcm_steps, dcm_lr=args.dcm_lr,
                           eval_max_new_tokens=args.eval_max_new_tokens,
                           side_effects=tasks, side_effect_data_dir=data_dir, mmlu_subjects=subjects,
                           mmlu_limit=args.mmlu_limit, truthfulqa_limit=args.truthfulqa_limit, kl_chunks=args.kl_chunks,
                           load=load_spec(args), kept_step=args.kept_step)
    if update.target == "all_weights":  # refuses --load-in-4bit here, before any work
        config = replace(config, load=config.load.for_full_training("--target all_weights", print))
    return update, config


def heldout_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from ..cca.problems import TASKS

    source = args.heldout or (args.problems if args.problems in (*TASKS, "demo") else None)
    if source is None:
        raise ValueError("--problems is a file, so give --heldout FILE with validation and test problems "
                         "(never the training problems)")
    if args.n_val < 1 or args.n_test < 1:
        raise ValueError("--n-val and --n-test must be >= 1")
    if source == "demo":
        return load_problem_rows("demo", args.n_val, "val"), load_problem_rows("demo", args.n_test, "test")
    rows = load_problem_rows(source, args.n_val + args.n_test, "test", args.seed)
    if len(rows) < args.n_val + 1:
        raise ValueError(f"{source} has {len(rows)} held-out rows; need more than --n-val={args.n_val}")
    return rows[: args.n_val], rows[args.n_val : args.n_val + args.n_test]


def print_report(report: dict[str, Any]) -> None:
    se = report.get("side_effects") or {}
    print("\n=== CCA report ===")
    print(f"accuracy before: {report['accuracy_before']:.3f}  after: {report['accuracy_after']:.3f}  "
          f"(+{100 * (report['accuracy_after'] - report['accuracy_before']):.1f} points; "
          f"stderr ~{report['accuracy_after_stderr']:.3f})")
    print(f"changed: {report['components']} of {report['total_components']} components "
          f"({100 * report['component_fraction']:.2f} %), {report['trainable_params']:,} parameters "
          f"({100 * report['param_fraction']:.2f} %)")
    if se:
        parts = []
        if se.get("mmlu_delta") is not None:
            parts.append(f"MMLU {se['mmlu_base']:.3f} -> {se['mmlu']:.3f}")
        if se.get("truthfulqa_delta") is not None:
            parts.append(f"TruthfulQA {se['truthfulqa_base']:.3f} -> {se['truthfulqa']:.3f}")
        if se.get("kl") is not None:
            parts.append(f"KL from base {se['kl']:.5f} nats/token")
        print("side effects: " + "; ".join(parts))
    else:
        print("side effects: skipped")
    files = report["files"]
    saved = f"adapter: {files['adapter']}" if "adapter" in files else f"model: {files['model']}"
    print(f"{saved}  circuit: {files['circuit']}  heatmap: {files['heatmap']}")


def run(args: argparse.Namespace) -> int:
    from ..cca.pipeline import amplify
    from ._cca import problem_checker

    mining = mining_config(args)
    update, config = build_configs(args)
    checker, train = problem_checker(args, load_problem_rows(args.problems, args.n_problems, "train", args.seed))
    val, test = (problem_checker(args, rows)[1] for rows in heldout_rows(args))
    run = open_run(args, problems=train, heldout=val + test)  # refused before the model loads if not ours
    try:
        model, tokenizer = load_runtime(args, config.load)
        report = amplify(model, tokenizer, train, val, test, args.out, mining, update, config,
                         answer_format=checker, progress=not args.no_progress).report
    finally:
        run.close()
    print_report(report)
    print(f"report: {Path(args.out) / 'report.json'}")
    print(json.dumps({k: report[k] for k in ("accuracy_before", "accuracy_after", "component_fraction",
                                              "param_fraction")}))
    return 0
