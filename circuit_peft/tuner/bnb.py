"""The circuit adapter on a bitsandbytes 4-bit base (QLoRA-style), dispatched as PEFT dispatches LoRA onto
``bnb.nn.Linear4bit`` (``peft/tuners/lora/bnb.py``, ``dispatch_bnb_4bit``).

The base weight stays quantized (NF4 or FP4) and frozen; the slice deltas (and the optional LoRA branch) live
in their own float32 tensors. Forward: the 4-bit layer's output (its weight dequantized to the compute dtype
inside bitsandbytes' matmul, every call) plus the slice and LoRA updates, computed as in
:class:`~circuit_peft.tuner.layer.CircuitLinear` (the fused one-matmul path needs a plain ``nn.Linear`` and is
never taken here). Merge and unmerge dequantize the whole weight, add (subtract) the dense delta and quantize
again, so they round, as PEFT's LoRA merge onto a 4-bit layer does, and warn as it does.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..errors import CircuitPeftError
from .layer import CircuitLinear, is_4bit


def _unpack_cpu_layout(base: nn.Module) -> None:
    """Give ``base``'s weight back its standard 4-bit layout if bitsandbytes repacked it for CPU inference.

    On an AVX512-BF16 CPU, ``Linear4bit.forward`` in eval mode without gradients repacks the weight in place
    (``packing_format_for_cpu``; the block scales ``absmax`` become a transposed bfloat16 (in/64, out) table).
    ``dequantize_4bit`` does not read that layout, and bitsandbytes 0.50's own inverse (which its
    ``_save_to_state_dict`` runs) leaves a non-nested ``absmax`` transposed, so the weight it restores is
    wrong. Here the inverse is applied and that ``absmax`` put back in order (bfloat16-rounded, as the
    repacked forward used it)."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    nested = state.original_nested
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32)
    weight.data, weight.quant_state = data, state


def unpack_cpu_layouts(model: nn.Module) -> None:
    """:func:`_unpack_cpu_layout` on every 4-bit linear of ``model`` (before its state dict is read: a saved
    adapter reads the whole model's, and the base's own inverse would scramble every repacked layer)."""
    for module in model.modules():
        if is_4bit(module):
            _unpack_cpu_layout(module)


def _dequantized(base: nn.Module) -> torch.Tensor:
    """The 4-bit ``base``'s weight as a dense (out, in) tensor in the dtype it was quantized from."""
    from peft.utils.integrations import dequantize_bnb_weight

    _unpack_cpu_layout(base)
    return dequantize_bnb_weight(base.weight, state=base.weight.quant_state)


def _requantize(base: nn.Module, weight: torch.Tensor) -> None:
    """Replace ``base``'s 4-bit weight by ``weight`` quantized with the same settings (PEFT's LoRA merge recipe)."""
    import bitsandbytes as bnb

    old = base.weight
    kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k != "data"}
    kwargs["bnb_quantized"] = False
    kwargs["requires_grad"] = False
    base.weight = bnb.nn.Params4bit(weight.to("cpu"), **kwargs).to(old.device)


class CircuitLinear4bit(CircuitLinear):
    """:class:`CircuitLinear` over a ``bnb.nn.Linear4bit``: float32 deltas on a quantized, frozen base."""

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Dequantize, add each adapter's dense delta, quantize again (rounds every block the delta touches)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if not self._has_adapter(adapter):
                continue
            warnings.warn("Merge circuit module to 4-bit linear may get different generations due to rounding errors.")
            with torch.no_grad():
                w = _dequantized(base)
                new = w + self._linear_delta(adapter).to(w)
                if safe_merge and not torch.isfinite(new).all():
                    raise CircuitPeftError(  # PEFT's text, so that code matching it keeps working
                        f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                _requantize(base, new)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Dequantize, subtract the merged deltas, quantize again (not bit-exact: a second rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            warnings.warn(
                "Unmerge circuit module to 4-bit linear may get different generations due to rounding errors.")
            with torch.no_grad():
                w = _dequantized(base)
                _requantize(base, w - self._linear_delta(adapter).to(w))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # runs before the base layer's own save, whose inverse of the CPU repacking would corrupt the weight
        _unpack_cpu_layout(self.get_base_layer())
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def __repr__(self) -> str:
        return "circuit.4bit." + nn.Module.__repr__(self)


def dispatch_bnb_4bit(target: nn.Module, adapter_name: str, module_name: str,
                      **kwargs: Any) -> Optional[CircuitLinear4bit]:
    """A :class:`CircuitLinear4bit` around ``target`` when its base layer is a bitsandbytes 4-bit linear; else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not is_4bit(base):
        return None
    return CircuitLinear4bit(target, adapter_name, **kwargs)


def dispatch_bnb_8bit(target: nn.Module, adapter_name: str, module_name: str, **kwargs: Any) -> None:
    """Refuse a bitsandbytes 8-bit base (``TypeError`` naming ``module_name``): merge would add float deltas into
    its int8 codes. None for any other base."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if type(getattr(base, "weight", None)).__name__ == "Int8Params":  # by name, so bitsandbytes is not imported
        raise TypeError(f"module {module_name!r} is a bitsandbytes 8-bit layer: circuit adapters support 4-bit "
                        "bases (load_in_4bit) and unquantized ones, not 8-bit")
    return None
