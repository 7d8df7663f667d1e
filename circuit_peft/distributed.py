"""Several processes on one run (``torchrun`` / ``accelerate launch``): who is the main process, waiting for
what it writes, and ending the process group.

Under a launcher every process runs the same command. The recipe (:func:`circuit_peft.recipe.train`) lets
the ``Trainer`` train data-parallel on every process (it starts the process group itself: DDP, gloo on the
CPU, NCCL on GPUs), while what is measured or written once (locating, evaluation, the adapter, the report,
the run folder's lock) runs on the main process only; the others wait for the file it writes
(:func:`wait_for_file`), so nothing is done twice and no collective waits through a long evaluation.
The ranks are read from the launcher's environment (``RANK``, ``WORLD_SIZE``), so they are known before any
process group exists.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path
from typing import Callable

import torch

from .errors import CircuitPeftError

POLL_SECONDS = 0.5

# the commands that run under torchrun / accelerate launch: the main process writes, the others wait for its
# files (train) or score their own shard (select); every other command refuses several processes
MULTIPROCESS_COMMANDS: tuple[str, ...] = ("train", "select")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: the started process group's, else the launcher's environment
    (``RANK``, ``WORLD_SIZE``), else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes the run's files (rank 0; True without a launcher)."""
    return rank_and_world()[0] == 0


def world_size() -> int:
    """How many processes train together (1 without a launcher)."""
    return rank_and_world()[1]


def refuse_multiprocess(command: str) -> None:
    """Refuse, before any work, to run ``circuit-peft COMMAND`` in several processes (``WORLD_SIZE`` > 1)
    unless it is one of :data:`MULTIPROCESS_COMMANDS`: the others would write the same files on every
    process, or wait on one another for ever (``compare``)."""
    world = world_size()
    if world > 1 and command not in MULTIPROCESS_COMMANDS:
        raise CircuitPeftError(
            f"circuit-peft {command} runs in one process, but WORLD_SIZE is {world} (torchrun / accelerate launch); "
            f"run it without a launcher. Only {', '.join(MULTIPROCESS_COMMANDS)} run under torchrun / accelerate launch")


def wait_for_file(path: str | os.PathLike, ready: Callable[[Path], bool] = Path.exists,
                  poll: float = POLL_SECONDS) -> Path:
    """Block until ``ready(path)`` (default: it exists), polling every ``poll`` seconds. No timeout: the
    launcher stops every process when the main one fails."""
    path = Path(path)
    while not ready(path):
        time.sleep(poll)
    return path


def end_process_group_at_exit() -> None:
    """Once per process: at exit, wait for every process, then destroy the process group the ``Trainer``
    started (a gloo group left to interpreter shutdown can abort a process after its work is done)."""
    global _registered
    if not _registered and world_size() > 1:
        atexit.register(_end)
        _registered = True


_registered = False


def _end() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


__all__ = ["MULTIPROCESS_COMMANDS", "end_process_group_at_exit", "is_main_process", "rank_and_world",
           "refuse_multiprocess", "wait_for_file", "world_size"]
