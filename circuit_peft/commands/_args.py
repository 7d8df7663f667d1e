"""Argument types shared by every subcommand: range checks at parse time, so a bad flag stops the
command before any model is loaded (argparse prints ``argument --flag: must be ...`` and exits 2)."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence


def _checked(kind: type, ok: Callable[[float], bool], rule: str, name: str) -> Callable[[str], float]:
    """``kind(text)`` that must satisfy ``ok`` (argparse prints ``must be <rule>, got <text>``)."""
    def parse(text: str):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    parse.__name__ = f"{name} {kind.__name__}"
    return parse


def positive(kind: type = int) -> Callable[[str], float]:
    """``kind(text)`` that must be > 0 (counts, lengths, learning rates, temperatures)."""
    return _checked(kind, lambda v: v > 0, "> 0", "positive")


def non_negative(kind: type = int) -> Callable[[str], float]:
    """``kind(text)`` that must be >= 0 (shot counts, penalty weights)."""
    return _checked(kind, lambda v: v >= 0, ">= 0", "non-negative")


def at_least_one(kind: type = float) -> Callable[[str], float]:
    """``kind(text)`` that must be >= 1 (multiples, factors)."""
    return _checked(kind, lambda v: v >= 1, ">= 1", "at-least-one")


def fraction(text: str) -> float:
    """A share in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def known_names(text: str, known: Sequence[str], allow_empty: bool = False) -> list[str]:
    """Comma-separated names, each one of ``known`` (``--controls``, ``eval --tasks``); ValueError
    naming the unknown ones, or an empty list unless ``allow_empty``."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in known]
    if unknown or not (names or allow_empty):
        raise ValueError(f"unknown {unknown}; choose from {', '.join(known)}" if unknown
                         else f"name at least one of {', '.join(known)}")
    return names


def distinct_list(kind: type = int, ok: Callable[[float], bool] = lambda v: True,
                  rule: str = "") -> Callable[[str], list]:
    """Comma-separated distinct ``kind`` values, each satisfying ``ok`` (``--seeds``, ``--lrs``)."""
    what = f"distinct comma-separated {'integers' if kind is int else 'numbers'}{rule}"

    def parse(text: str) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not values or len(set(values)) != len(values) or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values
    parse.__name__ = f"list of {kind.__name__}"
    return parse


def add_side_effect_sizes(group: argparse._ArgumentGroup, mmlu_limit: int | None, truthfulqa_limit: int | None,
                          kl_chunks: int = 8) -> None:
    """``--mmlu-limit``, ``--truthfulqa-limit``, ``--kl-chunks``: how much the side-effect measurement reads
    (None: every row)."""
    group.add_argument("--mmlu-limit", type=positive(int), default=mmlu_limit,
                       help=f"MMLU rows per subject (default {mmlu_limit or 'all'})")
    group.add_argument("--truthfulqa-limit", type=positive(int), default=truthfulqa_limit,
                       help=f"TruthfulQA rows (default {truthfulqa_limit or 'all'})")
    group.add_argument("--kl-chunks", type=positive(int), default=kl_chunks,
                       help=f"128-token chunks of text for the KL (default {kl_chunks})")


def device_name(text: str) -> str:
    """``--device``: auto, cuda, cpu or cuda:N (checked at parse time)."""
    from ..models import check_device

    try:
        return check_device(text, "--device")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto, cuda, cpu or cuda:N, got {text}") from None


def add_model_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The flags that say how a command loads its model(s): ``--device``, ``--dtype``, ``--load-in-4bit`` (the one
    place to add a loading flag; :func:`load_spec` turns them into a :class:`~circuit_peft.models.LoadSpec`)."""
    from ..models import DTYPES

    g = p.add_argument_group("model loading") if isinstance(p, argparse.ArgumentParser) else p
    g.add_argument("--device", type=device_name, default="auto",
                   help="auto (default: cuda when present, else cpu), cuda, cuda:N or cpu; under torchrun / "
                        "accelerate launch, cuda is each process's own GPU")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights' dtype: auto (default: bfloat16 on a GPU that supports it, float16 on an older "
                        "GPU, float32 on the CPU), float32, bfloat16 or float16; the trained slices, optimizer "
                        "state and located scores stay float32")
    g.add_argument("--load-in-4bit", action="store_true",
                   help="load the base quantized to 4 bits (bitsandbytes NF4, as QLoRA; computes in --dtype); the "
                        "circuit's slices train in float32 beside it. Needs pip install 'circuit-peft[4bit]'")


def load_spec(args: argparse.Namespace):
    """The :class:`~circuit_peft.models.LoadSpec` of the flags :func:`add_model_args` added."""
    from ..models import LoadSpec

    return LoadSpec(device=args.device, dtype=args.dtype, load_in_4bit=getattr(args, "load_in_4bit", False))


def share(text: str) -> float:
    """A share in [0, 1] (0 allowed: ``--max-cut-share 0`` allows no cut answer)."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_cap_args(group: argparse._ArgumentGroup, max_new_tokens: int, limit: int, max_cut_share: float) -> None:
    """``--max-new-tokens``, ``--max-new-tokens-limit``, ``--max-cut-share``: the evaluation's token cap and how
    far the base model's measurement may raise it (:mod:`circuit_peft.recipe.caps`)."""
    group.add_argument("--max-new-tokens", type=positive(int), default=max_new_tokens,
                       help=f"token cap of every answer (default {max_new_tokens}); raised for the whole run when it "
                            "cuts more than --max-cut-share of the base model's answers")
    group.add_argument("--max-new-tokens-limit", type=positive(int), default=limit,
                       help=f"the base's cap is doubled up to this (default {limit}); beyond it the run stops")
    group.add_argument("--max-cut-share", type=share, default=max_cut_share,
                       help=f"share of the base's answers that may hit the cap (default {max_cut_share:g})")
