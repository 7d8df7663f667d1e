"""``CircuitModel``: the PEFT tuner that injects :class:`CircuitLinear` layers where a circuit lives."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..arch import PROJECTIONS, ModelArch, fingerprint_diff, get_arch, unwrap_model
from ..errors import CircuitPeftError
from ..interventions import stop_gradient_below
from .config import CircuitConfig
from .bnb import dispatch_bnb_4bit, dispatch_bnb_8bit, unpack_cpu_layouts
from .layer import CircuitLayer, CircuitLinear, dispatch_default, weight_shape
from .saving import check_saved_adapter


# Base-layer dispatchers, tried in order (as PEFT's LoRA tries its ``dispatch_*``): each returns the circuit layer
# for a target it handles, None for one it does not, or raises for one it refuses.
DISPATCHERS: list[Callable[..., Optional[CircuitLinear]]] = [dispatch_bnb_8bit, dispatch_bnb_4bit, dispatch_default]


@dataclass
class ModulePlan:
    """What one adapter puts on one module: output features ``rows``, input features ``cols``, LoRA or not."""

    layer: int
    rows: set[int] = field(default_factory=set)
    cols: set[int] = field(default_factory=set)
    lora: bool = False


def build_plan(config: CircuitConfig, model: nn.Module, layers: Optional[set[int]] = None) -> dict[str, ModulePlan]:
    """Module path (from the transformers model root) -> :class:`ModulePlan` for ``config`` on ``model``
    (only the modules of ``layers``, when given).

    Raises ``ValueError`` for an unsupported family or a component/layer index out of range.
    """
    arch = get_arch(model)
    plan: dict[str, ModulePlan] = {}
    for comp in config.component_list():
        if layers is not None and comp.layer not in layers:
            continue
        for s in arch.component_slices(comp, config.projections_for_kind(comp.kind), model):
            entry = plan.setdefault(s.module, ModulePlan(layer=comp.layer))
            (entry.rows if s.axis == "out" else entry.cols).update(range(s.start, s.stop))
    if config.r > 0:
        for entry in plan.values():
            entry.lora = True
        if config.lora_target_modules is not None:
            names = PROJECTIONS if config.lora_target_modules == "all" else config.lora_target_modules
            names = [p for p in names if arch.has_projection(p)]
            for layer in range(arch.dims.n_layers) if layers is None else sorted(layers):
                for p in names:
                    plan.setdefault(arch.module_path(model, layer, p), ModulePlan(layer=layer)).lora = True
    return plan


def module_plan(config: CircuitConfig, model: nn.Module, path: str) -> Optional[ModulePlan]:
    """:func:`build_plan`'s entry for the one module at ``path`` (None: ``config`` puts nothing there); only the
    components of that module's layer are laid out."""
    prefix = get_arch(model).layers_path(model) + "."
    index = path[len(prefix):].split(".", 1)[0] if path.startswith(prefix) else ""
    return build_plan(config, model, layers={int(index)} if index.isdigit() else None).get(path)


def lowest_trained_layer(configs: list[CircuitConfig], model: nn.Module) -> int:
    """Lowest layer any of ``configs`` trains on ``model`` (0 when something below the layers, e.g. an
    embedding, trains)."""
    if any(c.modules_to_save or c.trainable_token_indices for c in configs):
        return 0
    layers = [e.layer for c in configs for e in build_plan(c, model).values()]
    return min(layers) if layers else 0


def _adapter_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            for name in m.adapter_layer_names:
                ids.update(id(p) for p in getattr(m, name).parameters())
        if isinstance(m, AuxiliaryTrainingWrapper) and hasattr(m, "modules_to_save"):
            ids.update(id(p) for p in m.modules_to_save.parameters())
    return ids


def _base_param_count(model: nn.Module) -> int:
    base = unwrap_model(model)
    skip = _adapter_param_ids(base)
    return sum(_unpacked_numel(p) for p in base.parameters() if id(p) not in skip)


def _unpacked_numel(p: torch.Tensor) -> int:
    """Entries of ``p`` as a model has them (a bitsandbytes 4-bit weight packs two per stored byte)."""
    state = getattr(p, "quant_state", None) if type(p).__name__ == "Params4bit" else None
    return state.shape.numel() if state is not None else p.numel()


def _module_shape(root: nn.Module, path: str) -> tuple[int, int]:
    """(out_features, in_features) of the module at ``path`` (unwrapping a tuner layer)."""
    module = root.get_submodule(path)
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    out_dim, shape = ModelArch.weight_dim(module, "out"), weight_shape(module)
    return shape[out_dim], shape[1 - out_dim]


def circuit_size(config: CircuitConfig, model: nn.Module) -> dict[str, Any]:
    """How big a circuit is on ``model`` (a base model or a PEFT model).

    Returns ``components`` (chosen q + k + v heads + MLP neurons, as in the paper),
    ``total_components`` (all of them in the model), ``component_fraction``,
    ``trainable_params`` (circuit slice entries plus the LoRA branch; not ``modules_to_save``),
    ``total_params`` (base model parameters) and ``param_fraction``.
    """
    arch = get_arch(model)
    base = unwrap_model(model)
    plan = build_plan(config, base)
    counted = [c for c in config.component_list() if c.kind in ("q", "k", "v", "mlp")]
    total_components = sum(arch.num_components(k) for k in ("q", "k", "v", "mlp")) * arch.dims.n_layers
    trainable = 0
    for path, entry in plan.items():
        out_f, in_f = _module_shape(base, path)
        trainable += len(entry.rows) * in_f + len(entry.cols) * out_f
        if entry.lora:
            trainable += config.r * (in_f + out_f)
    total = _base_param_count(base)
    return {
        "components": len(counted),
        "total_components": total_components,
        "component_fraction": len(counted) / total_components,
        "trainable_params": trainable,
        "total_params": total,
        "param_fraction": trainable / total,
    }


def model_card_section(config: CircuitConfig, adapter_name: str = "default") -> str:
    """Markdown describing a circuit adapter: method, base fingerprint, trained components."""
    lines = [
        f"## Circuit adapter (`{adapter_name}`)",
        "",
        "Method: **circuit-peft `CircuitConfig`** (PEFT type `CIRCUIT`): only the listed attention heads and MLP "
        "neurons are trained; every other weight is frozen. Load with `import circuit_peft` before "
        "`PeftModel.from_pretrained`.",
        "",
        f"- projections: `{config.projections}`",
    ]
    if config.r > 0:
        lines.append(
            f"- LoRA branch: r={config.r}, lora_alpha={config.lora_alpha}, "
            "on the circuit modules"
            + (f" and on {config.lora_target_modules} in every layer" if config.lora_target_modules else "")
        )
    if config.base_model_fingerprint:
        fp = config.base_model_fingerprint
        lines.append("- base model: " + ", ".join(f"{k}={v}" for k, v in fp.items()))
    lines += ["", "| kind | layer | indices |", "| --- | --- | --- |"]
    names = {"q": "query head", "k": "key head", "v": "value head", "o": "output slice", "mlp": "MLP neuron"}
    for kind, layers in config.components.items():
        for layer, indices in layers.items():
            lines.append(f"| {names[kind]} | {layer} | {', '.join(map(str, indices))} |")
    return "\n".join(lines) + "\n"


_CARD_MARKER = "## Circuit adapter ("


def add_model_card_sections(model: Any, output_dir: str) -> None:
    """After PEFT wrote ``output_dir/README.md`` for ``model`` (a ``PeftModel``): tag it and add (or replace) one
    :func:`model_card_section` per CIRCUIT adapter (installed by ``circuit_peft.compat.patch_model_card``)."""
    circuits = {n: c for n, c in model.peft_config.items() if isinstance(c, CircuitConfig)}
    if not circuits:
        return
    from huggingface_hub import ModelCard

    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path)
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | {"circuit-peft", "circuit"})
    text = card.text
    for name, config in circuits.items():
        marker = f"{_CARD_MARKER}`{name}`)"
        if marker in text:  # replace a previous save's section
            head, _, rest = text.partition(marker)
            nxt = rest.find("\n## ")
            text = head.rstrip("\n") + ("\n" + rest[nxt + 1 :] if nxt >= 0 else "")
        text = text.rstrip("\n") + "\n\n" + model_card_section(config, name)
    card.text = text
    card.save(path)


def _inject_adapter_names(_module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class CircuitModel(BaseTuner):
    """Trains only the chosen heads and neurons of a transformers model (see :class:`CircuitConfig`).

    One :class:`CircuitLinear` wraps every module the circuit touches; a fused module (Phi-3
    ``qkv_proj``, GPT-2 ``c_attn``) holds the slices of all its logical projections. When nothing
    trainable sits below layer L, the residual entering layer L is detached so no backward work is
    done below it.
    """

    prefix: str = "circuit_"
    tuner_layer_cls = CircuitLayer
    target_module_mapping: dict[str, list[str]] = {}
    _gradient_stop: Optional[RemovableHandle] = None  # the cut below the lowest trained layer (None: no cut)

    # ----- config and plan ------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: CircuitConfig, model_config: dict) -> CircuitConfig:
        return peft_config  # target_modules are derived from the model in _prepare_model

    def _prepare_model(self, peft_config: CircuitConfig, model: nn.Module) -> None:
        arch = get_arch(model)
        fingerprint = arch.fingerprint()
        loaded_from = peft_config._loaded_from
        if loaded_from is not None:
            check_saved_adapter(loaded_from, peft_config.weights_sha256)  # before any weight is read
        if peft_config.base_model_fingerprint is None:
            if loaded_from is not None and peft_config.check_base_model:
                raise CircuitPeftError(
                    f"the circuit adapter at {loaded_from} has no base_model_fingerprint in adapter_config.json, "
                    "so nothing shows it was made for this model (its head and neuron indices would be applied "
                    "blindly). If you know it was: config = CircuitConfig.from_pretrained(path); "
                    "config.check_base_model = False; PeftModel.from_pretrained(model, path, config=config)")
            peft_config.base_model_fingerprint = fingerprint
        else:
            diffs = fingerprint_diff(peft_config.base_model_fingerprint, fingerprint)
            if diffs:
                raise CircuitPeftError(
                    "this circuit adapter was made for a different base model (" + "; ".join(diffs) + "). "
                    "Load it onto the model it was trained on."
                )
        peft_config.target_modules = sorted(build_plan(peft_config, model))
        # The folder was checked for the load (if any) that follows this injection; the config now describes
        # this adapter, so reusing the object seeds a new one and reads nothing from that folder (which a later
        # save may have changed: its weights would no longer match the recorded digest).
        if loaded_from is not None:
            del peft_config._loaded_from

    def _create_and_replace(
        self,
        peft_config: CircuitConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        entry = module_plan(peft_config, self.model, current_key)  # from the config: no state kept between calls
        if entry is None:
            raise CircuitPeftError(f"module {current_key!r} matched the circuit's target_modules but is not in its plan")
        kwargs = dict(
            rows=sorted(entry.rows),
            cols=sorted(entry.cols),
            r=peft_config.r if entry.lora else 0,
            lora_alpha=peft_config.lora_alpha,
            lora_dropout=peft_config.lora_dropout,
            init_weights=peft_config.init_weights,
        )
        if isinstance(target, CircuitLayer):
            target.update_layer(adapter_name, inference_mode=peft_config.inference_mode, **kwargs)
            return
        new_module = self._create_new_module(target, adapter_name, current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(target: nn.Module, adapter_name: str, module_name: str, **kwargs: Any) -> CircuitLinear:
        """The first of :data:`DISPATCHERS` that takes ``target`` builds its circuit layer (PEFT's LoRA idiom)."""
        for dispatcher in DISPATCHERS:
            new_module = dispatcher(target, adapter_name, module_name, **kwargs)
            if new_module is not None:
                return new_module
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        raise TypeError(f"circuit adapters support nn.Linear and Conv1D modules, not {type(base).__name__}")

    # ----- speed: no backward below the lowest trained layer ---------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._update_gradient_stop()

    def _remove_gradient_stop(self) -> None:
        if self._gradient_stop is not None:
            self._gradient_stop.remove()
            self._gradient_stop = None

    def _update_gradient_stop(self) -> None:
        self._remove_gradient_stop()
        configs = [c for c in self.peft_config.values() if isinstance(c, CircuitConfig)]
        if not configs:
            return
        lowest = lowest_trained_layer(configs, self.model)
        if lowest <= 0:
            return
        arch = get_arch(self.model)
        layers = arch.layers(self.model)
        watch = [p for i in range(lowest) for p in layers[i].parameters()]
        embeddings = self.model.get_input_embeddings()
        if embeddings is not None:
            watch += list(embeddings.parameters())
        self._gradient_stop = stop_gradient_below(self.model, lowest, watch=watch, arch=arch)

    @property
    def lowest_trained_layer(self) -> Optional[int]:
        """Layer whose input is detached during training (None: gradients reach the embeddings)."""
        if self._gradient_stop is None:
            return None
        return lowest_trained_layer([c for c in self.peft_config.values() if isinstance(c, CircuitConfig)], self.model)

    # ----- mixed-adapter batches (as LoRA: ``model(**batch, adapter_names=[...])``) --------------------
    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise CircuitPeftError("Cannot pass `adapter_names` when the model is in training mode.")
        if any(m.merged for m in self.modules() if isinstance(m, CircuitLayer)):
            raise CircuitPeftError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        unexpected = {n for n in adapter_names if n != "__base__"} - set(self.peft_config)
        if unexpected:
            raise CircuitPeftError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
        beams = kwargs.get("num_beams")
        names = [n for n in adapter_names for _ in range(beams)] if isinstance(beams, int) and beams > 1 else adapter_names
        handles = [m.register_forward_pre_hook(partial(_inject_adapter_names, adapter_names=list(names)), with_kwargs=True)
                   for m in self.modules() if isinstance(m, CircuitLayer)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's delete; the adapters active afterwards are chosen on the model, not on its first adapter
        layer (PEFT's rule), because a CIRCUIT adapter may leave that layer holding none of the rest."""
        remaining = [a for a in self.active_adapters if a != adapter_name]
        super().delete_adapter(adapter_name)
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining and self.active_adapters != remaining:
            self.set_adapter(remaining if len(remaining) > 1 else remaining[0])
        self._update_gradient_stop()

    def train(self, mode: bool = True) -> "CircuitModel":
        # a 4-bit base repacked for CPU inference by an eval forward runs a kernel that passes no correct input
        # gradient: training starts from the standard layout (tuner/bnb.py), which eval mode alone repacks
        if mode:
            unpack_cpu_layouts(self.model)
        return super().train(mode)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # before any child's: a 4-bit base that bitsandbytes repacked for CPU inference is restored correctly
        # here (its own inverse, run by each 4-bit layer's save, scrambles the block scales: tuner/bnb.py)
        unpack_cpu_layouts(self.model)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> torch.nn.Module:
        self._remove_gradient_stop()
        return super()._unload_and_optionally_merge(*args, **kwargs)
