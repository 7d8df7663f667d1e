"""THE locator vocabulary: every way to find a circuit, registered once under one name.

A locator is a function ``(model, tokenizer, task_data, keep, **options) -> Circuit``
(:class:`Locator`): ``task_data`` is what it :attr:`~LocatorSpec.reads` (``"probe"``: rows with a prompt and
a solution, as text, as ``prompt_ids``/``solution_ids`` or as tokenized task rows; ``"records"``: contrastive
records ``{context_ids, desired_id, undesired_id, problem_id}``), ``keep`` what it keeps
(:class:`~circuit_peft.circuits.selection.Keep`, a number = that fraction of each kind, None = every scored
component, or DCM's own ``m >= 0.5``), and ``options`` its own settings (``progress=`` for all).

``circuit-peft locate --method``, ``train --locate``, ``amplify --locate``, CircuitSeer's head finder
(``--head-method``) and the benchmarks all name locators from :data:`LOCATORS`; a new locator is one
function decorated with :func:`register_locator` in its own module under ``locate/``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from torch import nn

from ..errors import CircuitPeftError

READS = ("probe", "records")


class Locator(Protocol):
    """``(model, tokenizer, task_data, keep, **options) -> Circuit`` (module docstring)."""

    def __call__(self, model: nn.Module, tokenizer: Any, task_data: Any, keep: Any, **options: Any) -> Any: ...


@dataclass(frozen=True)
class LocatorSpec:
    """A registered locator: its ``name``, the function, the task data it ``reads`` (``probe``/``records``),
    the kinds it scores by default, whether it can score query heads alone (``heads``: CircuitSeer's head
    finder may use it), whether ``keep`` may be a z-score (``z``), whether ``keep=None`` means its own kept set
    (``own_keep``, DCM's ``m >= 0.5``) rather than every scored component, and a one-line ``summary``."""

    name: str
    fn: Locator
    reads: str
    kinds: tuple[str, ...]
    summary: str
    heads: bool = False
    z: bool = True
    own_keep: bool = False

    def __call__(self, model: nn.Module, tokenizer: Any, task_data: Any, keep: Any = None, **options: Any) -> Any:
        return self.fn(model, tokenizer, task_data, keep, **options)


_REGISTRY: dict[str, LocatorSpec] = {}
BUILTIN_MODULES = ("ablation", "attribution", "dcm", "estimate", "gradient", "refine")


def register_locator(name: str, reads: str, kinds: tuple[str, ...], summary: str, heads: bool = False,
                     z: bool = True, own_keep: bool = False) -> Callable[[Locator], Locator]:
    """Decorator: register ``fn`` as locator ``name`` (refuses a name taken by another function)."""
    if reads not in READS:
        raise ValueError(f"register_locator({name!r}): reads must be one of {READS}, got {reads!r}")

    def add(fn: Locator) -> Locator:
        old = _REGISTRY.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"locator {name!r} is already registered by {old.fn.__module__}.{old.fn.__qualname__}")
        _REGISTRY[name] = LocatorSpec(name, fn, reads, tuple(kinds), summary, heads, z, own_keep)
        return fn

    return add


def _builtins() -> Mapping[str, LocatorSpec]:
    for module in BUILTIN_MODULES:  # each registers its locators when first imported
        importlib.import_module(f"{__package__}.{module}")
    return _REGISTRY


def locator_names(reads: str | None = None, heads: bool | None = None) -> tuple[str, ...]:
    """The registered names (those reading ``reads``, those able to score query heads alone), sorted."""
    return tuple(sorted(n for n, s in _builtins().items()
                        if (reads is None or s.reads == reads) and (heads is None or s.heads == heads)))


def get_locator(name: str, where: str = "locator", among: tuple[str, ...] | None = None) -> LocatorSpec:
    """The locator ``name`` (``where``: the flag or argument named in the refusal), among ``among`` if given."""
    allowed = locator_names() if among is None else among
    if name not in allowed:
        raise CircuitPeftError(f"{where}: unknown locator {name!r}; choose from {', '.join(allowed)}")
    return _builtins()[name]


def run_locator(name: str, model: nn.Module, tokenizer: Any, task_data: Any, keep: Any = None, **options: Any) -> Any:
    """Run locator ``name`` on ``task_data``: the :class:`~circuit_peft.circuit.Circuit` it returns."""
    return get_locator(name)(model, tokenizer, task_data, keep, **options)


class _Names(Mapping[str, LocatorSpec]):
    """:data:`LOCATORS`: a read-only view of the registry, filled on first use."""

    def __getitem__(self, name: str) -> LocatorSpec:
        return _builtins()[name]

    def __iter__(self):
        return iter(locator_names())

    def __len__(self) -> int:
        return len(_builtins())


LOCATORS: Mapping[str, LocatorSpec] = _Names()

__all__ = ["LOCATORS", "Locator", "LocatorSpec", "READS", "get_locator", "locator_names", "register_locator", "run_locator"]
