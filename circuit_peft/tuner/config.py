"""``CircuitConfig``: which heads and neurons a circuit adapter trains (a ``PeftConfig``)."""

from __future__ import annotations

import json
import numbers
import os

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .. import compat
from ..arch import COMPONENT_KINDS, PROJECTION_PRESETS, PROJECTIONS, Component
from ..errors import CircuitPeftError
from .saving import PEFT_TYPE_NAME, finish_killed_save, saved_weights_digest, write_config


def ensure_peft_type() -> None:
    """Add ``CIRCUIT`` to PEFT's closed ``PeftType`` enum (idempotent; the patch: ``compat.extend_peft_type``)."""
    compat.extend_peft_type(PEFT_TYPE_NAME)


ensure_peft_type()


def _normalize_components(components: Any) -> dict[str, dict[str, list[int]]]:
    """``kind -> {str(layer): sorted unique indices}``; raises ``ValueError`` on malformed input."""
    if not isinstance(components, dict):
        raise CircuitPeftError(
            "CircuitConfig.components must be a dict kind -> {layer: [indices]}, e.g. "
            "{'q': {'3': [0, 5]}, 'mlp': {'4': [17]}}; use CircuitConfig.from_components for a list of components"
        )
    out: dict[str, dict[str, list[int]]] = {}
    for kind, layers in components.items():
        if kind not in COMPONENT_KINDS:
            raise CircuitPeftError(f"unknown component kind {kind!r} in CircuitConfig.components; use one of {COMPONENT_KINDS}")
        if not isinstance(layers, dict):
            raise CircuitPeftError(f"components[{kind!r}] must be a dict layer -> [indices], got {type(layers).__name__}")
        per_kind: dict[str, list[int]] = {}
        for layer, indices in layers.items():
            try:
                if isinstance(layer, (bool, float)):
                    raise TypeError
                layer_int = int(layer)
            except (TypeError, ValueError):
                raise CircuitPeftError(f"components[{kind!r}] has a non-integer layer key {layer!r}") from None
            if layer_int < 0:
                raise CircuitPeftError(f"layer {layer_int} (kind {kind!r}) is out of range: layers count from 0")
            if isinstance(indices, (int, str, bytes)) or not isinstance(indices, Iterable):
                raise CircuitPeftError(f"components[{kind!r}][{layer!r}] must be a list of integer indices, got {indices!r}")
            bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
            if bad:
                raise CircuitPeftError(f"components[{kind!r}][{layer!r}] holds non-integer indices {bad!r}; "
                                 "indices are whole numbers")
            idx = sorted({int(i) for i in indices})
            if any(i < 0 for i in idx):
                raise CircuitPeftError(f"negative index in components[{kind!r}][{layer!r}]: {idx}")
            if idx:
                per_kind[str(layer_int)] = idx
        if per_kind:
            out[kind] = dict(sorted(per_kind.items(), key=lambda kv: int(kv[0])))
    return out


def _normalize_projections(projections: Any) -> Union[str, dict[str, list[str]]]:
    if isinstance(projections, str):
        if projections not in PROJECTION_PRESETS:
            raise CircuitPeftError(
                f"unknown projections preset {projections!r}; use one of {sorted(PROJECTION_PRESETS)} "
                "or a dict kind -> list of projection names"
            )
        return projections
    if not isinstance(projections, dict):
        raise CircuitPeftError("projections must be a preset name ('all' or 'paper') or a dict kind -> [projection names]")
    out = {}
    for kind, names in projections.items():
        if kind not in COMPONENT_KINDS:
            raise CircuitPeftError(f"unknown component kind {kind!r} in projections; use one of {COMPONENT_KINDS}")
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in PROJECTIONS:
                raise CircuitPeftError(f"unknown projection {n!r} for kind {kind!r}; use names from {PROJECTIONS}")
        out[kind] = names
    return out


@dataclass
class CircuitConfig(PeftConfig):
    """Configuration of a circuit adapter: train only chosen attention heads and MLP neurons.

    Args:
        components: ``kind -> {str(layer): [indices]}`` with kinds ``q`` (query head), ``k``/``v``
            (key/value head; with grouped-query attention shared by a group of query heads), ``o`` (a
            query head's input columns of the output projection) and ``mlp`` (an MLP neuron).
        projections: which weight slices each kind trains. ``"all"`` (default): every slice of the
            component (query head: its q rows and its o columns; neuron: gate/up rows and down column);
            ``"paper"``: q/k/v rows of heads and ``up_proj`` rows of neurons (the CCA paper); or a dict
            ``kind -> [projection names]`` (kinds left out use ``"all"``).
        r: rank of the optional LoRA branch inside the same adapter layers (0 = no LoRA branch).
        lora_alpha: LoRA scaling numerator (scaling = ``lora_alpha / r``); None means ``r``.
        lora_dropout: dropout on the LoRA branch's input.
        lora_target_modules: the LoRA branch always sits on every module the circuit touches; a list
            of logical projection names (``q_proj`` ... ``down_proj``) or ``"all"`` adds it to those
            projections in every layer as well.
        init_weights: True: zero deltas (and zero LoRA B), the adapter starts as the identity;
            False: small random deltas (std 0.02), useful in tests.
        modules_to_save, trainable_token_indices: as in PEFT (full trainable copies / trainable embedding rows).
        base_model_fingerprint: family and sizes of the base model; filled in by ``get_peft_model`` and
            checked when the adapter is loaded. A loaded config without one is refused (its indices
            would be applied blindly) unless ``check_base_model`` is False.
        check_base_model: False loads a config without a fingerprint onto any base (your decision:
            load the config, set it, pass ``config=`` to ``PeftModel.from_pretrained``).
        weights_sha256: written by ``save_pretrained``: the digest of the weights file saved with this config;
            loading refuses a folder whose weights differ (a save stopped between the two files).
        target_modules: derived from ``components`` when the adapter is injected (do not set by hand).
    """

    components: dict[str, dict[str, list[int]]] = field(
        default_factory=dict, metadata={"help": "kind -> {str(layer): sorted indices} of the trainable components"}
    )
    projections: Union[str, dict[str, list[str]]] = field(
        default="all", metadata={"help": "'all', 'paper', or kind -> [projection names]"}
    )
    r: int = field(default=0, metadata={"help": "rank of the optional LoRA branch (0 = off)"})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha (default: r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input"})
    lora_target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "extra logical projections that get the LoRA branch in every layer"}
    )
    init_weights: bool = field(default=True, metadata={"help": "True: zero deltas; False: small random deltas"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "modules trained in full and saved with the adapter"}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "embedding rows to train (PEFT's TrainableTokens)"}
    )
    base_model_fingerprint: Optional[dict[str, Any]] = field(
        default=None, metadata={"help": "family and sizes of the base model (filled in at get_peft_model)"}
    )
    check_base_model: bool = field(
        default=True, metadata={"help": "False: a loaded config without a fingerprint may go onto any base"}
    )
    weights_sha256: Optional[str] = field(
        default=None, compare=False,
        metadata={"help": "sha256 of the adapter_model.safetensors saved with this config (set by save_pretrained)"},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "derived from components at injection time"}
    )
    # PEFT's matcher reads these two; a circuit always targets exactly its own modules.
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "must stay None"})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "must stay None"})
    # The folder from_pretrained read this config from (not a field: never saved). The tuner checks that folder's
    # weights at this config's first injection, then clears it (CircuitModel._prepare_model).
    _loaded_from: ClassVar[Optional[str]] = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """PEFT's loader; the returned config remembers that it was read from a saved adapter. A save into that
        folder killed between its two renames is finished first (tuner/saving.py)."""
        path = str(pretrained_model_name_or_path)
        path = os.path.join(path, subfolder) if subfolder else path
        if os.path.isdir(path):
            finish_killed_save(path)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._loaded_from = path
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's config save, written atomically with the sha256 of the weights that the same
        ``PeftModel.save_pretrained`` wrote beside it, renamed into place right before it (tuner/saving.py)."""
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")  # as PEFT
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        previous, self.weights_sha256 = self.weights_sha256, saved_weights_digest(save_directory)
        try:
            output = {k: list(v) if isinstance(v, set) else v for k, v in self.to_dict().items()}
        finally:
            self.weights_sha256 = previous
        if auto_mapping_dict is not None:
            output["auto_mapping"] = auto_mapping_dict
        write_config(save_directory, json.dumps(output, indent=2, sort_keys=True))

    def __post_init__(self) -> None:
        super().__post_init__()
        ensure_peft_type()
        self.peft_type = PeftType.CIRCUIT
        self.components = _normalize_components(self.components)
        if not self.components:
            raise CircuitPeftError(
                "the circuit is empty: CircuitConfig needs at least one component, e.g. "
                "components={'q': {'3': [0]}} or CircuitConfig.from_components([('q', 3, 0)])"
            )
        self.projections = _normalize_projections(self.projections)
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise CircuitPeftError(f"r must be an integer (0 = no LoRA branch), got {self.r!r}")
        if self.r < 0:
            raise CircuitPeftError(f"the LoRA branch needs r >= 1 (or r=0 for no LoRA branch), got r={self.r}")
        if self.r == 0 and (self.lora_target_modules is not None or self.lora_alpha is not None):
            raise CircuitPeftError(
                "a LoRA branch was requested (lora_target_modules or lora_alpha set) but r < 1; set r >= 1"
            )
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise CircuitPeftError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_target_modules is not None:
            names = [self.lora_target_modules] if isinstance(self.lora_target_modules, str) else list(
                self.lora_target_modules
            )
            if names == ["all"]:
                self.lora_target_modules = "all"
            else:
                for n in names:
                    if n not in PROJECTIONS:
                        raise CircuitPeftError(f"unknown lora_target_modules entry {n!r}; use 'all' or names from {PROJECTIONS}")
                self.lora_target_modules = names
        if self.exclude_modules or self.target_parameters:
            raise CircuitPeftError(
                "CircuitConfig does not take exclude_modules or target_parameters: its modules follow from components"
            )
        if isinstance(self.target_modules, set):
            self.target_modules = sorted(self.target_modules)

    # ----- construction and views ------------------------------------------------------------
    @classmethod
    def from_components(
        cls,
        components: Iterable[Union[Component, tuple[str, int, int]]],
        projections: Union[str, dict[str, list[str]]] = "all",
        **kwargs: Any,
    ) -> "CircuitConfig":
        """Build a config from ``(kind, layer, index)`` components (e.g. a located circuit)."""
        table: dict[str, dict[str, list[int]]] = {}
        for c in components:
            try:
                kind, layer, index = c
            except (TypeError, ValueError):
                raise CircuitPeftError(f"a component must be (kind, layer, index), got {c!r}") from None
            table.setdefault(str(kind), {}).setdefault(str(int(layer)), []).append(int(index))
        return cls(components=table, projections=projections, **kwargs)

    def component_list(self) -> list[Component]:
        """Every chosen component, sorted by (layer, kind order, index)."""
        order = {k: i for i, k in enumerate(COMPONENT_KINDS)}
        out = [
            Component(kind, int(layer), i)
            for kind, layers in self.components.items()
            for layer, indices in layers.items()
            for i in indices
        ]
        return sorted(out, key=lambda c: (c.layer, order[c.kind], c.index))

    def projections_for_kind(self, kind: str) -> Optional[tuple[str, ...]]:
        """Projections a kind touches under this config (None = the architecture default, "all")."""
        if isinstance(self.projections, str):
            return tuple(PROJECTION_PRESETS[self.projections][kind])
        names = self.projections.get(kind)
        return None if names is None else tuple(names)

    def layers(self) -> list[int]:
        """Sorted layers that hold at least one component."""
        return sorted({int(l) for layers in self.components.values() for l in layers})
