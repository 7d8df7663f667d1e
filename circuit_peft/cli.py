"""The ``circuit-peft`` console script: one subcommand per pipeline step.

Each subcommand lives in ``circuit_peft/commands/<name>.py`` and exposes
``add_parser(subparsers)`` (which sets ``func``) ; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
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


def interrupt_main_thread() -> None:
    """Raise KeyboardInterrupt in the main thread, also inside a call blocked in C (``time.sleep``, a lock, a
    read): a real SIGINT sent to that thread wakes the call and Python's handler raises there
    (``_thread.interrupt_main`` only sets a flag that Python reads when the call returns). Where SIGINT is not
    Python's (ignored, or the OS default, which would kill) or no thread can be signalled: ``interrupt_main``."""
    import _thread

    if hasattr(signal, "pthread_kill") and callable(signal.getsignal(signal.SIGINT)):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:
        _thread.interrupt_main()


class _Redelivery:
    """Dropped Ctrl-Cs raised again in the main thread: from the first drop, a daemon thread sends SIGINT
    (:func:`interrupt_main_thread`) every ``delay_s`` until Python's SIGINT handler has run, which it watches.
    One signal could be lost: sent after the main thread let go of the GIL for a blocking call but before the
    call began, it trips Python's flag and the call sleeps on; the next one wakes it. Where the handler cannot
    be watched (SIGINT not Python's, or not opened in the main thread) one interrupt per drop."""

    def __init__(self, delay_s: float):
        self.delay_s, self.dropped, self.thread = delay_s, False, None
        self.handled, self.stopped = threading.Event(), threading.Event()
        self.previous = signal.getsignal(signal.SIGINT)
        self.watching = callable(self.previous) and threading.current_thread() is threading.main_thread()
        if self.watching:
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        self.handled.set()
        return self.previous(signum, frame)

    def drop(self) -> None:
        """A KeyboardInterrupt was dropped (in a finalizer): deliver one again."""
        self.dropped = True
        self.handled.clear()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="circuit-peft-interrupts", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.delay_s):
            if not self.handled.is_set():
                interrupt_main_thread()
                if not self.watching:
                    self.handled.set()

    def close(self) -> None:
        """No more signals sent; Python's SIGINT handler as it was (unless the command replaced it)."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        if self.watching and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self.previous)


@contextmanager
def interrupts_delivered(delay_s: float = 0.05) -> Iterator[None]:
    """Make Ctrl-C stop the command even when it lands in a finalizer. Python raises KeyboardInterrupt in
    whatever code runs when SIGINT arrives; inside a weakref callback or ``__del__`` (run by the garbage
    collector at any moment) it is printed as "Exception ignored" and dropped, and the command ran on to
    exit 0 (docs/reliability.md). Here such a dropped interrupt is raised again in the main thread
    ``delay_s`` later, also inside a blocking call (:class:`_Redelivery`; again, if that one is dropped too),
    and one still pending when the command ends is raised then."""
    previous, redelivery = sys.unraisablehook, _Redelivery(delay_s)

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            return previous(unraisable)
        redelivery.drop()

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        redelivery.close()
    if redelivery.dropped:
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
