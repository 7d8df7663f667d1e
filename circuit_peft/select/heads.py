"""Reasoning heads: the query heads whose ablation hurts math solutions most (CircuitSeer stage 1).

A :class:`ReasoningHeads` is a sorted list of ``(layer, head)`` query heads plus the base-model
fingerprint it was made for. Build one from

* an explicit list: ``ReasoningHeads.from_list([(3, 1), (7, 4)], model)``,
* any :class:`circuit_peft.circuit.Circuit` (or object with ``.scores`` {Component: float}):
  ``ReasoningHeads.from_circuit(circuit, fraction=0.05)``,
* a fresh scan: :func:`find_reasoning_heads` (head ablation scan by default, or attribution).

Reasoning heads are a view of a query-head :class:`Circuit` (:meth:`ReasoningHeads.to_circuit`) and
are saved in the circuit file format (files of the old heads format still load); loading checks the
model fingerprint so a heads file made for another model is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from ..arch import fingerprint_diff, get_arch
from ..circuit import Circuit
from ..circuits.selection import Keep, keep_ranked
from ..errors import located

logger = logging.getLogger(__name__)

HEADS_FORMAT = "circuit-peft/reasoning-heads"  # the old file format (read, no longer written)
REASONING_HEADS_METHOD = "reasoning_heads"
DEFAULT_HEAD_FRACTION = 0.05
_QUERY_HEAD_NAMES = ("q", "o")  # a query head is named "q" (its weights) or "o" (its output) by locate scans


@dataclass
class ReasoningHeads:
    """Query heads ``[(layer, head), ...]`` (sorted, unique) for one base model.

    ``scores``: optional {(layer, head): importance} (e.g. loss increase under ablation);
    ``model_fingerprint``: :meth:`ModelArch.fingerprint` of the model they belong to.
    """

    heads: list[tuple[int, int]]
    model_fingerprint: dict[str, Any] | None = None
    scores: dict[tuple[int, int], float] = field(default_factory=dict)
    source: str = "list"

    def __post_init__(self) -> None:
        self.heads = sorted({(int(l), int(h)) for l, h in self.heads})
        if not self.heads:
            raise ValueError("no reasoning heads given: pass at least one (layer, head)")

    # ----- construction -----------------------------------------------------------------------
    @classmethod
    def from_list(cls, heads: Iterable[tuple[int, int]], model: nn.Module | None = None) -> "ReasoningHeads":
        """Wrap an explicit list; with ``model``, every head is validated and the fingerprint recorded."""
        out = cls(list(heads), source="list")
        if model is not None:
            out.check_model(model, record=True)
        return out

    @classmethod
    def from_circuit(
        cls,
        circuit: Any,
        fraction: float | None = DEFAULT_HEAD_FRACTION,
        k: int | None = None,
        z: float | None = None,
        model: nn.Module | None = None,
    ) -> "ReasoningHeads":
        """The top query heads of a scored circuit.

        Ranks the circuit's query-head scores (kinds ``q`` / ``o``) and keeps the top ``k``, or the
        top ``fraction`` of all scored heads (default 5 %, at least one), or those with a z-score
        above ``z``. A circuit without head scores falls back to its kept query heads.
        """
        scores: dict[tuple[int, int], float] = {}
        for comp, s in (getattr(circuit, "scores", None) or {}).items():
            kind, layer, index = comp
            if kind in _QUERY_HEAD_NAMES:
                key = (int(layer), int(index))
                scores[key] = max(float(s), scores.get(key, -math.inf))
        fp = getattr(circuit, "model_fingerprint", None) or getattr(circuit, "fingerprint", None)
        fp = fp if isinstance(fp, dict) else None
        if not scores:
            kept = [(c[1], c[2]) for c in getattr(circuit, "components", []) if c[0] in _QUERY_HEAD_NAMES]
            if not kept:
                raise ValueError("the circuit has no query heads (kinds 'q' or 'o') to use as reasoning heads")
            out = cls(kept, fp, source="circuit")
        else:
            out = cls(top_heads(scores, fraction=fraction, k=k, z=z), fp, scores, source="circuit")
        if model is not None:
            out.check_model(model, record=True)
        return out

    @classmethod
    def _from_view(cls, circuit: Circuit) -> "ReasoningHeads":
        """The heads a saved reasoning-heads circuit holds, exactly (no re-ranking)."""
        return cls([(c.layer, c.index) for c in circuit.components], circuit.fingerprint,
                   {(c.layer, c.index): v for c, v in circuit.scores.items()}, circuit.meta.get("source", "file"))

    # ----- checks and grouping -------------------------------------------------------------------
    def check_model(self, model: nn.Module, record: bool = False) -> None:
        """Raise ``ValueError`` if these heads were made for another model or do not exist in it."""
        arch = get_arch(model)
        if self.model_fingerprint is not None:
            diffs = fingerprint_diff(self.model_fingerprint, arch.fingerprint())
            if diffs:
                raise ValueError(
                    "these reasoning heads were made for another model: " + "; ".join(diffs).replace("adapter", "heads")
                    + ". Recompute them for this model (circuit_peft.select.find_reasoning_heads)."
                )
        for layer, head in self.heads:
            arch.validate("q", layer, head)
        if record or self.model_fingerprint is None:
            self.model_fingerprint = arch.fingerprint()

    def by_layer(self) -> dict[int, list[int]]:
        """{layer: [heads]} in ascending order."""
        out: dict[int, list[int]] = {}
        for layer, head in self.heads:
            out.setdefault(layer, []).append(head)
        return out

    @property
    def deepest_layer(self) -> int:
        return max(l for l, _ in self.heads)

    def __len__(self) -> int:
        return len(self.heads)

    def __iter__(self):
        return iter(self.heads)

    # ----- as a circuit, and JSON -------------------------------------------------------------------
    def to_circuit(self) -> Circuit:
        """The query-head :class:`Circuit` these heads are a view of (``method="reasoning_heads"``): kept
        components ``("q", layer, head)``, the head scores, the fingerprint."""
        return Circuit([("q", l, h) for l, h in self.heads], {("q", l, h): v for (l, h), v in self.scores.items()},
                       self.model_fingerprint, method=REASONING_HEADS_METHOD, meta={"source": self.source})

    def to_dict(self) -> dict[str, Any]:
        """The circuit file format (:meth:`Circuit.to_dict`); files of the old heads format still load."""
        return self.to_circuit().to_dict()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the heads as a circuit file, atomically; ``circuit-peft locate``/``Circuit.load`` read it."""
        return self.to_circuit().save(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "ReasoningHeads":
        """Read a heads file (or a saved ``Circuit``); with ``model``, refuse one made for another model."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"heads file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise located(str(path), f"not a JSON heads file: {err}") from None
        if isinstance(data, dict) and data.get("format") == HEADS_FORMAT:  # the format before 0.x: still read
            scores = {tuple(int(x) for x in k.split(".")): float(v) for k, v in (data.get("scores") or {}).items()}
            out = cls([tuple(h) for h in data["heads"]], data.get("model_fingerprint"), scores,
                      data.get("source", "file"))
        else:
            circuit = Circuit.from_dict(data, source=path)  # the file is read once, here; every field checked
            out = cls._from_view(circuit) if circuit.method == REASONING_HEADS_METHOD else cls.from_circuit(circuit)
        if model is not None:
            out.check_model(model)
        return out


def top_heads(
    scores: dict[tuple[int, int], float], fraction: float | None = DEFAULT_HEAD_FRACTION, k: int | None = None,
    z: float | None = None,
) -> list[tuple[int, int]]:
    """Heads with the highest scores by the one keep rule (:mod:`circuit_peft.circuits.selection`): top ``k``
    (k wins over ``fraction``), else z-score >= ``z`` (at least the best), else top ``fraction`` (at least 1)."""
    if not scores:
        raise ValueError("no head scores to rank")
    if k is None and z is None and fraction is None:
        raise ValueError("give one of fraction=, k= or z=")
    rule = Keep(k=k) if k is not None else Keep(z=z) if z is not None else Keep(fraction=fraction)
    ranked = sorted(scores.items(), key=lambda hs: (-hs[1], hs[0]))
    return keep_ranked(ranked, rule, "scored heads")


def find_reasoning_heads(
    model: nn.Module,
    tokenizer: Any,
    probe: Any,
    method: str = "ablation",
    fraction: float | None = DEFAULT_HEAD_FRACTION,
    k: int | None = None,
    z: float | None = None,
    **scan_kwargs: Any,
) -> ReasoningHeads:
    """Scan every query head on ``probe`` rows ``{"prompt", "solution"}`` and keep the top ones.

    Rows with other field names: pass ``prompt_field=`` / ``solution_field=`` (e.g. GSM8K's
    ``"question"`` / ``"answer"``).
    ``method``: a registered locator that scores query heads on probe rows
    (:func:`circuit_peft.locate.registry.locator_names` ``(heads=True)``): ``"ablation"`` (the exact scan: loss
    increase on solution tokens when the head is ablated, uniform ablation by default), ``"ablation_estimate"``
    (its first-order estimate, one backward pass; ``"attribution"`` is its old name here), ``"refined"``
    (the estimate, then the exact scan of its top candidates; keeps ``fraction`` or ``k`` heads, not ``z``),
    ``"gradient"``... The top ``k`` (k wins), else z-score >= ``z``, else ``fraction`` of the heads are kept
    (:mod:`circuit_peft.circuits.selection`). Extra keyword arguments go to the locator.
    """
    from ..locate.registry import get_locator, locator_names

    if method == "attribution":  # the old name: attribution is now the logit difference on contrastive records
        logger.warning("reasoning heads: method='attribution' on probe rows is the locator 'ablation_estimate'")
        method = "ablation_estimate"
    locator = get_locator(method, "method", among=locator_names(heads=True))
    if k is None and z is None and fraction is None:
        raise ValueError("give one of fraction=, k= or z=")
    keep = Keep(k=k) if k is not None else Keep(z=z) if z is not None else Keep(fraction=fraction)
    options = {} if locator.kinds == ("q",) else {"kinds": ("q",)}
    circuit = locator(model, tokenizer, probe, keep, **{**options, **scan_kwargs})
    out = ReasoningHeads([(c.layer, c.index) for c in circuit.components if c.kind == "q"], circuit.fingerprint,
                         {(c.layer, c.index): v for c, v in circuit.scores.items() if c.kind == "q"},
                         source=f"{method} scan")
    out.check_model(model, record=True)
    return out
