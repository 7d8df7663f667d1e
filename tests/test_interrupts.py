"""Ctrl-C of a command (cli.interrupts_delivered): a KeyboardInterrupt that Python drops because SIGINT landed in
a finalizer is raised again in the command's own code (docs/reliability.md). The end-to-end SIGINT of
`circuit-peft train` is in tests/test_kill.py."""

import gc
import signal
import sys
import time

import pytest

from circuit_peft.cli import interrupts_delivered


class _InterruptedFinalizer:
    """What a SIGINT landing in a finalizer amounts to: a KeyboardInterrupt raised inside ``__del__``, which
    Python prints as "Exception ignored" and drops."""

    def __del__(self):
        raise KeyboardInterrupt


def _drop_an_interrupt() -> None:
    _InterruptedFinalizer()
    gc.collect()


@pytest.fixture(autouse=True)
def _python_handles_sigint():
    """Python's own SIGINT handler, as in a command started from a terminal. A background job of a
    non-interactive shell (``make test &``, some CI runners) inherits SIGINT ignored, and then
    ``_thread.interrupt_main`` does nothing (docs/reliability.md), which is not what these tests are about."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_dropped_in_a_finalizer_stops_the_command(recwarn):
    _drop_an_interrupt()  # outside: dropped, the code runs on (pytest turns it into a warning)
    ran_on = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with interrupts_delivered():
            _drop_an_interrupt()
            while time.monotonic() - ran_on < 60:  # the command's own work
                time.sleep(0.001)
    assert time.monotonic() - ran_on < 30  # raised again (50 ms later on an idle box), not when the work ended


def test_an_interrupt_dropped_just_before_the_command_ends_is_raised_at_its_end():
    with pytest.raises(KeyboardInterrupt):
        with interrupts_delivered(delay_s=60):
            _drop_an_interrupt()


def test_other_unraisable_exceptions_go_to_the_previous_hook(monkeypatch):
    class Broken:
        def __del__(self):
            raise RuntimeError("in a finalizer")

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    with interrupts_delivered():
        Broken()
        gc.collect()
    assert [type(u.exc_value) for u in seen] == [RuntimeError] and sys.unraisablehook == seen.append


@pytest.mark.parametrize("where", ["in the command", "in a finalizer", "dropped, then a blocking call"])
def test_ctrl_c_of_a_command_exits_130_with_one_line_and_no_traceback(where, monkeypatch, capsys):
    """`circuit-peft info` stopped by a real SIGINT (Python's handler raises KeyboardInterrupt), in its own code or
    in a finalizer that drops it, also when the command then blocks in C for 30 s (time.sleep; a lock, a read: the
    dropped interrupt is raised again by a SIGINT to the main thread, which wakes the call, where
    _thread.interrupt_main only set a flag read when the call returned, 30 s later): exit 130 and one line on stderr saying how to resume, nothing
    on stdout. The end-to-end Ctrl-C of a `circuit-peft train` subprocess is in tests/test_kill.py (slow)."""
    from circuit_peft.cli import main
    from circuit_peft.commands import info

    class _SigintInFinalizer:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the KeyboardInterrupt is raised in __del__ and dropped

    def interrupted(name):
        if where == "in the command":
            signal.raise_signal(signal.SIGINT)
        elif where == "in a finalizer":
            _SigintInFinalizer()
            gc.collect()
        else:
            _drop_an_interrupt()
            time.sleep(30)
        while time.monotonic() - started < 30:  # the command's work (returning to Python often, as torch does)
            time.sleep(0.001)
        return "finished"

    monkeypatch.setattr(info, "describe", interrupted)
    started = time.monotonic()
    assert main(["info", "tiny-llama"]) == 130
    assert time.monotonic() - started < 20
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.splitlines() == ["circuit-peft info: interrupted. Finished stages and records are kept in the output "
                                "folder; run the same command again to resume."]
