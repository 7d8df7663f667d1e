"""Argument types shared by every subcommand: range checks at parse time, so a bad flag stops the
command before any model is loaded (argparse prints ``argument --flag: must be ...`` and exits 2)."""

from __future__ import annotations

import argparse
from typing import Callable


def positive(kind: type = int) -> Callable[[str], float]:
    """``kind(text)`` that must be > 0 (counts, lengths, learning rates, temperatures)."""
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative(kind: type = int) -> Callable[[str], float]:
    """``kind(text)`` that must be >= 0 (shot counts, penalty weights)."""
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    parse.__name__ = f"non-negative {kind.__name__}"
    return parse


def at_least_one(kind: type = float) -> Callable[[str], float]:
    """``kind(text)`` that must be >= 1 (multiples, factors)."""
    def parse(text: str):
        value = kind(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
        return value
    parse.__name__ = f"at-least-one {kind.__name__}"
    return parse


def fraction(text: str) -> float:
    """A share in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value
