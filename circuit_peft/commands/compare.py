"""``circuit-peft compare``: every arm over learning rates, checkpoints and seeds on your rows; test accuracy at
drift budgets, paired t over seeds with Holm-adjusted p-values, frontier.png, and the chosen arm's adapter.

Runs :func:`circuit_peft.compare.compare` (see docs/compare.md). Re-running the same command after a stop
skips the finished stages; arms, rates, seeds, budgets and comparisons may be added to a finished folder; a
folder made with other data or another recipe is refused.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from ._args import add_cap_args, add_model_args, distinct_list, fraction, load_spec, non_negative, positive
from .train import check_rows, add_data_args, load_examples
from ..recipe.config import LOCATORS, TrainConfig

DEFAULT_ARMS = "base,located,twin,lora,lora_matched"


def parse_lrs(text: str) -> dict[str, tuple[float, ...]]:
    """``--lrs``: ``1e-4,3e-4,1e-3`` (every trained arm but full), ``ARM=1e-4,3e-4;ARM=...`` per arm name or
    kind, or both (``3e-4,1e-3;full=1e-5,3e-5``: the part without a name is the shared grid)."""
    rates = distinct_list(float, lambda v: v > 0, " > 0")
    out = {}
    for part in (x for x in text.split(";") if x.strip()):
        name, eq, values = part.rpartition("=")
        key = name.strip() if eq else "*"
        if (eq and not key) or key in out:
            raise argparse.ArgumentTypeError(f"expected [rate,rate;]ARM=rate,rate;ARM=... (each once), got {text!r}")
        out[key] = tuple(rates(values))
    if not out:
        raise argparse.ArgumentTypeError(f"expected learning rates, got {text!r}")
    return out


def budget_list(text: str) -> list[str]:
    """``--budgets``: comma-separated numbers >= 0 (nats per token), ``ARM`` or ``ARM/N`` (N > 0)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    for item in items:
        number = item.rpartition("/")[2] if "/" in item else item
        if (("/" in item or _is_number(item)) and not (_is_number(number) and float(number) >= 0)) \
                or ("/" in item and float(number) == 0):
            raise argparse.ArgumentTypeError(f"expected numbers >= 0, ARM or ARM/N (N > 0), got {item!r}")
    if not items:
        raise argparse.ArgumentTypeError("expected at least one budget")
    return items


def parse_comparisons(text: str) -> tuple[tuple[str, str], ...]:
    """``--comparisons``: ``A:B,A:C`` (arm names as in the table, e.g. ``located@gradient:lora``)."""
    pairs = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        a, colon, b = part.partition(":")
        if not colon or not a or not b or a == b:
            raise argparse.ArgumentTypeError(f"expected A:B pairs of two arms, got {part!r}")
        pairs.append((a, b))
    return tuple(pairs)


def config_from_args(args: argparse.Namespace):
    """The :class:`~circuit_peft.compare.CompareConfig` of the flags (arms, rates, budgets checked here)."""
    from ..compare import CompareConfig, default_comparisons, parse_arms
    from ..recipe import SFTSettings
    from ._cca import resolve_shots
    from .train import DATA_KEYWORDS

    from dataclasses import fields

    known = {f.name for f in fields(TrainConfig)}  # loading and answer formats: set where the recipe has them
    extra = {k: v for k, v in (("load", load_spec(args)), ("answer", getattr(args, "answer", None))) if k in known}
    if extra.get("answer") == "none":
        from ..errors import CircuitPeftError

        raise CircuitPeftError("--answer none: compare reads accuracy from generated answers; choose number, choice "
                               "or exact")
    sft = SFTSettings(epochs=args.epochs, batch_size=args.batch_size, pivotal_weight=args.pivotal_weight)
    train = TrainConfig(locate=args.locate, circuit_fraction=args.circuit_fraction, sft=sft,
                        prompt_style=args.prompt_style, max_new_tokens=args.max_new_tokens,
                        max_new_tokens_limit=args.max_new_tokens_limit, max_cut_share=args.max_cut_share,
                        grid_extensions=args.grid_extensions, side_effect_data_dir=args.side_effects_data,
                        shots=resolve_shots(args.shots, args.data if args.data in DATA_KEYWORDS else "file"),
                        kl_chunks=args.kl_chunks, question_field=args.question_field, answer_field=args.answer_field,
                        validation_fraction=args.validation_fraction, **extra)
    arms = parse_arms(args.arms, args.locate, LOCATORS)
    lrs = dict(args.lrs or {})
    shared = lrs.pop("*", None)
    names = {a.name for a in arms} | {a.kind for a in arms}
    unknown = sorted(set(lrs) - names)
    if unknown:
        from ..errors import CircuitPeftError

        raise CircuitPeftError(f"--lrs: {unknown} name no arm of --arms ({', '.join(sorted(names))})")
    if shared:
        lrs = {**{a.name: shared for a in arms if a.kind not in ("base", "full")}, **lrs}
    comparisons = tuple((arm_name(x, arms), arm_name(y, arms)) for x, y in args.comparisons or ())
    budgets = tuple(b if _is_number(b) else "/".join([arm_name(b.partition("/")[0], arms), *b.split("/")[1:]])
                    for b in args.budgets or default_budgets(arms))
    return CompareConfig(train=train, arms=arms, lrs=lrs, checkpoints=args.checkpoints, seeds=tuple(args.seeds),
                         data_seed=args.data_seed,
                         budgets=budgets, alpha=args.alpha, heldout_fraction=args.heldout_fraction,
                         comparisons=comparisons if args.comparisons is not None else tuple(default_comparisons(arms)))


def default_budgets(arms) -> list[str]:
    """``ARM,ARM/10`` for LoRA r=16 when it runs, else for the first trained arm."""
    trained = [a.name for a in arms if a.kind != "base"]
    ref = "lora" if "lora" in trained else (trained[0] if trained else "lora")
    return [ref, f"{ref}/10"]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def arm_name(name: str, arms) -> str:
    """``name`` as the table names it: ``located`` is ``located@gradient`` when one arm has that kind (names
    that match no arm are left for :func:`~circuit_peft.compare.report.check_plan` to refuse)."""
    if name in {a.name for a in arms}:
        return name
    kinds = [a.name for a in arms if a.kind == name]
    return kinds[0] if len(kinds) == 1 else name


def load_compare_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The rows and held-out rows (None without ``--heldout``), drawn with ``--data-seed``, not a training seed:
    reordering ``--seeds`` or adding one in front keeps the rows, so the run folder resumes."""
    rows = load_examples(args.data, args.data_split, args.n_train, args.data_seed, args.data_config)
    check_rows(rows, args, args.data, args.data_split)
    heldout = None
    if args.heldout:
        heldout = load_examples(args.heldout, "test", args.n_heldout, args.data_seed, args.data_config)
        check_rows(heldout, args, args.heldout, "test")
    return rows, heldout


def run(args: argparse.Namespace) -> int:
    import torch

    from ..compare import compare

    from ..compare.report import check_plan

    cfg = config_from_args(args)
    check_plan(cfg)
    rows, heldout = load_compare_rows(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    argv = getattr(args, "argv", None)
    command = "circuit-peft " + " ".join(shlex.quote(a) for a in argv) if argv else None
    print(f"circuit-peft compare: {args.model}, arms {', '.join(a.name for a in cfg.arms)}, seeds "
          f"{', '.join(map(str, cfg.seeds))} -> {args.out}")
    compare(args.model, rows, heldout, args.out, cfg, command=command)
    print(f"compare.json, table.md, frontier.png (and adapter/) are in {args.out}/")
    return 0


def add_parser(subparsers: Any) -> None:
    from ..recipe.caps import MAX_CUT_SHARE, MAX_NEW_TOKENS_LIMIT
    from ..recipe.rates import GRID_EXTENSIONS
    cfg = TrainConfig()
    p = subparsers.add_parser("compare", help="every arm over rates, checkpoints and seeds: accuracy at a drift "
                              "budget, Holm-corrected verdict, frontier.png", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="hub id, local folder, 'smollm2' or 'gemma3-270m'")
    add_model_args(p)
    add_data_args(p)
    a = p.add_argument_group("arms and grid")
    a.add_argument("--arms", default=DEFAULT_ARMS,
                   help=f"comma-separated KIND or KIND@LOCATOR: base, located, twin (layer-matched random twin), lora "
                        f"(r=16), lora_matched, full (default {DEFAULT_ARMS}; locator default --locate)")
    a.add_argument("--locate", choices=LOCATORS, default=cfg.locate, help="the locator of arms named without @")
    a.add_argument("--circuit-fraction", type=fraction, default=cfg.circuit_fraction)
    a.add_argument("--lrs", type=parse_lrs, default=None,
                   help="rates of every trained arm but full ('3e-4,1e-3,3e-3') or per arm name or kind "
                        "('located=3e-4,1e-3;full=1e-5,3e-5'); default: 3e-4,1e-3,3e-3, full 1e-5,3e-5,1e-4")
    a.add_argument("--grid-extensions", type=non_negative(int), default=GRID_EXTENSIONS,
                   help="rates added beyond a grid's edge while an arm's best point sits there "
                        f"(default {GRID_EXTENSIONS})")
    a.add_argument("--checkpoints", type=positive(int), default=3, help="measured points per run (default 3: 1/3, 2/3, 3/3)")
    a.add_argument("--seeds", type=distinct_list(int), default=[0, 1, 2], help="default 0,1,2 (>= 2 for a test)")
    a.add_argument("--data-seed", type=non_negative(int), default=0,
                   help="seed that draws generated rows (--data arithmetic, multiplication); the --seeds may then "
                        "be reordered or grown and the run resumes (default 0)")
    a.add_argument("--validation-fraction", type=fraction, default=cfg.validation_fraction)
    a.add_argument("--epochs", type=positive(float), default=cfg.sft.epochs)
    a.add_argument("--batch-size", type=positive(int), default=cfg.sft.batch_size)
    a.add_argument("--pivotal-weight", type=non_negative(float), default=cfg.sft.pivotal_weight)
    v = p.add_argument_group("verdict")
    v.add_argument("--budgets", type=budget_list, default=None,
                   help="drift budgets: numbers (validation KL, nats/token), ARM (its validation KL at its chosen "
                        "rate, mean over seeds) or ARM/N (default lora,lora/10; without a lora arm, the first "
                        "trained arm's)")
    v.add_argument("--comparisons", type=parse_comparisons, default=None,
                   help="A:B pairs tested at every budget (default: each located arm against its twin, lora and "
                        "lora_matched)")
    v.add_argument("--alpha", type=fraction, default=0.05, help="family-wise error rate of the Holm correction")
    e = p.add_argument_group("evaluation")
    add_cap_args(e, cfg.max_new_tokens, MAX_NEW_TOKENS_LIMIT, MAX_CUT_SHARE)
    e.add_argument("--side-effects-data", default=None,
                   help="folder with text/tinyshakespeare.txt for the KL (default: the shipped side-effect slices)")
    e.add_argument("--kl-chunks", type=positive(int), default=cfg.kl_chunks,
                   help=f"128-token chunks of text per split (validation, test) for the KL (default {cfg.kl_chunks})")
    p.add_argument("--threads", type=positive(int), default=None)
    p.add_argument("--out", required=True, help="run folder (resumable; refused if it holds another run)")
    p.set_defaults(func=_run_with_default_text)


def _run_with_default_text(args: argparse.Namespace) -> int:
    if args.side_effects_data is None:
        from .amplify import package_side_effect_dir

        args.side_effects_data = package_side_effect_dir()[0]
    return run(args)
