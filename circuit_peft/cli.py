"""The ``circuit-peft`` console script: one subcommand per pipeline step.

Each subcommand lives in ``circuit_peft/commands/<name>.py`` and exposes
``add_parser(subparsers)`` (which sets ``func``) ; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

SUBCOMMANDS: tuple[str, ...] = ("info", "locate", "mine", "amplify", "train", "compare", "eval", "select", "export",
                                "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuit-peft",
        description="Find the circuit inside a language model that does a task, and train only that circuit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"circuit_peft.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"circuit_peft.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


@contextmanager
def interrupts_delivered(delay_s: float = 0.05) -> Iterator[None]:
    """Make Ctrl-C stop the command even when it lands in a finalizer. Python raises KeyboardInterrupt in
    whatever code runs when SIGINT arrives; inside a weakref callback or ``__del__`` (run by the garbage
    collector at any moment) it is printed as "Exception ignored" and dropped, and the command ran on to
    exit 0 (docs/reliability.md). Here such a dropped interrupt is raised again in the main thread
    ``delay_s`` later (again, if that one is dropped too), and one still pending when the command ends is
    raised then."""
    import _thread
    import threading

    previous, dropped = sys.unraisablehook, []

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            return previous(unraisable)
        timer = threading.Timer(delay_s, _thread.interrupt_main)
        timer.daemon = True
        dropped.append(timer)
        timer.start()

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        for timer in dropped:
            timer.cancel()
    if dropped:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # a bad flag (argparse has printed which) or --help: return its code
        return int(stop.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the exact command, for run records and cards
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        from .distributed import refuse_multiprocess

        refuse_multiprocess(args.command)  # under a launcher, before any work: only some commands run there
        with interrupts_delivered():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"circuit-peft {args.command}: interrupted. Finished stages and records are kept in the output "
              "folder; run the same command again to resume.", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:
        print(f"circuit-peft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a model folder that does not exist, or a hub id while offline
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = " (offline: HF_HUB_OFFLINE is set and it is not cached)" if os.environ.get("HF_HUB_OFFLINE") else ""
        print(f"circuit-peft {args.command}: error: {first}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
