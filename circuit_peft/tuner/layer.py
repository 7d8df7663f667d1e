"""The circuit adapter layer: trainable deltas on chosen rows/columns of one linear weight.

Orientation: every delta is stored in ``nn.Linear`` orientation, whatever the base module
(a GPT-2 ``Conv1D`` keeps its weight transposed; only merge and ``get_delta_weight`` care).

* ``circuit_rows[a]``: (k_out, in) delta for output features ``circuit_row_index[a]`` (q/k/v heads,
  gate/up neurons); forward adds ``x @ delta.T`` into those outputs with ``index_add``.
* ``circuit_cols[a]``: (out, k_in) delta for input features ``circuit_col_index[a]`` (o_proj head
  columns, down_proj neuron columns); forward adds ``x[..., idx] @ delta.T``.
* ``circuit_lora_A[a]`` (r, in) / ``circuit_lora_B[a]`` (out, r): the optional LoRA branch,
  scaled by ``circuit_scaling[a] = lora_alpha / r``.

Training forwards (gradients on, >= ``MIN_FUSED_TOKENS`` input rows, one dtype, plain base layer whose weight
and bias are frozen) run base and slices as one matmul, :class:`_SliceLinear`, through the strategy
:class:`FusedSlices` (its ``applies`` is the whole guard); the ``index_add`` path above is the fallback (and the
path whenever the base weight or bias is trainable: they get their gradients there).

Merge keeps the base entries it overwrites in non-persistent buffers (``circuit_merged_rows/cols``), which
``.to()`` moves and casts with the weight; unmerge copies them back bit-exactly.

No full-size delta and no gradient mask: the frozen entries of the base weight are never touched,
so weight decay cannot move them and optimizer state is the size of the slices.
"""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..arch import ModelArch
from ..errors import CircuitPeftError

INIT_STD = 0.02  # std of the random deltas when init_weights=False


def index_digest(rows: list[int], cols: list[int]) -> torch.Tensor:
    """CRC-32 of the row and of the column indices, shape (2,), int64: saved with the deltas."""
    return torch.tensor([zlib.crc32(",".join(map(str, idx)).encode()) for idx in (rows, cols)], dtype=torch.long)


def is_4bit(module: nn.Module) -> bool:
    """Whether ``module``'s weight is a bitsandbytes 4-bit one (``Params4bit``; checked by name, as PEFT does,
    so that bitsandbytes is not imported)."""
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def weight_shape(module: nn.Module) -> torch.Size:
    """Shape of ``module``'s weight as stored unquantized (a 4-bit weight's packed tensor is (n/2, 1))."""
    weight = module.weight
    state = getattr(weight, "quant_state", None) if is_4bit(module) else None
    return state.shape if state is not None else weight.shape


class CircuitLayer(BaseTunerLayer):
    """Mixin holding the per-adapter circuit deltas of one (possibly fused) projection module."""

    adapter_layer_names: tuple[str, ...] = ("circuit_rows", "circuit_cols", "circuit_lora_A", "circuit_lora_B")
    other_param_names: tuple[str, ...] = (
        "circuit_row_index",
        "circuit_col_index",
        "circuit_index_digest",
        "circuit_scaling",
        "circuit_lora_dropout",
        "circuit_merged_rows",
        "circuit_merged_cols",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.circuit_rows = nn.ParameterDict({})
        self.circuit_cols = nn.ParameterDict({})
        self.circuit_lora_A = nn.ParameterDict({})
        self.circuit_lora_B = nn.ParameterDict({})
        # Indices are rebuilt from the config at load time, so they are not saved.
        self.circuit_row_index = BufferDict({}, persistent=False)
        self.circuit_col_index = BufferDict({}, persistent=False)
        # Saved with the deltas: a checksum of their indices, so a hand-edited config is refused at load.
        self.circuit_index_digest = BufferDict({}, persistent=True)
        self.circuit_scaling: dict[str, float] = {}
        self.circuit_lora_dropout = nn.ModuleDict({})
        # What merge overwrote (the chosen rows/columns of the base weight), for a bit-exact unmerge: buffers, so
        # that ``.to()`` moves and casts them with the weight; not saved (a saved adapter is never merged).
        self.circuit_merged_rows = BufferDict({}, persistent=False)
        self.circuit_merged_cols = BufferDict({}, persistent=False)
        self._disable_adapters = False
        self.merged_adapters = []
        self.is_conv1d = ModelArch.weight_dim(base_layer, "out") == 1
        shape = weight_shape(base_layer)
        self.out_features = shape[ModelArch.weight_dim(base_layer, "out")]
        self.in_features = shape[ModelArch.weight_dim(base_layer, "in")]

    def update_layer(
        self,
        adapter_name: str,
        rows: list[int],
        cols: list[int],
        r: int = 0,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Create adapter ``adapter_name``: deltas for output features ``rows`` and input features ``cols``."""
        if any(not 0 <= i < self.out_features for i in rows) or any(not 0 <= i < self.in_features for i in cols):
            raise CircuitPeftError(
                f"circuit slice out of range for a module with {self.out_features} outputs and {self.in_features} inputs"
            )
        weight = self.get_base_layer().weight
        device = weight.device
        if rows:
            self.circuit_row_index[adapter_name] = torch.tensor(rows, dtype=torch.long, device=device)
            self.circuit_rows[adapter_name] = nn.Parameter(torch.zeros(len(rows), self.in_features, device=device))
        if cols:
            self.circuit_col_index[adapter_name] = torch.tensor(cols, dtype=torch.long, device=device)
            self.circuit_cols[adapter_name] = nn.Parameter(torch.zeros(self.out_features, len(cols), device=device))
        self.circuit_index_digest[adapter_name] = index_digest(rows, cols).to(device)
        if r > 0:
            self.circuit_lora_A[adapter_name] = nn.Parameter(torch.zeros(r, self.in_features, device=device))
            self.circuit_lora_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, r, device=device))
            self.circuit_scaling[adapter_name] = float(lora_alpha if lora_alpha is not None else r) / r
            self.circuit_lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_circuit_parameters(adapter_name, init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_circuit_parameters(self, adapter_name: str, init_weights: bool) -> None:
        """Zero deltas (identity) if ``init_weights`` else small random ones; LoRA A is Kaiming-uniform."""
        for table in (self.circuit_rows, self.circuit_cols):
            if adapter_name in table:
                p = table[adapter_name]
                p.zero_() if init_weights else p.normal_(0.0, INIT_STD)
        if adapter_name in self.circuit_lora_A:
            nn.init.kaiming_uniform_(self.circuit_lora_A[adapter_name], a=math.sqrt(5))
            b = self.circuit_lora_B[adapter_name]
            b.zero_() if init_weights else b.normal_(0.0, INIT_STD)

    # ----- deltas -------------------------------------------------------------------------------
    def _linear_delta(self, adapter: str) -> torch.Tensor:
        """Dense (out, in) delta of ``adapter`` in ``nn.Linear`` orientation."""
        ref = next((t[adapter] for t in (self.circuit_rows, self.circuit_cols, self.circuit_lora_A) if adapter in t),
                   self.get_base_layer().weight)  # a layer that does not hold ``adapter``: zero delta
        dtype = ref.dtype if ref.is_floating_point() else torch.float32  # a 4-bit base's packed weight is uint8
        delta = torch.zeros(self.out_features, self.in_features, device=ref.device, dtype=dtype)
        if adapter in self.circuit_rows:
            delta.index_add_(0, self.circuit_row_index[adapter], self.circuit_rows[adapter])
        if adapter in self.circuit_cols:
            delta.index_add_(1, self.circuit_col_index[adapter], self.circuit_cols[adapter])
        if adapter in self.circuit_lora_A:
            delta = delta + self.circuit_scaling[adapter] * (self.circuit_lora_B[adapter] @ self.circuit_lora_A[adapter])
        return delta

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense delta of ``adapter`` shaped like the base weight (transposed for ``Conv1D``)."""
        delta = self._linear_delta(adapter)
        return delta.T if self.is_conv1d else delta

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # A head/neuron slice delta has rank <= slice width: an SVD at that rank is exact.
        return True

    def _has_adapter(self, adapter: str) -> bool:
        return any(adapter in t for t in (self.circuit_rows, self.circuit_cols, self.circuit_lora_A))

    # ----- merge ---------------------------------------------------------------------------------
    def _linear_view(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.is_conv1d else weight

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the deltas into the base weight; only the chosen slices change (plus LoRA if on)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for adapter in adapter_names:
            if not self._has_adapter(adapter):
                continue
            with torch.no_grad():
                w = self._linear_view(base.weight.data)
                rows_before = w.index_select(0, self.circuit_row_index[adapter]) if adapter in self.circuit_rows else None
                cols_before = w.index_select(1, self.circuit_col_index[adapter]) if adapter in self.circuit_cols else None
                new = w.clone() if safe_merge else w
                if adapter in self.circuit_rows:
                    new.index_add_(0, self.circuit_row_index[adapter], self.circuit_rows[adapter].to(w.dtype))
                if adapter in self.circuit_cols:
                    new.index_add_(1, self.circuit_col_index[adapter], self.circuit_cols[adapter].to(w.dtype))
                if adapter in self.circuit_lora_A:
                    new += self._lora_delta(adapter).to(w.dtype)
                if safe_merge:
                    if not torch.isfinite(new).all():
                        raise CircuitPeftError(  # PEFT's text, so that code matching it keeps working
                            f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                    w.copy_(new)
            if rows_before is not None:
                self.circuit_merged_rows[adapter] = rows_before
            if cols_before is not None:
                self.circuit_merged_cols[adapter] = cols_before
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo :meth:`merge`; the chosen slices are restored bit-exactly from a snapshot."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            with torch.no_grad():
                w = self._linear_view(base.weight.data)
                if adapter in self.circuit_lora_A:
                    w -= self._lora_delta(adapter).to(w.dtype)
                if adapter in self.circuit_merged_cols:
                    w.index_copy_(1, self.circuit_col_index[adapter], self.circuit_merged_cols.pop(adapter).to(w))
                if adapter in self.circuit_merged_rows:
                    w.index_copy_(0, self.circuit_row_index[adapter], self.circuit_merged_rows.pop(adapter).to(w))

    def _lora_delta(self, adapter: str) -> torch.Tensor:
        return self.circuit_scaling[adapter] * (self.circuit_lora_B[adapter] @ self.circuit_lora_A[adapter])


def _with_slices(weight: torch.Tensor, row_index: Optional[torch.Tensor], rows: Optional[torch.Tensor],
                 col_index: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> torch.Tensor:
    """``weight`` (out, in) plus the row deltas (k_out, in) and column deltas (out, k_in) scattered in: a new tensor."""
    if rows is not None:
        weight = weight.index_add(0, row_index, rows)
    if cols is not None:
        weight = weight.index_add(1, col_index, cols)
    return weight


class _SliceLinear(torch.autograd.Function):
    """``x @ (W + slice deltas).T + b``: one matmul forward and one for the input gradient, as for the frozen
    layer alone, plus each slice's own weight gradient ((k_out, in) and (out, k_in) matmuls). The summed
    weight is rebuilt in backward, not saved (its size is the frozen weight's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                row_index: Optional[torch.Tensor], rows: Optional[torch.Tensor], col_index: Optional[torch.Tensor],
                cols: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight if ctx.needs_input_grad[0] else None, row_index, rows, col_index, cols)
        return F.linear(x, _with_slices(weight, row_index, rows, col_index, cols), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight, row_index, rows, col_index, cols = ctx.saved_tensors
        grad_x = grad_rows = grad_cols = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _with_slices(weight, row_index, rows, col_index, cols)
        grad2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[4]:
            grad_rows = grad2.index_select(1, row_index).T @ x2
        if ctx.needs_input_grad[6]:
            grad_cols = grad2.T @ x2.index_select(1, col_index)
        return grad_x, None, None, None, grad_rows, None, grad_cols


MIN_FUSED_TOKENS = 128  # below ~this many input rows the (out, in) weight copies of the fused path cost more than they save


class FusedSlices:
    """The training forward of one adapter's slices as one matmul, :class:`_SliceLinear` (a strategy of
    :class:`CircuitLinear`; the LoRA branch is added after it). :meth:`applies` is its whole guard: every
    condition under which the result and all gradients equal the base-then-add path's."""

    def __init__(self, min_tokens: Optional[int] = None) -> None:
        self.min_tokens = min_tokens  # None: the module's MIN_FUSED_TOKENS at call time

    def applies(self, layer: "CircuitLinear", x: torch.Tensor, active: list[str], args: tuple, kwargs: dict) -> bool:
        """Whether ``layer``'s forward of ``x`` with ``active`` adapters (and extra ``args``/``kwargs`` for the base)
        may fuse: one active adapter, unmerged and enabled, whose slices need gradients; a plain ``nn.Linear``/
        ``Conv1D`` base without hooks, extra arguments or an accelerate hook, whose weight (a plain tensor) and bias
        are frozen (_SliceLinear gives them no gradient); one dtype throughout, no autocast; enough rows."""
        if len(active) != 1 or args or kwargs or layer.merged or layer.disable_adapters or not torch.is_grad_enabled():
            return False
        base, adapter = layer.base_layer, active[0]
        slices = [t[adapter] for t in (layer.circuit_rows, layer.circuit_cols) if adapter in t]
        min_tokens = MIN_FUSED_TOKENS if self.min_tokens is None else self.min_tokens
        return (any(p.requires_grad for p in slices)
                and type(base) in (nn.Linear, Conv1D) and not hasattr(base, "_hf_hook")
                and type(base.weight) in (nn.Parameter, torch.Tensor)
                and not any(p is not None and p.requires_grad for p in (base.weight, base.bias))
                and not (base._forward_hooks or base._forward_pre_hooks)
                and not torch.is_autocast_enabled(x.device.type)
                and all(t.dtype == x.dtype for t in (base.weight, *slices))
                and x.shape[-1] == layer.in_features and x.numel() >= min_tokens * layer.in_features)

    def __call__(self, layer: "CircuitLinear", x: torch.Tensor, adapter: str) -> torch.Tensor:
        """Base output plus ``adapter``'s slices of ``layer`` in one :class:`_SliceLinear`."""
        base = layer.base_layer
        has_rows, has_cols = adapter in layer.circuit_rows, adapter in layer.circuit_cols
        return _SliceLinear.apply(
            x, layer._linear_view(base.weight), base.bias,
            layer.circuit_row_index[adapter] if has_rows else None, layer.circuit_rows[adapter] if has_rows else None,
            layer.circuit_col_index[adapter] if has_cols else None, layer.circuit_cols[adapter] if has_cols else None)


class CircuitLinear(nn.Module, CircuitLayer):
    """Wraps an ``nn.Linear`` or GPT-2 ``Conv1D`` with circuit deltas (and an optional LoRA branch)."""

    fused = FusedSlices()  # the one-matmul training forward (its guard: FusedSlices.applies)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        CircuitLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        """Refuse saved deltas whose index checksum differs from the indices the config gives here."""
        key = prefix + "circuit_index_digest."
        for name, saved in ((k[len(key):], v) for k, v in state_dict.items() if k.startswith(key)):
            if name in self.circuit_index_digest and not torch.equal(saved.to(self.circuit_index_digest[name]),
                                                                     self.circuit_index_digest[name]):
                raise CircuitPeftError(
                    f"adapter {name!r}, module {prefix.rstrip('.')}: the saved deltas were trained for other head/"
                    "neuron indices than adapter_config.json lists (was the config edited?); refusing to apply "
                    "them to the wrong components")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _add_lora(self, x: torch.Tensor, result: torch.Tensor, adapter: str) -> torch.Tensor:
        """``result`` plus ``adapter``'s LoRA branch (if it has one)."""
        if adapter not in self.circuit_lora_A:
            return result
        a, b = self.circuit_lora_A[adapter], self.circuit_lora_B[adapter]
        h = self.circuit_lora_dropout[adapter](self._cast_input_dtype(x, a.dtype))
        return result + (F.linear(F.linear(h, a), b) * self.circuit_scaling[adapter]).to(result.dtype)

    def _add_adapter(self, x: torch.Tensor, result: torch.Tensor, adapter: str) -> torch.Tensor:
        """``result`` (the base output for input ``x``) plus ``adapter``'s slice and LoRA updates."""
        out_dtype = result.dtype
        if adapter in self.circuit_rows:
            delta = self.circuit_rows[adapter]
            upd = self._cast_input_dtype(x, delta.dtype) @ delta.T  # (..., k_out)
            result = result.index_add(-1, self.circuit_row_index[adapter], upd.to(out_dtype))
        if adapter in self.circuit_cols:
            delta = self.circuit_cols[adapter]
            xs = self._cast_input_dtype(x.index_select(-1, self.circuit_col_index[adapter]), delta.dtype)
            result = result + (xs @ delta.T).to(out_dtype)
        return self._add_lora(x, result, adapter)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        """Row ``i`` of the batch gets adapter ``adapter_names[i]`` (``"__base__"``: none), as LoRA does."""
        result = self.base_layer(x, *args, **kwargs)
        if len(adapter_names) != x.shape[0]:
            raise CircuitPeftError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows")
        for adapter in sorted(set(adapter_names) - {"__base__"}):
            if not self._has_adapter(adapter):
                continue
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == adapter], device=x.device)
            result = result.index_copy(0, rows, self._add_adapter(x[rows], result[rows], adapter))
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if self._has_adapter(a)]
        if self.fused.applies(self, x, active, args, kwargs):  # training: one matmul
            return self._add_lora(x, self.fused(self, x, active[0]), active[0])
        result = self.base_layer(x, *args, **kwargs)
        for adapter in active:
            result = self._add_adapter(x, result, adapter)
        return result

    def __repr__(self) -> str:
        return "circuit." + super().__repr__()


def dispatch_default(target: nn.Module, adapter_name: str, module_name: str, **kwargs: Any) -> Optional[CircuitLinear]:
    """A :class:`CircuitLinear` around ``target`` when its base layer is an ``nn.Linear`` or GPT-2 ``Conv1D``; else
    None (the last of ``circuit_peft.tuner.model.DISPATCHERS``, as PEFT's LoRA ``dispatch_default``)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, (nn.Linear, Conv1D)):
        return None
    return CircuitLinear(target, adapter_name, **kwargs)
