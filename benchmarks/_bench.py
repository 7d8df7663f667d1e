"""What the benchmarks share: the settings key of a saved (arm, seed) result, mean and standard error
over seeds, and the model/prompt set-up with a timed log (the arm benchmarks ``recipes.py``,
``selection.py``); the bytes autograd saves for backward (the step benchmarks ``adapter_step.py``,
``pivotal_step.py``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def settings_key(args: argparse.Namespace, ignored: tuple[str, ...]) -> str:
    """A short hash of the flags that change a single (arm, seed) result (``ignored`` ones do not)."""
    keep = {k: v for k, v in vars(args).items() if k not in ignored}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def mean_se(values: list[float]) -> tuple[float, float]:
    """:func:`circuit_peft.stats.mean_se`, with NaN (not None) as the error of one value, as saved results have it."""
    from circuit_peft.stats import mean_se as _mean_se

    mean, se = _mean_se(values)
    return mean, float("nan") if se is None else se


def final_line(result: dict, out: str | None = None) -> dict:
    """Print ``result`` as the benchmark's final JSON line (and write it to ``out`` when given); returns it."""
    line = json.dumps(result)
    if out:
        Path(out).write_text(line + "\n")
    print(line)
    return result


class Stopwatch:
    """Wall and process CPU seconds of a ``with`` block. With one torch thread the CPU time is the work done,
    steady while other jobs share the box (wall time is not: the ratios below use both)."""

    def __enter__(self) -> "Stopwatch":
        _sync_cuda()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        _sync_cuda()  # CUDA kernels run asynchronously: wall time counts their end
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0


def _sync_cuda() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def saved_for_backward(exclude: Iterable[int] = ()) -> Iterator[dict[int, int]]:
    """Count the bytes autograd saves for backward inside the block, each storage once; yields the
    dict storage pointer -> bytes, filled as the block runs. ``exclude``: storage pointers left out
    (e.g. the model's own weights, which are not activations)."""
    import torch

    skip = set(exclude)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


class ArmBench:
    """The shared state of an arm benchmark: work folder keyed by settings, tokenizer, prompt style,
    the generated task (``args.task``, default arithmetic) with its shots, and the base model."""

    def __init__(self, args: argparse.Namespace, key: str):
        from circuit_peft.cca.problems import TASKS
        from circuit_peft.taskdata.prompts import default_prompt_style
        from circuit_peft.models import load_tokenizer

        self.args, self.key = args, key
        self.work = Path(args.work_dir)
        self.arms_dir = self.work / f"arms-{key}"
        self.arms_dir.mkdir(parents=True, exist_ok=True)
        self.tok = load_tokenizer(args.model)
        self.style = default_prompt_style(self.tok, log=print)
        self.task = TASKS[getattr(args, "task", "arithmetic")]
        self.shots = [dict(s) for s in self.task["shots"]]
        self._base = None
        self.started = time.perf_counter()

    @property
    def base(self):
        """The base model, loaded on first use (a summary of saved arms never loads it)."""
        if self._base is None:
            from circuit_peft.models import load_model

            self._base = load_model(self.args.model)
        return self._base

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f} s] {msg}", flush=True)
