"""The one validation layer: every user-facing object is checked here, by the CLI and the Python API alike.

* circuits (a circuit file, or ``Circuit(...)``): components ``(kind, layer, index)`` of a known kind with
  integer indices in range for the model's sizes, scores that are finite numbers, a fingerprint that is
  well formed, present and matching when the circuit is put on a model;
* selection inputs: counts (``k``), shares (``fraction``), scores (finite numbers, one per row), the name of
  a column the selection adds;
* rows and records: token lengths against the model's context (``max_position_embeddings``).

Every refusal is a :class:`~circuit_peft.errors.CircuitPeftError` (a ``ValueError``) whose message starts
with where the bad value is (``file: field``, ``--flag`` or ``argument``) and names the value, raised
before any work is done. The CLI passes its flag names (``--score-column``), the API its argument names
(``score_column``), to the same checks.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .arch import COMPONENT_KINDS, Component, fingerprint_diff
from .errors import CircuitPeftError, located

# the sizes of a fingerprint that fix where a component lives (per layer count of each kind)
FINGERPRINT_SIZES: tuple[str, ...] = ("n_layers", "n_heads", "n_kv_heads", "n_neurons")
_PER_LAYER = {"q": "n_heads", "o": "n_heads", "k": "n_kv_heads", "v": "n_kv_heads", "mlp": "n_neurons"}
_KIND_NAMES = {"q": "query head", "o": "head output", "k": "key head", "v": "value head", "mlp": "MLP neuron"}


# ----- numbers -------------------------------------------------------------------------------------------


def _whole(value: Any) -> bool:
    """An integer (Python, numpy or a 0-d torch integer), or a float with an integral value (2.0); not a
    bool, a string or 2.7."""
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, numbers.Integral):
        return True
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def integer(value: Any, where: str, what: str = "value", minimum: int | None = None) -> int:
    """``value`` as an ``int``: an integer, or a float with an integral value (not a bool, a string or 2.7);
    at least ``minimum`` when given."""
    if not _whole(value):
        raise located(where, f"{what} {value!r} is not an integer")
    if minimum is not None and value < minimum:
        raise located(where, f"{what} {value!r} must be >= {minimum}")
    return int(value)


def count(value: Any, name: str, at_most: int | None = None, of: str = "") -> int:
    """A count such as ``k``: an integer >= 1 (2.7, "3" or True refused), and <= ``at_most`` (the number
    of ``of``, e.g. ``"the rows in the pool"``) when given."""
    if not _whole(value) or value < 1:
        raise CircuitPeftError(f"{name} must be a positive integer (>= 1), got {value!r}")
    if at_most is not None and value > at_most:
        raise CircuitPeftError(f"{name}={int(value)} is more than {of or 'the items'} ({at_most}); use {name} <= {at_most}")
    return int(value)


def share(value: Any, name: str) -> float:
    """A share such as ``fraction``: a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) <= 1:
        raise CircuitPeftError(f"{name} must be in (0, 1] (e.g. 0.1 for 10 %), got {value!r}")
    return float(value)


def finite_number(value: Any, where: str, what: str = "value") -> float:
    """``value`` as a finite ``float`` (a string such as ``"high"``, a bool, NaN or inf refused; a numpy
    or 0-d torch scalar is read with ``.item()``)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # not a single value
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise located(where, f"{what} {value!r} is not a finite number")
    return float(value)


def finite_scores(values: Any, name: str, rows: int | None = None) -> np.ndarray:
    """One finite score per row as a float64 array; a non-number, a NaN or an inf anywhere is refused,
    with how many rows and which (``name``: the argument or the column the scores came from)."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    items = list(values) if not isinstance(values, np.ndarray) else values
    if isinstance(items, list):
        bad = [i for i, v in enumerate(items) if isinstance(v, (bool, str)) or not isinstance(v, (numbers.Real, np.number))]
        if bad:
            raise located(name, f"row {bad[0]}: score {items[bad[0]]!r} is not a number "
                                f"({len(bad)} of {len(items)} rows hold no number)")
    s = np.asarray(items, dtype=np.float64)
    if s.ndim != 1 or (rows is not None and len(s) != rows):
        raise located(name, f"got {s.size} scores for {rows} rows; give one score per row")
    bad = np.flatnonzero(~np.isfinite(s))
    if len(bad):
        how_many = f"none of the {len(s)} scores is finite" if len(bad) == len(s) else \
            f"{len(bad)} of the {len(s)} scores are not finite"
        raise located(name, f"{how_many} (NaN or inf; rows {bad[:8].tolist()}{'...' if len(bad) > 8 else ''}); "
                            "a row without a finite score cannot be ranked: drop those rows or give them a score")
    return s


def new_column(columns: Sequence[str], column: Any, name: str) -> str:
    """The name of a column that an operation adds: text, and not a column the data already has."""
    if not isinstance(column, str) or not column:
        raise located(name, f"a column name is non-empty text, got {column!r}")
    if column in columns:
        raise located(name, f"the data already has a column {column!r} (columns: {list(columns)}); "
                            f"choose a name it does not use for the column this adds")
    return column


# ----- context length --------------------------------------------------------------------------------------


def context_limit(model: Any, tokenizer: Any = None) -> tuple[int, str]:
    """The longest sequence ``model`` takes, in tokens, and where that number comes from
    (``max_position_embeddings``, ``n_positions`` or the tokenizer's ``model_max_length``, the smallest)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    candidates = []
    for field in ("max_position_embeddings", "n_positions"):
        n = getattr(config, field, None)
        if isinstance(n, int) and 0 < n < 10**8:
            candidates.append((n, field))
            break
    tok_n = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_n, int) and 0 < tok_n < 10**8:
        candidates.append((tok_n, "the tokenizer's model_max_length"))
    return min(candidates) if candidates else (10**8, "no limit")


def context_length(model: Any, tokenizer: Any = None) -> int:
    """The longest sequence the model takes (config ``max_position_embeddings`` / ``n_positions``)."""
    return context_limit(model, tokenizer)[0]


def within_context(lengths: Sequence[int], model: Any, tokenizer: Any, row_name: Callable[[int], str],
                   what: str = "prompt", reserve: int = 0, reserve_name: str = "", fix: str = "") -> None:
    """Refuse the first row whose ``lengths[i]`` tokens (plus ``reserve`` more, e.g. the tokens to be
    generated, named ``reserve_name``) exceed the model's context, naming the row, its length and the
    context, and how many rows are too long."""
    limit, source = context_limit(model, tokenizer)
    long_rows = [i for i, n in enumerate(lengths) if n + reserve > limit]
    if not long_rows:
        return
    first = long_rows[0]
    plus = f" + {reserve} ({reserve_name})" if reserve else ""
    raise located(row_name(first), f"its {what} is {lengths[first]} tokens{plus}, longer than the model's context "
                                   f"of {limit} tokens ({source}); {len(long_rows)} of {len(lengths)} rows are too "
                                   f"long{'; ' + fix if fix else ''}")


# ----- circuits --------------------------------------------------------------------------------------------


def circuit_component(c: Any, where: str) -> Component:
    """``c`` (a :class:`Component` or ``[kind, layer, index]``) as a :class:`Component`: a known kind and
    integer layer and index >= 0."""
    fast = _fast_component(c)
    if fast is not None:
        return fast
    if isinstance(c, (str, bytes)) or not isinstance(c, (Sequence, Component)) or len(c) != 3:
        raise located(where, f"a component is [kind, layer, index], got {c!r}")
    kind, layer, index = c
    if kind not in COMPONENT_KINDS:
        raise located(where, f"unknown component kind {kind!r} in {list(c)!r}; use one of {', '.join(COMPONENT_KINDS)}")
    for name, value in (("layer", layer), ("index", index)):
        if not _whole(value):
            raise located(where, f"{name} {value!r} of {list(c)!r} is not an integer")
        if value < 0:
            raise located(where, f"{name} {value!r} of {list(c)!r} is negative; layers and indices count from 0")
    return Component(str(kind), int(layer), int(index))


def _fast_component(c: Any) -> Component | None:
    """``c`` as a :class:`Component` when it plainly is one (exact ``int`` layer and index >= 0, known kind),
    else None (then :func:`circuit_component` checks it and names what is wrong). Circuits hold tens of
    thousands of scored components: this path keeps checking them cheap."""
    if type(c) in (Component, list, tuple) and len(c) == 3:
        kind, layer, index = c
        if type(layer) is int and type(index) is int and layer >= 0 and index >= 0 and kind in _PER_LAYER:
            return c if type(c) is Component else Component(kind, layer, index)
    return None


def circuit_fingerprint(fp: Any, where: str) -> dict[str, Any] | None:
    """A fingerprint (``get_arch(model).fingerprint()``) or None; its sizes must be positive integers."""
    if fp is None:
        return None
    if not isinstance(fp, Mapping):
        raise located(where, f"expected the model's sizes as an object ({', '.join(FINGERPRINT_SIZES)}, ...), got {fp!r}")
    for key in FINGERPRINT_SIZES:
        if key not in fp:
            raise located(where, f"no {key!r}; a fingerprint holds {', '.join(FINGERPRINT_SIZES)} "
                                 "(get_arch(model).fingerprint())")
        integer(fp[key], f"{where}.{key}", "size", 1)
    return dict(fp)


def component_in_model(c: Component, fp: Mapping[str, Any], where: str) -> None:
    """Refuse a component that does not exist in a model of fingerprint ``fp``, naming the layer."""
    n_layers = fp["n_layers"]
    if c.layer >= n_layers:
        raise located(where, f"layer {c.layer} of {list(c)!r} is outside the model's {n_layers} layers (0-{n_layers - 1})")
    n = fp[_PER_LAYER[c.kind]]
    if c.index >= n:
        raise located(where, f"{_KIND_NAMES[c.kind]} {c.index} of layer {c.layer} is outside the model's {n} "
                             f"{_KIND_NAMES[c.kind]}s per layer (0-{n - 1})")


def circuit_parts(components: Iterable[Any], scores: Mapping[Any, Any] | Iterable[Sequence[Any]] | None,
                  fingerprint: Any, source: str | None = None
                  ) -> tuple[list[Component], dict[Component, float], dict[str, Any] | None]:
    """The kept components, the scores and the fingerprint of a circuit, checked: known kinds, integer
    indices in range for the fingerprint's sizes, finite scores. ``scores``: ``{component: score}`` or
    rows ``[kind, layer, index, score]`` (a circuit file's). ``source``: the file, named in refusals."""
    at = f"{source}: " if source else ""
    fp = circuit_fingerprint(fingerprint, f"{at}fingerprint")
    if isinstance(components, (str, bytes, Mapping)) or not isinstance(components, Iterable):
        raise located(f"{at}components", f"expected a list of [kind, layer, index], got {components!r}")
    kept = [_fast_component(c) or circuit_component(c, f"{at}components[{i}]") for i, c in enumerate(components)]
    if scores is None:
        pairs: Iterable[tuple[Any, Any, Any]] = ()
    elif isinstance(scores, Mapping):
        pairs = ((c, s, c) for c, s in scores.items())  # (component, score, position named in a refusal)
    elif isinstance(scores, (str, bytes)) or not isinstance(scores, Iterable):
        raise located(f"{at}scores", f"expected a list of [kind, layer, index, score], got {scores!r}")
    else:
        pairs = (_score_row(row, at, j) for j, row in enumerate(scores))
    scored: dict[Component, float] = {}
    sizes = {k: fp[n] for k, n in _PER_LAYER.items()} if fp is not None else None
    n_layers = fp["n_layers"] if fp is not None else 0
    for c, value, pos in pairs:
        c = _fast_component(c) or circuit_component(c, f"{at}scores[{pos!r}]")
        if type(value) is not float or not math.isfinite(value):
            value = finite_number(value, f"{at}scores[{pos!r}]", f"score of {list(c)!r}:")
        if sizes is not None and not (c.layer < n_layers and c.index < sizes[c.kind]):
            component_in_model(c, fp, f"{at}scores[{pos!r}]")
        scored[c] = value
    if sizes is not None:
        for i, c in enumerate(kept):
            if not (c.layer < n_layers and c.index < sizes[c.kind]):
                component_in_model(c, fp, f"{at}components[{i}]")
    return kept, scored, fp


def circuit_file(data: Any, source: str | None, newest_version: int) -> dict[str, Any]:
    """The keyword arguments of ``Circuit(...)`` from a circuit file's JSON, checked (:func:`circuit_parts`),
    plus ``method`` and ``meta``."""
    at = f"{source}: " if source else ""
    if not isinstance(data, Mapping) or "components" not in data:
        raise located(source or "circuit", "not a circuit-peft circuit: the JSON has no 'components' list")
    version = data.get("version", 1)
    integer(version, f"{at}version", "version", 1)
    if version > newest_version:
        raise located(f"{at}version", f"circuit format version {version} is newer than this circuit-peft "
                                      f"understands ({newest_version}); upgrade circuit-peft")
    method, meta = data.get("method"), data.get("meta")
    if method is not None and not isinstance(method, str):
        raise located(f"{at}method", f"expected text or null, got {method!r}")
    if meta is not None and not isinstance(meta, Mapping):
        raise located(f"{at}meta", f"expected an object or null, got {meta!r}")
    kept, scores, fp = circuit_parts(data["components"], data.get("scores") or [], data.get("fingerprint"), source)
    return {"components": kept, "scores": scores, "fingerprint": fp, "method": method, "meta": meta}


def _score_row(row: Any, at: str, j: int) -> tuple[Any, Any, int]:
    """Row ``j`` ``[kind, layer, index, score]`` of a circuit file -> (``[kind, layer, index]``, score, j)."""
    if type(row) is not list and (isinstance(row, (str, bytes)) or not isinstance(row, Sequence)) or len(row) != 4:
        raise located(f"{at}scores[{j}]", f"a score row is [kind, layer, index, score]; got {row!r}")
    return row[:3], row[3], j


def circuit_on_model(fingerprint: Mapping[str, Any] | None, actual: Mapping[str, Any], source: str | None = None,
                     what: str = "circuit") -> None:
    """Refuse a circuit put on a model it was not located on: a missing fingerprint (its indices cannot be
    checked against the model's sizes) or one that differs (each differing field named)."""
    at = f"{source}: " if source else ""
    if fingerprint is None:
        raise located(f"{at}fingerprint", f"null: this {what} does not say which model it was located on, so its "
                                          "indices cannot be checked against this model. Locate it again on this model, "
                                          f"or set {what}.fingerprint = get_arch(model).fingerprint() for the model "
                                          "you know it was located on")
    diffs = fingerprint_diff(dict(fingerprint), dict(actual))
    if diffs:
        raise located(f"{at}fingerprint", f"this {what} was located on a different model: "
                                          + "; ".join(d.replace("adapter", what) for d in diffs)
                                          + f". Locate the {what} again on this model.")


__all__ = [
    "CircuitPeftError", "FINGERPRINT_SIZES", "circuit_component", "circuit_file", "circuit_fingerprint",
    "circuit_on_model", "circuit_parts", "component_in_model", "context_length", "context_limit", "count",
    "finite_number", "finite_scores", "integer", "new_column", "share", "within_context",
]
