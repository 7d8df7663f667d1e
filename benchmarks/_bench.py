"""What the arm benchmarks (``recipes.py``, ``selection.py``) share: the settings key of a saved
(arm, seed) result, mean and standard error over seeds, and the model/prompt set-up with a timed log."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path


def settings_key(args: argparse.Namespace, ignored: tuple[str, ...]) -> str:
    """A short hash of the flags that change a single (arm, seed) result (``ignored`` ones do not)."""
    keep = {k: v for k, v in vars(args).items() if k not in ignored}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample SD / sqrt(n)); NaN error for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


class ArmBench:
    """The shared state of an arm benchmark: work folder keyed by settings, tokenizer, prompt style,
    the generated task (``args.task``, default arithmetic) with its shots, and the base model."""

    def __init__(self, args: argparse.Namespace, key: str):
        from circuit_peft.cca.problems import TASKS
        from circuit_peft.evaluate.prompts import default_prompt_style
        from circuit_peft.models import load_model, load_tokenizer

        self.args, self.key = args, key
        self.work = Path(args.work_dir)
        self.arms_dir = self.work / f"arms-{key}"
        self.arms_dir.mkdir(parents=True, exist_ok=True)
        self.tok = load_tokenizer(args.model)
        self.style = default_prompt_style(self.tok, log=print)
        self.task = TASKS[getattr(args, "task", "arithmetic")]
        self.shots = [dict(s) for s in self.task["shots"]]
        self.base = load_model(args.model)
        self.started = time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f} s] {msg}", flush=True)
