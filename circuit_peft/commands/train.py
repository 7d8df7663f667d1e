"""``circuit-peft train``: examples -> (selected) -> located circuit -> trained adapter -> evaluated.

Runs :func:`circuit_peft.recipe.train` (see it for the run folder's files). Re-running the same
command after a stop skips the finished stages; a folder made with other settings is refused.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from ._args import (
    add_cap_args, add_model_args, add_side_effect_sizes, distinct_list, fraction, known_names, load_spec, non_negative, positive,
)
from ..evaluate.answers import ANSWER_CHECKERS
from ..files import read_rows
from ._cca import resolve_shots
from ..recipe.controls import CONTROLS
from ..recipe.config import LOCATORS, SELECTORS, UPDATES, TrainConfig
from ..recipe.stages.fit import KEPT_STEPS
from ..recipe.rates import seeded_split

DATA_KEYWORDS = ("arithmetic", "multiplication")  # generated tasks (circuit_peft.cca.problems.TASKS)


def load_examples(source: str, split: str, n: int | None, seed: int, config: str | None = None) -> list[dict[str, Any]]:
    """Rows from a .jsonl/.json/.csv file, a generated task (``arithmetic``, ``multiplication``) or a hub
    dataset (``name``, ``split``)."""
    from pathlib import Path

    if source in DATA_KEYWORDS:
        from ..cca.problems import TASKS, make_problems

        return make_problems(n or 64, "test" if split != "train" else "train", seed=seed, kinds=TASKS[source]["kinds"])
    path = Path(source)
    if path.exists():
        rows = read_rows(source)
    elif "/" in source and not path.suffix:
        import datasets

        rows = [dict(r) for r in datasets.load_dataset(source, config, split=split)]
    else:
        raise FileNotFoundError(f"--data: no file at {source} (give a .jsonl/.json/.csv file, one of {DATA_KEYWORDS} "
                                "or a hub dataset id such as openai/gsm8k)")
    return rows[:n] if n is not None else rows


def check_rows(rows: list[dict[str, Any]], args: argparse.Namespace, source: str, split: str) -> None:
    """Every row in one of the formats ``train`` reads, with a gold the ``--answer`` checker reads; a bad
    row is named ``file:line`` with its field (:func:`~circuit_peft.evaluate.formats.task_rows`)."""
    from ..evaluate.answers import answer_checker
    from ..evaluate.formats import row_places, task_rows

    checker = answer_checker(getattr(args, "answer", "number"), args.answer_field, args.question_field)
    task_rows(rows, checker, args.question_field, args.answer_field, row_places(source, len(rows), split))


def split_examples(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = load_examples(args.data, args.data_split, args.n_train, args.seed, args.data_config)
    check_rows(rows, args, args.data, args.data_split)
    if args.heldout:
        held = load_examples(args.heldout, "test", args.n_heldout, args.seed, args.data_config)
        check_rows(held, args, args.heldout, "test")
    else:
        k = int(len(rows) * args.heldout_fraction)
        if k < 1 or k >= len(rows):
            raise ValueError(f"--heldout-fraction {args.heldout_fraction} of {len(rows)} rows leaves an empty split")
        rows, held = seeded_split(rows, k, args.seed)
    return rows, held


def config_from_args(args: argparse.Namespace):
    from ..recipe import SFTSettings, TrainConfig

    shots = resolve_shots(args.shots, args.data if args.data in DATA_KEYWORDS else "file")
    sft = SFTSettings(learning_rate=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                      pivotal_weight=args.pivotal_weight, seed=args.seed)
    return TrainConfig(locate=args.locate, circuit_fraction=args.circuit_fraction, select=args.select,
                       select_fraction=args.select_fraction, lora_rank=args.lora_rank, sft=sft,
                       update=args.update, update_steps=args.update_steps,
                       prompt_style=args.prompt_style, shots=shots, max_new_tokens=args.max_new_tokens,
                       side_effect_data_dir=args.side_effects_data, question_field=args.question_field,
                       mmlu_subjects=tuple(x for x in args.mmlu_subjects.split(",") if x) if args.mmlu_subjects else None,
                       mmlu_limit=args.mmlu_limit, truthfulqa_limit=args.truthfulqa_limit, kl_chunks=args.kl_chunks,
                       answer_field=args.answer_field, seed=args.seed, controls=args.controls,
                       learning_rates=tuple(args.lrs), validation_fraction=args.validation_fraction, answer=args.answer,
                       max_new_tokens_limit=args.max_new_tokens_limit, max_cut_share=args.max_cut_share,
                       grid_extensions=args.grid_extensions, cca_kept_step=args.cca_keep,
                       load=load_spec(args))


def run(args: argparse.Namespace) -> int:
    import torch

    from ..distributed import is_main_process
    from ..recipe import train
    from ..recipe.seeds import check_seeds_folder, seed_folder, seeds_table, write_seeds_summary

    seeds = args.seeds or [args.seed]
    runs = []  # every seed's settings and data checked before any model work
    for seed in seeds:
        one = argparse.Namespace(**{**vars(args), "seed": seed})
        runs.append((seed, config_from_args(one), *split_examples(one)))
    if args.seeds:
        check_seeds_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    argv = getattr(args, "argv", None)
    command = "circuit-peft " + " ".join(shlex.quote(a) for a in argv) if argv else None
    reports = {}
    say = print if is_main_process() else (lambda *_: None)  # under a launcher, one process speaks and writes
    for seed, config, train_rows, held in runs:
        out = seed_folder(args.out, seed) if args.seeds else args.out
        say(f"circuit-peft train: {args.model}, {len(train_rows)} training / {len(held)} held-out examples -> {out}")
        reports[seed] = train(args.model, train_rows, held, out, config, command=command).report
        say(f"adapter, circuit.json, circuit.png and report.json are in {out}/")
    if args.seeds and is_main_process():
        print(seeds_table(write_seeds_summary(args.out, reports)))
    return 0


def control_list(text: str) -> tuple[str, ...]:
    """``--controls``: comma-separated names from :data:`~circuit_peft.recipe.controls.CONTROLS`."""
    try:
        return tuple(known_names(text, CONTROLS, allow_empty=True))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The data flags of ``train`` (and ``compare``): where the rows come from, the held-out split, fields,
    shots and prompt style (read by :func:`split_examples`)."""
    d = p.add_argument_group("data")
    d.add_argument("--data", default="arithmetic",
                   help="training examples: .jsonl/.json/.csv file, hub dataset id, or a generated task: 'arithmetic' "
                        "(two-digit + and -) or 'multiplication' (digit x two-digit)")
    d.add_argument("--data-config", default=None, help="hub dataset config (e.g. main for openai/gsm8k)")
    d.add_argument("--data-split", default="train", help="hub dataset split (default train)")
    d.add_argument("--n-train", type=positive(int), default=None, help="use the first N training examples")
    d.add_argument("--heldout", default=None, help="held-out examples (same forms as --data); default: a split of --data")
    d.add_argument("--heldout-fraction", type=fraction, default=0.2)
    d.add_argument("--n-heldout", type=positive(int), default=None)
    d.add_argument("--question-field", default="question")
    d.add_argument("--answer-field", default="answer", help="gold answer of question/answer rows (with --answer number: "
                   "GSM8K '... #### n' or a bare number)")
    d.add_argument("--answer", choices=tuple(ANSWER_CHECKERS), default="number",
                   help="how answers are checked: number (the final number), choice (an option letter; rows may list "
                        "'options'/'choices'), exact (the string, case/space/end punctuation ignored), none (no "
                        "generation: held-out completion loss before/after; refuses --update cca, --locate "
                        "attribution, --lrs, --controls). Rows: question/answer, or TRL's messages or prompt/completion")
    d.add_argument("--shots", default=None, help="worked examples: .jsonl, 'arithmetic', 'multiplication' or 'none' "
                        "(default: the generated task's own, else none)")
    d.add_argument("--prompt-style", choices=("chat", "fewshot"), default=None,
                   help="default: chat when the tokenizer has a chat template, else few-shot")


def add_fit_args(s: argparse._ArgumentGroup, cfg: TrainConfig) -> None:
    """How the circuit is fitted: the update (SFT or CCA, its kept step), the learning rate or grid, the SFT run."""
    s.add_argument("--update", choices=UPDATES, default=cfg.update,
                   help="sft: pivotal-weighted SFT on gold solutions; cca: the CCA update on mined digit pivots")
    s.add_argument("--update-steps", type=positive(int), default=cfg.update_steps, help="steps of the CCA update")
    s.add_argument("--cca-keep", choices=KEPT_STEPS, default=cfg.cca_kept_step,
                   help="--update cca: keep the last step (default), or the best validated step (accuracy on "
                        "--validation-fraction of the training rows, held back from training), as amplify does")
    s.add_argument("--lr", type=positive(float), default=cfg.sft.learning_rate,
                   help=f"learning rate of every arm (default {cfg.sft.learning_rate:g}; --lrs chooses one per arm)")
    s.add_argument("--lrs", type=distinct_list(float, lambda v: v > 0, " > 0"), default=cfg.learning_rates,
                   help="comma-separated learning rates: the circuit and each control train at every rate and keep "
                        "the one with the best accuracy on --validation-fraction of the training rows (held back "
                        "from training; ties: the lower gold-solution loss there); overrides --lr")
    s.add_argument("--validation-fraction", type=fraction, default=cfg.validation_fraction,
                   help=f"share of the training rows held back to choose the rate with --lrs (or the CCA step with "
                        f"--cca-keep best_validated; default {cfg.validation_fraction})")
    s.add_argument("--grid-extensions", type=non_negative(int), default=cfg.grid_extensions,
                   help="with --lrs: while an arm keeps the grid's lowest or highest rate, try up to this many rates "
                        f"beyond it, one grid step further each (default {cfg.grid_extensions}; the report says "
                        "when the edge is still kept)")
    s.add_argument("--epochs", type=positive(float), default=cfg.sft.epochs)
    s.add_argument("--batch-size", type=positive(int), default=cfg.sft.batch_size)
    s.add_argument("--pivotal-weight", type=non_negative(float), default=cfg.sft.pivotal_weight, help="loss weight of the final answer's tokens")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``train`` (and ``demo``); their defaults are :class:`TrainConfig`'s, written once there."""
    cfg = TrainConfig()
    p.add_argument("--model", default="smollm2", help="hub id, local folder, 'smollm2' or 'gemma3-270m'")
    add_model_args(p)
    add_data_args(p)
    s = p.add_argument_group("selection, circuit, training")
    s.add_argument("--select", choices=SELECTORS, default=cfg.select)
    s.add_argument("--select-fraction", type=fraction, default=cfg.select_fraction)
    s.add_argument("--locate", choices=LOCATORS, default=cfg.locate,
                   help="gradient: SFT-loss gradient norm per component; gradient_contrast: that norm divided by "
                        "the general-text gradient's (needs --side-effects-data); attribution: digit pivots + "
                        "logit difference; ablation: exact head-ablation scan of the gold solutions' loss "
                        "(query heads only); ablation_estimate, refined: its estimate, the estimate re-scored "
                        "exactly (circuit-peft locate --help lists every locator)")
    s.add_argument("--circuit-fraction", type=fraction, default=cfg.circuit_fraction,
                   help=f"share of each kind kept (default {cfg.circuit_fraction})")
    s.add_argument("--lora-rank", type=non_negative(int), default=cfg.lora_rank, help="> 0: circuit + LoRA in one adapter")
    s.add_argument("--controls", type=control_list, default=cfg.controls,
                   help=f"comma-separated arms trained after the circuit with the same rows and recipe, reported as "
                        f"located minus control on the held-out rows: {', '.join(CONTROLS)} (may be added to a "
                        "finished run folder)")
    add_fit_args(s, cfg)
    e = p.add_argument_group("evaluation")
    add_cap_args(e, cfg.max_new_tokens, cfg.max_new_tokens_limit, cfg.max_cut_share)
    e.add_argument("--side-effects-data", default=None,
                   help="folder with mmlu/test, truthfulqa/, text/ for side effects (default: skipped)")
    e.add_argument("--mmlu-subjects", default=None,
                   help="comma-separated MMLU subjects (default: the usual six found in the folder)")
    add_side_effect_sizes(e, mmlu_limit=cfg.mmlu_limit, truthfulqa_limit=cfg.truthfulqa_limit, kl_chunks=cfg.kl_chunks)
    p.add_argument("--seed", type=int, default=cfg.seed)
    p.add_argument("--seeds", type=distinct_list(int), default=None,
                   help="comma-separated seeds: one run per seed in OUT/seed<k>/ (the seed draws the held-out split "
                        "or the generated problems, the training order and the random controls), then mean +/- "
                        "standard error over seeds in OUT/seeds.json")
    p.add_argument("--threads", type=positive(int), default=None)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="select -> locate -> train the circuit -> evaluate, one resumable run",
                              description=__doc__.split("\n\n")[0])
    add_train_args(p)
    p.add_argument("--out", required=True, help="run folder (resumable; refused if it holds another run)")
    p.set_defaults(func=run)
