"""The run context the stages of :func:`~circuit_peft.recipe.pipeline.train` share: the run folder with its
finished stages, the settings, the model and tokenizer, the prompt style, the three row sets and the log."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..files import atomic_write_json
from ..runs import OpenRun
from .config import TrainConfig

Rows = list[dict[str, Any]]


class RunFolder(OpenRun):
    """:class:`~circuit_peft.runs.OpenRun` plus finished stages (``stages/<name>.json``) for :func:`train`.

    Under ``torchrun`` / ``accelerate launch`` only the main process opens (and locks) the folder and writes
    into it; the others wait for its ``run.json`` and for each stage's file (:mod:`circuit_peft.distributed`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from ..distributed import is_main_process

        super().__init__(*args, **kwargs)
        self.is_main = is_main_process()

    def open(self) -> None:
        if not self.is_main:  # the main process checks, locks and writes the folder; this one reads it
            from ..distributed import wait_for_file

            wait_for_file(self.path / "run.json", lambda p: p.exists() and json.loads(p.read_text())["key"] == self.key)
            wait_for_file(self.path / "stages")
            return
        super().open()
        (self.path / "stages").mkdir(exist_ok=True)

    def close(self) -> None:
        if self.is_main:
            super().close()

    def stage(self, name: str, fn: Callable[[], dict[str, Any]], log: Callable[[str], None],
              every_process: bool = False) -> dict[str, Any]:
        """The stage's saved result, or run ``fn`` and save what it returns (JSON). With several processes, the
        main one runs ``fn`` and saves; the others wait for its file, having run ``fn`` too when
        ``every_process`` (a stage that trains data-parallel; ``fn`` then measures on the main process only)."""
        path = self.path / "stages" / f"{name}.json"
        if path.exists():
            log(f"[{name}] done earlier: reused")
            return json.loads(path.read_text())
        if not self.is_main:
            from ..distributed import wait_for_file

            if every_process:
                fn()
            return json.loads(wait_for_file(path).read_text())
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = time.perf_counter() - t0
        atomic_write_json(path, result)
        return result


@dataclass
class RunContext:
    """What every stage reads: ``run`` (the folder), ``cfg`` (the settings; every arm's cap once the
    ``before`` stage chose it), ``mining_cfg`` (the settings pivots are mined with: the run's own cap),
    ``model`` (the base model, wrapped in place by the circuit adapter once it is fitted) and its
    ``tokenizer``, the prompt ``style``, the rows (``train``: what the circuit trains on, after selection;
    ``val``: held back to choose learning rates, else empty; ``heldout``: the verdict's), the ``log``.
    ``model_name``: a name :func:`~circuit_peft.models.load_model` reads, or None for a model given loaded
    (then ``pristine`` holds an untouched copy of it when controls need a fresh base)."""

    run: RunFolder
    cfg: TrainConfig
    model: nn.Module
    tokenizer: Any
    style: str
    train: Rows
    val: Rows
    heldout: Rows
    log: Callable[[str], None]
    model_name: str | None = None
    pristine: nn.Module | None = None
    mining_cfg: TrainConfig | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.run.path

    def fresh_base(self) -> nn.Module:
        """A base model as the run loaded it, untouched by any adapter (a control trains one)."""
        if self.model_name is not None:
            from ..models import load_model

            return load_model(self.model_name, spec=self.cfg.load)
        if self.pristine is None:
            raise ValueError("a control needs a fresh base model: give train() the model's name, or "
                             "no controls")
        return copy.deepcopy(self.pristine)


__all__ = ["Rows", "RunContext", "RunFolder"]
