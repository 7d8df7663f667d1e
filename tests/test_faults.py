"""Fault suite, part 1: every numeric flag of every subcommand is range-checked at parse time.

A bad count, length, rate or share must stop the command with exit code 2 and a message naming
the flag, before any file is read or model loaded (the parser runs first)."""

from __future__ import annotations

import argparse

import pytest

from circuit_peft.cli import build_parser

REQUIRED = {  # the least each subcommand needs to parse
    "mine": ["--out", "o"], "amplify": ["--out", "o"], "select": ["--data", "d.jsonl", "--out", "o.jsonl"],
    "locate": ["--data", "d.jsonl", "--out", "o.json"], "eval": ["--tasks", "gsm8k"], "train": ["--out", "o"],
    "demo": [], "export": ["--adapter", "a", "--out", "o", "--merged"],
}
BAD = {"positive int": ["0", "-1"], "non-negative int": ["-1"], "positive float": ["0", "-0.5"],
       "non-negative float": ["-0.1"], "fraction": ["0", "1.5", "-0.2"]}


def _checked_flags():
    """(subcommand, flag, bad value) for every flag whose type is a range-checked type."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, p in sub.choices.items():
        for action in p._actions:
            kind = getattr(action.type, "__name__", None)
            if kind in BAD and action.option_strings:
                cases += [(name, action.option_strings[0], v) for v in BAD[kind]]
    return cases


CASES = _checked_flags()


def test_every_counting_flag_is_checked():
    """Counts and shares of each subcommand carry a checked type (none left as a bare int/float)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = [(name, a.option_strings[0]) for name, p in sub.choices.items() for a in p._actions
            if a.type in (int, float) and a.option_strings and a.dest not in ("seed", "z")]
    assert bare == []
    assert len(CASES) > 60


@pytest.mark.parametrize("command,flag,value", CASES, ids=[f"{c}{f}={v}" for c, f, v in CASES])
def test_bad_number_is_refused_at_parse_time_naming_the_flag(command, flag, value, capsys):
    argv = [command, *REQUIRED.get(command, []), f"{flag}={value}"]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
