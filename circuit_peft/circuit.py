"""A located circuit: the kept components of a model, with the score of every scanned component.

A :class:`Circuit` is what every locating method returns (DCM masks, head ablation scans,
attribution) and what the adapter consumes (:meth:`Circuit.to_config`). It remembers the
fingerprint of the model it was located on, so that it is never applied to another one.

Component counting follows the paper: the components of a model are its query heads, key
heads, value heads and MLP neurons (``"o"`` slices are not counted separately).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

from torch import nn

from . import validation
from .arch import COMPONENT_KINDS, Component, get_arch
from .circuits import io as _io
from .circuits.plot import plot_circuit
from .errors import located

# The kinds that count as "components" when reporting fractions (q + k + v heads + MLP neurons).
COUNTED_KINDS: tuple[str, ...] = ("q", "k", "v", "mlp")


def _as_component(c: Component | tuple | list) -> Component:
    return validation.circuit_component(c, "component")


class Circuit:
    """Kept components of one model plus the scores of all scanned components.

    Args:
        components: the kept components, ``(kind, layer, index)`` tuples or :class:`Component`.
        scores: ``{component: score}`` for every scanned component (higher = more important);
            kept components without a score are allowed.
        fingerprint: ``get_arch(model).fingerprint()`` of the model the circuit was located on.
        method: how it was located (``"dcm"``, ``"ablation"``, ``"attribution"``, ...).
        meta: any JSON-able details (settings, losses, ...).
        source: the file the circuit was read from (named in refusals).

    Raises :class:`~circuit_peft.errors.CircuitPeftError` (:func:`circuit_peft.validation.circuit_parts`)
    for an unknown kind, a layer or index that is not an integer >= 0 or (with a fingerprint) is out of
    range for the model's sizes, or a score that is not a finite number.
    """

    def __init__(
        self,
        components: Iterable[Component | tuple],
        scores: Mapping[Component | tuple, float] | None = None,
        fingerprint: dict[str, Any] | None = None,
        method: str | None = None,
        meta: dict[str, Any] | None = None,
        *,
        source: str | os.PathLike | None = None,
    ):
        kept, checked, fp = validation.circuit_parts(components, scores, fingerprint, str(source) if source else None)
        self.components: list[Component] = sorted(set(kept), key=_sort_key)
        self.scores: dict[Component, float] = checked
        self.fingerprint = fp
        self.source = str(source) if source else None
        self.method = method
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def from_scores(
        cls, model: nn.Module | None, scores: Mapping[Component | tuple, float], method: str | None = None,
        meta: dict[str, Any] | None = None, **top_kwargs: Any,
    ) -> "Circuit":
        """A circuit keeping the top scored components (``top_kwargs``: ``k=``, ``fraction=`` or ``z=``;
        none keeps every scored component). A non-finite score (an overflowed scan) is refused, never ranked."""
        bad = [c for c, v in scores.items() if not math.isfinite(float(v))]
        if bad:
            raise located(method or "locating", f"{len(bad)} of {len(scores)} component scores are not finite "
                             f"(first: {list(bad[:3])}); the scan overflowed or the data gave an empty loss. "
                             "Try float32, check the rows, or lower the learning rate of what produced them")
        fp = get_arch(model).fingerprint() if model is not None else None
        circuit = cls(scores.keys(), scores, fingerprint=fp, method=method, meta=meta)
        return circuit.top(**top_kwargs) if top_kwargs else circuit

    # ----- basic protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.components)

    def __iter__(self):
        return iter(self.components)

    def __contains__(self, component: object) -> bool:
        try:
            return _as_component(component) in set(self.components)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return False

    def __repr__(self) -> str:
        kinds = Counter(c.kind for c in self.components)
        return f"Circuit(method={self.method!r}, kept={dict(kinds)}, scored={len(self.scores)})"

    def kinds(self) -> list[str]:
        """Kinds present among the kept or scored components, in canonical order."""
        present = {c.kind for c in self.components} | {c.kind for c in self.scores}
        return [k for k in COMPONENT_KINDS if k in present]

    def ranked(self, kinds: Iterable[str] | None = None) -> list[tuple[Component, float]]:
        """Scored components, best first (ties broken by position in the model)."""
        wanted = set(kinds) if kinds is not None else None
        items = [(c, s) for c, s in self.scores.items() if wanted is None or c.kind in wanted]
        return sorted(items, key=lambda cs: (-_finite(cs[1]), _sort_key(cs[0])))

    # ----- selection -------------------------------------------------------------------------
    def top(
        self, k: int | None = None, fraction: float | None = None, z: float | None = None,
        kinds: Iterable[str] | None = None,
    ) -> "Circuit":
        """A new circuit keeping the best scored components, pooled over ``kinds`` (default: all).

        Exactly one of ``k``, ``fraction`` or ``z``, by the one keep rule
        (:mod:`circuit_peft.circuits.selection`): the k best, the best share (rounded down, at least 1),
        or those with a z-score >= ``z`` (at least the best one). ``kinds`` restricts the choice to some
        kinds (e.g. ``["q"]``); :meth:`keep` applies a rule to each kind separately.
        """
        from .circuits.selection import Keep, keep_ranked

        rule = Keep(k=k, fraction=fraction, z=z, per_kind=False)
        kept = keep_ranked(self.ranked(kinds), rule)
        meta = dict(self.meta, selection={"k": k, "fraction": fraction, "z": z,
                                          "kinds": sorted(kinds) if kinds is not None else None})
        return Circuit(kept, self.scores, self.fingerprint, self.method, meta)

    def keep(self, keep: Any) -> "Circuit":
        """A new circuit keeping what a :class:`~circuit_peft.circuits.selection.Keep` keeps (a number: that
        fraction of each kind; None: this circuit unchanged)."""
        from .circuits.selection import Keep, keep_ranked

        rule = Keep.of(keep)
        if rule is None:
            return self
        if not rule.per_kind:
            return self.top(k=rule.k, fraction=rule.fraction, z=rule.z)
        kinds = [k for k in COMPONENT_KINDS if any(c.kind == k for c in self.scores)]
        kept = [c for kind in kinds for c in keep_ranked(self.ranked([kind]), rule, f"scored {kind!r} components")]
        return Circuit(kept, self.scores, self.fingerprint, self.method, dict(self.meta, selection=rule.as_dict()))

    def top_each_kind(self, fraction: float) -> "Circuit":
        """A new circuit keeping the best ``fraction`` of each scored kind separately (scores of
        different kinds are on different scales, so pooling them would favour one kind)."""
        out = self.keep(fraction)
        out.meta = dict(self.meta, keep_fraction_per_kind=fraction)
        return out

    # ----- counting --------------------------------------------------------------------------
    @staticmethod
    def position(component: Component) -> tuple[int, int, int]:
        """Where a component stands in the model: (layer, kind in canonical order, index); the circuit's order."""
        return _sort_key(component)

    def require_fingerprint(self, what: str) -> dict[str, Any]:
        """The model's sizes (the fingerprint); a ValueError naming ``what`` needs them when there is none."""
        if self.fingerprint is None:
            raise ValueError(f"{what} needs the model's sizes: build the circuit with a model "
                             "(or set circuit.fingerprint = get_arch(model).fingerprint())")
        return self.fingerprint

    def total_components(self) -> int:
        """q + k + v heads + MLP neurons of the whole model (the paper's denominator)."""
        fp = self.require_fingerprint("total_components")
        return fp["n_layers"] * sum(_io.per_layer_count(fp, k) for k in COUNTED_KINDS)

    def counts(self) -> dict[str, int]:
        """Kept components per kind."""
        c = Counter(x.kind for x in self.components)
        return {k: c[k] for k in COMPONENT_KINDS if c[k]}

    def component_fraction(self) -> float:
        """Kept q/k/v heads + MLP neurons over all of them."""
        kept = sum(1 for c in self.components if c.kind in COUNTED_KINDS)
        return kept / self.total_components()

    def summary(self) -> str:
        """Text summary: kept counts per kind (with share of that kind), per layer, and overall fraction."""
        fp = self.fingerprint
        lines = [f"Circuit ({self.method or 'unknown method'}): {len(self.components)} kept components"
                 + (f", {len(self.scores)} scored" if self.scores else "")]
        if fp is not None:
            lines[0] += f" on a {fp.get('family')} model with {fp['n_layers']} layers"
        counts = self.counts()
        lines.append("per kind:")
        for kind in COMPONENT_KINDS:
            if kind not in counts and not (fp and kind in COUNTED_KINDS):
                continue
            n = counts.get(kind, 0)
            if fp is not None:
                total = fp["n_layers"] * _io.per_layer_count(fp, kind)
                lines.append(f"  {kind:>3}: {n:6d} / {total:<7d} ({100 * n / total:.2f} %)")
            else:
                lines.append(f"  {kind:>3}: {n:6d}")
        lines.append("per layer (" + " ".join(k for k in COMPONENT_KINDS if k in counts) + "):")
        n_layers = fp["n_layers"] if fp else (max((c.layer for c in self.components), default=-1) + 1)
        by_layer = Counter((c.layer, c.kind) for c in self.components)
        empty = []
        for layer in range(n_layers):
            if not any(by_layer[(layer, k)] for k in counts):
                empty.append(layer)
                continue
            row = " ".join(f"{k}={by_layer[(layer, k)]}" for k in COMPONENT_KINDS if k in counts)
            lines.append(f"  layer {layer:3d}: {row}")
        if empty:
            lines.append(f"  no kept components in {len(empty)} layer(s): {_ranges(empty)}")
        if fp is not None:
            frac = self.component_fraction()
            kept = sum(1 for c in self.components if c.kind in COUNTED_KINDS)
            lines.append(f"fraction of all components (q+k+v heads + MLP neurons): "
                         f"{kept} / {self.total_components()} = {100 * frac:.3f} %")
        return "\n".join(lines)

    # ----- model checks ----------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`~circuit_peft.errors.CircuitPeftError` if ``model`` is not the circuit's model
        (:func:`circuit_peft.circuits.io.check_circuit_model`: each differing field named, or no fingerprint)."""
        _io.check_circuit_model(self, model)

    # ----- adapter ---------------------------------------------------------------------------
    def to_config(self, projections: str | dict[str, list[str]] = "all", **kwargs: Any):
        """A :class:`circuit_peft.tuner.CircuitConfig` training exactly the kept components.

        ``projections``: ``"all"`` (every slice of each component), ``"paper"`` (q/k/v rows and
        ``up_proj`` rows) or per-kind lists. Other keyword arguments go to the config
        (``r``, ``lora_alpha``, ``modules_to_save``, ...).
        """
        if not self.components:
            raise ValueError("this circuit keeps no components; an adapter over it would train nothing")
        from .tuner import CircuitConfig  # lazy: the tuner imports peft

        if self.fingerprint is not None:
            kwargs.setdefault("base_model_fingerprint", self.fingerprint)
        return CircuitConfig.from_components(self.components, projections=projections, **kwargs)

    # ----- views: JSON file (circuits/io.py), picture (circuits/plot.py) -----------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (:func:`circuit_peft.circuits.io.circuit_to_dict`)."""
        return _io.circuit_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | os.PathLike | None = None) -> "Circuit":
        """A circuit from :meth:`to_dict`'s JSON, checked field by field (:func:`circuit_peft.validation.circuit_file`);
        ``source``: the file it came from, named in refusals with the field (``c.json: components[2]: ...``)."""
        return cls(**_io.circuit_fields(data, source))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the circuit as JSON atomically (temporary file + rename)."""
        return _io.write_circuit(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "Circuit":
        """Read a circuit saved by :meth:`save`, every field checked (:meth:`from_dict`); with ``model``, check
        it is the circuit's model (:meth:`check_model`: a circuit without a fingerprint is refused there).
        Without a model the indices are checked against the file's own fingerprint, when it has one."""
        circuit = cls.from_dict(_io.read_circuit_json(path), source=Path(path))
        if model is not None:
            circuit.check_model(model)
        return circuit

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write a PNG (:func:`circuit_peft.circuits.plot.plot_circuit`): a layers x heads heatmap per head kind
        present (score if scored, else 1 for kept; kept cells outlined) and the kept-neuron count per layer."""
        return plot_circuit(self, path, title)

def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ", ".join(out)


def _sort_key(c: Component) -> tuple[int, int, int]:
    return (c.layer, COMPONENT_KINDS.index(c.kind), c.index)


def _finite(s: float) -> float:
    """NaN scores rank last."""
    return -math.inf if s != s else s
