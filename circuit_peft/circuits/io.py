"""A circuit's file format and its model checks: JSON written atomically, read back field by field, and the
fingerprint of the model it was located on compared with the model it is put on.

These are views of a :class:`~circuit_peft.circuit.Circuit` (``Circuit.save``/``load``/``to_dict``/
``from_dict``/``check_model`` call them); they read only its public attributes and never import it, so
``circuit.py`` can import them at its top.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from torch import nn

from .. import validation
from ..arch import get_arch
from ..errors import located
from ..files import atomic_write_text

if TYPE_CHECKING:
    from ..circuit import Circuit

CIRCUIT_FORMAT_VERSION = 1
FORMAT_NAME = "circuit-peft circuit"


def per_layer_count(fingerprint: Mapping[str, Any], kind: str) -> int:
    """Components of ``kind`` in each layer of the model a fingerprint describes (``o`` slices as query heads)."""
    return {"q": fingerprint["n_heads"], "o": fingerprint["n_heads"], "k": fingerprint["n_kv_heads"],
            "v": fingerprint["n_kv_heads"], "mlp": fingerprint["n_neurons"]}[kind]


def circuit_to_dict(circuit: "Circuit") -> dict[str, Any]:
    """The JSON form: format and version, method, fingerprint, kept components, every score (model order), meta."""
    return {
        "format": FORMAT_NAME,
        "version": CIRCUIT_FORMAT_VERSION,
        "method": circuit.method,
        "fingerprint": circuit.fingerprint,
        "components": [list(c) for c in circuit.components],
        "scores": [[*c, s] for c, s in sorted(circuit.scores.items(), key=lambda cs: circuit.position(cs[0]))],
        "meta": circuit.meta,
    }


def circuit_fields(data: Any, source: str | os.PathLike | None = None) -> dict[str, Any]:
    """The keyword arguments of ``Circuit(...)`` from :func:`circuit_to_dict`'s JSON, checked field by field
    (:func:`circuit_peft.validation.circuit_file`; refusals name ``source`` and the field), with ``source``."""
    src = str(source) if source else None
    return {**validation.circuit_file(data, src, CIRCUIT_FORMAT_VERSION), "source": src}


def write_circuit(circuit: "Circuit", path: str | os.PathLike) -> Path:
    """Write the circuit's JSON atomically (temporary file + rename); the path written."""
    return atomic_write_text(path, json.dumps(circuit_to_dict(circuit), indent=1, allow_nan=True))


def read_circuit_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of a circuit file: a missing file is a FileNotFoundError, text that is not JSON a
    :class:`~circuit_peft.errors.CircuitPeftError` naming the file (its fields are checked by :func:`circuit_fields`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no circuit file at {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise located(str(path), f"not valid JSON ({err}); is it a circuit saved by Circuit.save?") from err


def check_circuit_model(circuit: "Circuit", model: nn.Module) -> None:
    """Raise :class:`~circuit_peft.errors.CircuitPeftError` if ``model`` is not the circuit's model: each
    differing field named, or the circuit has no fingerprint (its indices cannot be checked)."""
    validation.circuit_on_model(circuit.fingerprint, get_arch(model).fingerprint(), circuit.source)


__all__ = ["CIRCUIT_FORMAT_VERSION", "check_circuit_model", "circuit_fields", "circuit_to_dict", "per_layer_count",
           "read_circuit_json", "write_circuit"]
