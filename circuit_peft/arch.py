"""The one architecture map: where each decoder family keeps its heads and neurons.

Every other module asks this one where a component lives; no other file names
``q_proj``, ``c_attn`` or ``gate_up_proj``. Adding a family means adding one
:class:`FamilySpec` to :data:`FAMILIES`.

Vocabulary
----------
* A *component* is ``(kind, layer, index)`` with ``kind`` one of :data:`COMPONENT_KINDS`:
  ``"q"`` query head, ``"k"`` key head, ``"v"`` value head (with grouped-query attention
  a key/value head is its own component, shared by ``n_heads // n_kv_heads`` query heads),
  ``"o"`` a query head's input-column slice of the output projection, ``"mlp"`` an MLP neuron.
* A *projection* is a logical weight name: ``q_proj k_proj v_proj o_proj gate_proj up_proj
  down_proj``. Fused families map several logical projections onto one module with offsets.
* A component occupies either output features (``axis="out"``: rows of an ``nn.Linear``
  weight, columns of a GPT-2 ``Conv1D``) or input features (``axis="in"``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from torch import nn

from .errors import CircuitPeftError

COMPONENT_KINDS: tuple[str, ...] = ("q", "k", "v", "o", "mlp")
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Which projections a component kind touches by default ("all slices of the component").
DEFAULT_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "o_proj"),
    "k": ("k_proj",),
    "v": ("v_proj",),
    "o": ("o_proj",),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
# The paper's choice (CCA stage 3): q/k/v rows of the heads and up_proj rows of the neurons.
PAPER_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",),
    "k": ("k_proj",),
    "v": ("v_proj",),
    "o": ("o_proj",),
    "mlp": ("up_proj",),
}
PROJECTION_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {"all": DEFAULT_PROJECTIONS, "paper": PAPER_PROJECTIONS}

# Which projection a kind's activations are read from / written to by interventions.
_SITE_PROJECTION = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "mlp": "down_proj"}


class Component(NamedTuple):
    """One located component: ``kind`` in :data:`COMPONENT_KINDS`, ``layer`` and ``index`` from 0."""

    kind: str
    layer: int
    index: int


@dataclass(frozen=True)
class ProjectionSpec:
    """Where one logical projection lives inside a decoder layer.

    ``module``: dotted path relative to the layer. ``axis``: ``"out"`` if components occupy
    output features, ``"in"`` if input features. ``offset``: ``(a, b, c)`` meaning the
    component block starts at ``a*n_heads*head_dim + b*n_kv_heads*head_dim + c*n_neurons``
    inside a fused module (all zeros when not fused).
    """

    module: str
    axis: str
    offset: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class FamilySpec:
    """How one model family lays out its decoder blocks."""

    name: str
    model_types: tuple[str, ...]
    layers_paths: tuple[str, ...]
    projections: dict[str, ProjectionSpec]
    attention_module: str
    mlp_module: str
    has_gate: bool = True
    # q/k normalised after the projection: (q norm module, k norm module, layout of their input),
    # layout "BHTD" (Gemma-3: heads before time), "BTHD" (Qwen3: per head) or "flat" (OLMo-2:
    # the whole projection). Interventions on q/k heads act on the norm's output, where a head's
    # scale still reaches the attention scores.
    qk_norm: tuple[str, str, str] | None = None


def _llama_like(name: str, model_types: tuple[str, ...], qk_norm_layout: str | None = None) -> FamilySpec:
    qk_norm = None if qk_norm_layout is None else ("self_attn.q_norm", "self_attn.k_norm", qk_norm_layout)
    return FamilySpec(
        name=name,
        model_types=model_types,
        layers_paths=("model.layers", "model.language_model.layers", "language_model.layers"),
        projections={
            "q_proj": ProjectionSpec("self_attn.q_proj", "out"),
            "k_proj": ProjectionSpec("self_attn.k_proj", "out"),
            "v_proj": ProjectionSpec("self_attn.v_proj", "out"),
            "o_proj": ProjectionSpec("self_attn.o_proj", "in"),
            "gate_proj": ProjectionSpec("mlp.gate_proj", "out"),
            "up_proj": ProjectionSpec("mlp.up_proj", "out"),
            "down_proj": ProjectionSpec("mlp.down_proj", "in"),
        },
        attention_module="self_attn",
        mlp_module="mlp",
        qk_norm=qk_norm,
    )


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        _llama_like("llama", ("llama",)),
        _llama_like("mistral", ("mistral",)),
        _llama_like("qwen2", ("qwen2",)),
        _llama_like("qwen3", ("qwen3",), "BTHD"),
        _llama_like("gemma", ("gemma",)),
        _llama_like("gemma2", ("gemma2",)),
        _llama_like("gemma3", ("gemma3", "gemma3_text"), "BHTD"),
        _llama_like("olmo2", ("olmo2",), "flat"),
        FamilySpec(
            name="phi3",
            model_types=("phi3",),
            layers_paths=("model.layers",),
            projections={
                "q_proj": ProjectionSpec("self_attn.qkv_proj", "out", (0, 0, 0)),
                "k_proj": ProjectionSpec("self_attn.qkv_proj", "out", (1, 0, 0)),
                "v_proj": ProjectionSpec("self_attn.qkv_proj", "out", (1, 1, 0)),
                "o_proj": ProjectionSpec("self_attn.o_proj", "in"),
                "gate_proj": ProjectionSpec("mlp.gate_up_proj", "out", (0, 0, 0)),
                "up_proj": ProjectionSpec("mlp.gate_up_proj", "out", (0, 0, 1)),
                "down_proj": ProjectionSpec("mlp.down_proj", "in"),
            },
            attention_module="self_attn",
            mlp_module="mlp",
        ),
        FamilySpec(
            name="gpt2",
            model_types=("gpt2",),
            layers_paths=("transformer.h",),
            projections={
                # c_attn is a Conv1D producing [q | k | v], each n_heads*head_dim wide.
                "q_proj": ProjectionSpec("attn.c_attn", "out", (0, 0, 0)),
                "k_proj": ProjectionSpec("attn.c_attn", "out", (1, 0, 0)),
                "v_proj": ProjectionSpec("attn.c_attn", "out", (2, 0, 0)),
                "o_proj": ProjectionSpec("attn.c_proj", "in"),
                "up_proj": ProjectionSpec("mlp.c_fc", "out"),
                "down_proj": ProjectionSpec("mlp.c_proj", "in"),
            },
            attention_module="attn",
            mlp_module="mlp",
            has_gate=False,
        ),
    )
}
_MODEL_TYPE_TO_FAMILY = {mt: spec for spec in FAMILIES.values() for mt in spec.model_types}


class UnsupportedArchitectureError(CircuitPeftError):
    """Raised for a model family that :data:`FAMILIES` does not describe."""


@dataclass(frozen=True)
class ModelDims:
    """Sizes that fix where every component lives."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    n_neurons: int
    vocab_size: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class WeightSlice:
    """A contiguous slice of one weight: ``module`` is the dotted path from the model root."""

    module: str
    projection: str
    axis: str
    start: int
    stop: int


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _dims_from_config(config: Any, spec: FamilySpec) -> ModelDims:
    cfg = _text_config(config)
    if spec.name == "gpt2":
        hidden = cfg.n_embd
        n_heads = cfg.n_head
        return ModelDims(
            n_layers=cfg.n_layer,
            n_heads=n_heads,
            n_kv_heads=n_heads,
            head_dim=hidden // n_heads,
            hidden_size=hidden,
            n_neurons=cfg.n_inner if getattr(cfg, "n_inner", None) else 4 * hidden,
            vocab_size=cfg.vocab_size,
        )
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return ModelDims(
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        n_neurons=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
    )


def supported_families() -> list[str]:
    """Names of the supported families (model_type values accepted in parentheses)."""
    return [f"{s.name} ({', '.join(s.model_types)})" for s in FAMILIES.values()]


def family_for_model_type(model_type: str) -> FamilySpec:
    """Look up a family by ``config.model_type``; raise a clear error if unknown."""
    spec = _MODEL_TYPE_TO_FAMILY.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"circuit-peft does not know the architecture {model_type!r}. Supported families: "
            f"{'; '.join(supported_families())}. To add one, add a FamilySpec to "
            "circuit_peft.arch.FAMILIES saying where its layers, q/k/v/o projections and MLP "
            "projections live (see docs/architecture.md)."
        )
    return spec


def _weight_dim(module: nn.Module, axis: str) -> int:
    """Tensor dimension of ``module.weight`` that holds ``axis`` features (Conv1D is transposed)."""
    is_conv1d = type(module).__name__ == "Conv1D"
    if axis == "out":
        return 1 if is_conv1d else 0
    return 0 if is_conv1d else 1


class ModelArch:
    """The architecture map bound to one model's sizes.

    Build it with :func:`get_arch` from a model or a config.
    """

    def __init__(self, spec: FamilySpec, dims: ModelDims, model_type: str):
        self.spec = spec
        self.dims = dims
        self.model_type = model_type

    # ----- identity -----------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.spec.name

    def fingerprint(self) -> dict[str, Any]:
        """A small JSON-able description of the base model, checked when adapters are loaded."""
        return {"family": self.spec.name, "model_type": self.model_type, **asdict(self.dims)}

    def __repr__(self) -> str:
        return f"ModelArch({self.fingerprint()})"

    # ----- counting and validation --------------------------------------------------
    def num_components(self, kind: str) -> int:
        """Components of ``kind`` per layer."""
        self._check_kind(kind)
        d = self.dims
        return {"q": d.n_heads, "o": d.n_heads, "k": d.n_kv_heads, "v": d.n_kv_heads, "mlp": d.n_neurons}[kind]

    def all_components(self, kinds: tuple[str, ...] = ("q", "k", "v", "mlp")) -> list[Component]:
        """Every component of the given kinds, layer-major."""
        return [
            Component(kind, layer, i)
            for layer in range(self.dims.n_layers)
            for kind in kinds
            for i in range(self.num_components(kind))
        ]

    def kv_head_of(self, query_head: int) -> int:
        """The key/value head a query head reads (grouped-query attention)."""
        return query_head // self.dims.group_size

    def validate(self, kind: str, layer: int, index: int) -> None:
        """Raise ``ValueError`` if the component does not exist in this model."""
        self._check_kind(kind)
        if not 0 <= layer < self.dims.n_layers:
            raise ValueError(
                f"layer {layer} is out of range: this {self.family} model has layers 0..{self.dims.n_layers - 1}"
            )
        n = self.num_components(kind)
        if not 0 <= index < n:
            what = {"q": "query head", "o": "query head", "k": "key/value head", "v": "key/value head",
                    "mlp": "MLP neuron"}[kind]
            raise ValueError(
                f"{what} index {index} (kind {kind!r}, layer {layer}) is out of range: "
                f"this model has {n} per layer (0..{n - 1})"
            )

    def _check_kind(self, kind: str) -> None:
        if kind not in COMPONENT_KINDS:
            raise ValueError(f"unknown component kind {kind!r}; use one of {COMPONENT_KINDS}")

    # ----- where things live ----------------------------------------------------------
    def has_projection(self, projection: str) -> bool:
        return projection in self.spec.projections

    def projections_for(self, kind: str, projections: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The projections a component of ``kind`` touches (defaults: :data:`DEFAULT_PROJECTIONS`).

        Projections that this family lacks (GPT-2 has no gate) are dropped.
        """
        self._check_kind(kind)
        wanted = DEFAULT_PROJECTIONS[kind] if projections is None else tuple(projections)
        for p in wanted:
            if p not in DEFAULT_PROJECTIONS[kind]:
                raise ValueError(
                    f"a {kind!r} component cannot touch {p!r}; allowed: {DEFAULT_PROJECTIONS[kind]}"
                )
        return tuple(p for p in wanted if self.has_projection(p))

    def layers_path(self, model: nn.Module) -> str:
        """Dotted path of the decoder-layer ``ModuleList`` inside ``model`` (a PEFT model is unwrapped)."""
        model = unwrap_model(model)
        for path in self.spec.layers_paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList):
                return path
        raise UnsupportedArchitectureError(
            f"could not find the decoder layers of this {self.family} model at any of {self.spec.layers_paths}"
        )

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model`` (a PEFT model is unwrapped)."""
        return unwrap_model(model).get_submodule(self.layers_path(model))

    def module_path(self, model: nn.Module, layer: int, projection: str) -> str:
        """Dotted path from ``model`` to the module holding ``projection`` of ``layer``."""
        return f"{self.layers_path(model)}.{layer}.{self.spec.projections[projection].module}"

    def projection_module(self, model: nn.Module, layer: int, projection: str) -> nn.Module:
        """The module that holds ``projection`` in ``layer`` (for fused families, the fused module)."""
        return self.layers(model)[layer].get_submodule(self.spec.projections[projection].module)

    def offset(self, projection: str) -> int:
        """Start of ``projection``'s block inside its (possibly fused) module, in features."""
        a, b, c = self.spec.projections[projection].offset
        d = self.dims
        return a * d.n_heads * d.head_dim + b * d.n_kv_heads * d.head_dim + c * d.n_neurons

    def axis(self, projection: str) -> str:
        return self.spec.projections[projection].axis

    def feature_range(self, kind: str, index: int, projection: str) -> tuple[int, int]:
        """``[start, stop)`` of component ``(kind, index)`` in ``projection``'s module, along its axis."""
        width = 1 if kind == "mlp" else self.dims.head_dim
        start = self.offset(projection) + index * width
        return start, start + width

    def component_slices(
        self, component: Component | tuple[str, int, int], projections: tuple[str, ...] | None = None,
        model: nn.Module | None = None,
    ) -> list[WeightSlice]:
        """Every weight slice a component owns, one per projection it touches."""
        kind, layer, index = component
        self.validate(kind, layer, index)
        root = self.layers_path(model) if model is not None else self.spec.layers_paths[0]
        out = []
        for p in self.projections_for(kind, projections):
            start, stop = self.feature_range(kind, index, p)
            out.append(WeightSlice(f"{root}.{layer}.{self.spec.projections[p].module}", p, self.axis(p), start, stop))
        return out

    def qk_norm_site(self, kind: str) -> tuple[str, str] | None:
        """``(norm module path in a layer, layout)`` where a q/k head is read/written in families that
        normalise q/k after the projection (see :attr:`FamilySpec.qk_norm`); None otherwise."""
        if kind not in ("q", "k") or self.spec.qk_norm is None:
            return None
        q_norm, k_norm, layout = self.spec.qk_norm
        return (q_norm if kind == "q" else k_norm), layout

    def site(self, kind: str) -> tuple[str, str]:
        """Where interventions read/write a component's activation: ``(projection, axis)``.

        q/k/v: the projection's output (q/k: after the q/k norm where the family has one, see
        :meth:`qk_norm_site`); ``"o"`` (a head's output): the input of ``o_proj``; ``"mlp"``: the
        input of ``down_proj`` (the neuron's activation).
        """
        self._check_kind(kind)
        proj = _SITE_PROJECTION[kind]
        return proj, self.axis(proj)

    # ----- weights ----------------------------------------------------------------------
    @staticmethod
    def weight_dim(module: nn.Module, axis: str) -> int:
        """Dimension of ``module.weight`` indexed by features on ``axis``."""
        return _weight_dim(module, axis)

def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (or DDP wrapper); other models unchanged."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
        model = model.module  # DDP / accelerate wrappers
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def get_arch(model_or_config: Any) -> ModelArch:
    """The architecture map of a model, a PEFT model, or a ``PretrainedConfig``.

    Raises :class:`UnsupportedArchitectureError` (a ``ValueError``) naming the supported
    families when the model type is unknown.
    """
    if isinstance(model_or_config, nn.Module):
        model_or_config = unwrap_model(model_or_config)
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = family_for_model_type(model_type)
    text_type = getattr(_text_config(config), "model_type", model_type)
    return ModelArch(spec, _dims_from_config(config, spec), text_type or model_type)


def fingerprint_diff(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    diffs = []
    for key in sorted(set(expected) | set(actual)):
        if key == "model_type":
            continue  # gemma3 vs gemma3_text are the same text model
        if expected.get(key) != actual.get(key):
            diffs.append(f"{key}: adapter was made for {expected.get(key)!r}, this model has {actual.get(key)!r}")
    return diffs
