"""Component-level hooks: the only module that registers forward hooks (bar the tuner's
``adapter_names`` pre-hook, PEFT's own mixed-batch pattern).

Built on :mod:`circuit_peft.arch`, so every function works on every supported family.
Every function here is a context manager (hooks are always removed on exit) or a plain
function that uses one.

Shapes: ``B`` batch, ``T`` sequence, ``n`` components of a kind per layer, ``w`` the
component width (``head_dim`` for heads, 1 for neurons), ``D`` hidden size.

* :func:`edit_components` - the primitive: rewrite the (B, T, n, w) block of one kind at one layer.
* :func:`scale_components` - multiply components by factors (DCM masks), optionally at given positions.
* :func:`ablate_heads` - uniform / zero / mean ablation of head outputs, per batch row if wanted.
* :func:`capture_components` - record the (B, T, n, w) block of one kind at some layers.
* :func:`capture_qk` - record query and key states after rotary embedding, from the attention call.
* :func:`capture_module_output` - record what a module (a whole model, say) returns.
* :func:`accumulate_weight_grads` - the weight gradient of linear modules whose weight holds none (4-bit).
* :func:`capture_layer_input` / :func:`start_at_layer` / :func:`forward_until` - cache the residual
  stream entering a layer, re-run only the layers from there, stop the forward after a layer.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .arch import ModelArch, get_arch

BlockFn = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (caught by :func:`forward_until`)."""


# ----- the primitive ------------------------------------------------------------------------


def _block_bounds(arch: ModelArch, kind: str) -> tuple[str, int, int, int]:
    """(projection, start, n, w) of kind's block at its site."""
    proj, _ = arch.site(kind)
    n = arch.num_components(kind)
    w = 1 if kind == "mlp" else arch.dims.head_dim
    return proj, arch.offset(proj), n, w


def _rewrite(x: torch.Tensor, start: int, n: int, w: int, fn: BlockFn) -> torch.Tensor:
    block = x[..., start : start + n * w].unflatten(-1, (n, w))
    new = fn(block)
    if new is block:
        return x
    out = x.clone()
    out[..., start : start + n * w] = new.flatten(-2)
    return out


def _to_blocks(x: torch.Tensor, layout: str, n: int, w: int) -> torch.Tensor:
    """A q/k norm's output as ``(B, T, n, w)`` (a view where possible)."""
    if layout == "BHTD":
        return x.transpose(1, 2)
    return x if layout == "BTHD" else x.unflatten(-1, (n, w))


def _from_blocks(block: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BHTD":
        return block.transpose(1, 2)
    return block if layout == "BTHD" else block.flatten(-2)


@contextmanager
def _edit_after_qk_norm(norm: nn.Module, layout: str, n: int, w: int, fn: BlockFn) -> Iterator[None]:
    """Rewrite q/k heads at the output of the family's q/k norm (before rotary embedding)."""
    def hook(_m, _args, output):
        block = _to_blocks(output, layout, n, w)
        new = fn(block)
        return output if new is block else _from_blocks(new, layout)

    handle = norm.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def edit_components(model: nn.Module, kind: str, layer: int, fn: BlockFn, arch: ModelArch | None = None) -> Iterator[None]:
    """While active, ``fn`` rewrites the (B, T, n, w) activations of ``kind`` at ``layer``.

    q/k/v: the projection's output block; ``"o"``: each head's output entering ``o_proj``;
    ``"mlp"``: each neuron's activation entering ``down_proj``. ``fn`` must return a tensor
    of the same shape (or its input unchanged). Gradients flow through the edit.
    """
    arch = arch or get_arch(model)
    proj, start, n, w = _block_bounds(arch, kind)
    norm_site = arch.qk_norm_site(kind)
    if norm_site is not None:
        with _edit_after_qk_norm(arch.layers(model)[layer].get_submodule(norm_site[0]), norm_site[1], n, w, fn):
            yield
        return
    module = arch.projection_module(model, layer, proj)
    if arch.axis(proj) == "out":
        def hook(_m, _args, output):
            return _rewrite(output, start, n, w, fn)

        handle = module.register_forward_hook(hook)
    else:
        def pre_hook(_m, args, kwargs):
            if args:
                return (_rewrite(args[0], start, n, w, fn), *args[1:]), kwargs
            key = next(iter(kwargs))
            kwargs[key] = _rewrite(kwargs[key], start, n, w, fn)
            return args, kwargs

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _rows_positions_mask(block: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T, 1, 1) float mask that is 1 at ``positions[b]`` of each row b (None: everywhere)."""
    if positions is None:
        return None
    B, T = block.shape[:2]
    pos = positions.to(block.device).long()
    pos = torch.where(pos < 0, pos + T, pos)
    sel = torch.zeros(B, T, dtype=block.dtype, device=block.device)
    sel[torch.arange(B, device=block.device), pos] = 1.0
    return sel[:, :, None, None]


@contextmanager
def scale_components(
    model: nn.Module,
    scales: dict[str, torch.Tensor],
    positions: torch.Tensor | None = None,
    arch: ModelArch | None = None,
) -> Iterator[None]:
    """Multiply components by factors.

    ``scales[kind]``: (n_layers, n) factors (may require grad, e.g. DCM's ``2*m``).
    ``positions``: (B,) position per row where the scaling applies (negative counts from the
    end; None: every position).
    """
    arch = arch or get_arch(model)
    with ExitStack() as stack:
        for kind, factors in scales.items():
            for layer in range(arch.dims.n_layers):
                def fn(block, f=factors[layer]):
                    f = f.to(block.dtype)[None, None, :, None]
                    sel = _rows_positions_mask(block, positions)
                    return block * f if sel is None else block * (1 + sel * (f - 1))

                stack.enter_context(edit_components(model, kind, layer, fn, arch))
        yield


# ----- capture ----------------------------------------------------------------------------------


@contextmanager
def capture_components(
    model: nn.Module, kind: str, layers: Iterable[int], detach: bool = True, arch: ModelArch | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the (B, T, n, w) block of ``kind`` at each layer into the yielded dict.

    With ``detach=False`` the recorded tensors stay in the graph (``torch.autograd.grad``
    with respect to them gives each component's gradient).
    """
    arch = arch or get_arch(model)
    store: dict[int, torch.Tensor] = {}
    with ExitStack() as stack:
        for layer in layers:
            def fn(block, layer=layer):
                if detach:
                    store[layer] = block.detach()
                    return block
                # Route through a fresh leaf-like node so grads w.r.t. it are available.
                block = block.view_as(block)
                store[layer] = block
                return block

            stack.enter_context(edit_components(model, kind, layer, fn, arch))
        yield store


@contextmanager
def capture_qk(
    model: nn.Module, layers: Iterable[int], arch: ModelArch | None = None
) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(query, key)`` after rotary embedding (and q/k norms) at each layer.

    Shapes: query (B, n_heads, T, head_dim), key (B, n_kv_heads, T, head_dim). Works with any
    attention implementation (sdpa, eager, ...) because it wraps the attention function the
    model itself dispatches to; it never switches the model to eager attention. Nested captures
    each record their own layers; leaving the inner one puts the outer one's wrapper back.
    """
    arch = arch or get_arch(model)
    attn_path = arch.spec.attention_module
    wanted = {id(arch.layers(model)[l].get_submodule(attn_path)): l for l in layers}
    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    original = ALL_ATTENTION_FUNCTIONS.get_interface

    def get_interface(name: str, default: Callable) -> Callable:
        fn = original(name, default)

        def recording(module, query, key, value, attention_mask, *args, **kwargs):
            layer = wanted.get(id(module))
            if layer is not None:
                store[layer] = (query.detach(), key.detach())
            return fn(module, query, key, value, attention_mask, *args, **kwargs)

        return recording

    outer = vars(ALL_ATTENTION_FUNCTIONS).get("get_interface")  # an enclosing capture's wrapper, if any
    ALL_ATTENTION_FUNCTIONS.get_interface = get_interface  # instance attribute: restored on exit
    try:
        yield store
    finally:
        if outer is None:
            del ALL_ATTENTION_FUNCTIONS.get_interface
        else:
            ALL_ATTENTION_FUNCTIONS.get_interface = outer


# ----- ablation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadAblation:
    """Ablate query head ``head`` of ``layer`` on batch ``rows`` (None: all rows)."""

    layer: int
    head: int
    rows: slice | None = None


ABLATION_METHODS = ("uniform", "zero", "mean")


def uniform_attention_output(
    values: torch.Tensor, attention_mask: torch.Tensor | None, prefix_values: torch.Tensor | None = None
) -> torch.Tensor:
    """Output of uniform causal attention: at position i the mean of V over valid positions <= i.

    values (B, T, KV, d); attention_mask (B, T) with 1 for real tokens; prefix_values (1 or B, P, KV, d):
    the V of P real positions before these (a cached prompt prefix), averaged in too. Returns (B, T, KV, d).
    """
    if attention_mask is None:
        csum = values.cumsum(1)
        count = torch.arange(1, values.shape[1] + 1, device=values.device, dtype=values.dtype)[None, :, None, None]
    else:
        m = attention_mask.to(values.dtype)[:, :, None, None]
        csum = (values * m).cumsum(1)
        count = m.cumsum(1)
    if prefix_values is not None:
        csum = csum + prefix_values.to(values.dtype).sum(1, keepdim=True)
        count = count + prefix_values.shape[1]
    return csum / count.clamp(min=1)


@contextmanager
def ablate_heads(
    model: nn.Module,
    ablations: Iterable[HeadAblation | tuple[int, int]],
    method: str = "uniform",
    attention_mask: torch.Tensor | None = None,
    means: dict[int, torch.Tensor] | None = None,
    arch: ModelArch | None = None,
    prefix_values: dict[int, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Replace chosen query heads' outputs (the input of ``o_proj``).

    ``uniform``: the head attends uniformly to positions <= i (mean of its value head's V
    over valid positions; ``attention_mask`` (B, T) marks real tokens; when the forward runs after a
    cached prompt prefix, ``prefix_values[layer]`` (1, P, KV, d) is that prefix's V, averaged in too).
    ``zero``: output 0. ``mean``: ``means[layer]`` (n_heads, head_dim), e.g. from :func:`head_output_means`.
    """
    if method not in ABLATION_METHODS:
        raise ValueError(f"unknown ablation method {method!r}; use one of {ABLATION_METHODS}")
    arch = arch or get_arch(model)
    by_layer: dict[int, list[HeadAblation]] = {}
    for a in ablations:
        a = a if isinstance(a, HeadAblation) else HeadAblation(*a)
        arch.validate("q", a.layer, a.head)
        by_layer.setdefault(a.layer, []).append(a)
    if method == "mean" and (means is None or any(l not in means for l in by_layer)):
        raise ValueError("mean ablation needs means[layer] for every ablated layer (see head_output_means)")
    with ExitStack() as stack:
        for layer, items in by_layer.items():
            values: dict[str, torch.Tensor] = {}
            if method == "uniform":
                def grab_v(block, values=values):
                    values["v"] = block
                    return block

                stack.enter_context(edit_components(model, "v", layer, grab_v, arch))

            def replace(block, items=items, values=values, layer=layer):
                out = block.clone()
                uniform = (uniform_attention_output(values["v"], attention_mask, (prefix_values or {}).get(layer))
                           if method == "uniform" else None)
                for a in items:
                    rows = a.rows if a.rows is not None else slice(None)
                    if method == "zero":
                        out[rows, :, a.head] = 0
                    elif method == "mean":
                        out[rows, :, a.head] = means[layer][a.head].to(out.dtype)
                    else:
                        out[rows, :, a.head] = uniform[rows, :, arch.kv_head_of(a.head)]
                return out

            stack.enter_context(edit_components(model, "o", layer, replace, arch))
        yield


@torch.no_grad()
def head_output_means(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], arch: ModelArch | None = None
) -> dict[int, torch.Tensor]:
    """Mean output of every query head over all real tokens: {layer: (n_heads, head_dim)}."""
    arch = arch or get_arch(model)
    sums: dict[int, torch.Tensor] = {}
    count = 0
    with capture_components(model, "o", range(arch.dims.n_layers), arch=arch) as store:
        for batch in batches:
            model(**batch)
            mask = batch.get("attention_mask")
            m = torch.ones(store[0].shape[:2], device=store[0].device) if mask is None else mask.float()
            count += m.sum().item()
            for layer, block in store.items():
                s = (block.float() * m[:, :, None, None]).sum((0, 1))
                sums[layer] = sums.get(layer, 0) + s
    return {l: s / max(count, 1) for l, s in sums.items()}


# ----- layer-level control: cache, restart, stop --------------------------------------------------


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def capture_module_output(module: nn.Module) -> Iterator[dict[str, Any]]:
    """Record what ``module``'s forward returns, as ``store["out"]`` (the last call's output, as is)."""
    store: dict[str, Any] = {}

    def hook(_m, _args, out):
        store["out"] = out

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def accumulate_weight_grads(modules: Iterable[nn.Module]) -> Iterator[dict[nn.Module, torch.Tensor]]:
    """The gradient each linear module's weight would get, summed over the backward passes run inside:
    ``store[module]`` = sum of ``grad_output^T @ input``, (out, in) float32, for weights that cannot hold a
    ``.grad`` themselves (a bitsandbytes 4-bit weight). A module counts only where its output requires
    grad (make the input embeddings trainable, say)."""
    store: dict[nn.Module, torch.Tensor] = {}

    def hook(module, args, out):
        if not out.requires_grad:
            return
        x = args[0].detach()

        def on_grad(grad):
            g = grad.reshape(-1, grad.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            store[module] = g if module not in store else store[module] + g

        out.register_hook(on_grad)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_layer_input(model: nn.Module, layer: int, arch: ModelArch | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Record the residual stream entering ``layer`` as ``store["hidden"]`` (B, T, D)."""
    arch = arch or get_arch(model)
    store: dict[str, torch.Tensor] = {}

    def pre_hook(_m, args, kwargs):
        store["hidden"] = _hidden_arg(args, kwargs).detach()

    handle = arch.layers(model)[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


class _SkipLayer(nn.Module):
    """Stands in for a decoder layer below the restart point: returns its input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def start_at_layer(model: nn.Module, layer: int, hidden: torch.Tensor, arch: ModelArch | None = None) -> Iterator[None]:
    """Run only layers >= ``layer``, feeding them ``hidden`` (B, T, D) instead of recomputing it.

    Pass the same ``input_ids``/``attention_mask`` as when ``hidden`` was captured (positions
    and masks still come from them; the embeddings are computed but discarded).
    """
    arch = arch or get_arch(model)
    layers = arch.layers(model)
    saved = [layers[i] for i in range(layer)]
    skip = _SkipLayer()
    for i in range(layer):
        layers[i] = skip

    def pre_hook(_m, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    handle = layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, original in enumerate(saved):
            layers[i] = original


@contextmanager
def stop_after_layer(model: nn.Module, layer: int, arch: ModelArch | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Raise :class:`StopForward` right after ``layer`` runs; its output lands in ``store["hidden"]``.

    Use :func:`forward_until`, which catches the exception, rather than this directly.
    """
    arch = arch or get_arch(model)
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _args, output):
        store["hidden"] = output[0] if isinstance(output, tuple) else output
        raise StopForward

    handle = arch.layers(model)[layer].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def forward_until(model: nn.Module, layer: int, arch: ModelArch | None = None, **inputs: Any) -> torch.Tensor:
    """Run ``model(**inputs)`` only up to and including ``layer``; return its output (B, T, D).

    Layers above ``layer``, the final norm and the LM head are never run.
    """
    with stop_after_layer(model, layer, arch) as store:
        try:
            model(**inputs, use_cache=False)
        except StopForward:
            pass
    return store["hidden"]


# ----- training: cut the backward pass below the lowest trained layer (used by the circuit tuner) ----


def stop_gradient_below(
    model: nn.Module, layer: int, watch: Iterable[nn.Parameter] = (), arch: ModelArch | None = None
) -> torch.utils.hooks.RemovableHandle:
    """Detach the residual stream entering ``layer`` so no gradient is computed below it.

    Installed persistently (returns the handle; call ``.remove()``), not as a context manager.
    ``watch``: parameters below ``layer`` (embeddings, lower layers); if any of them requires grad
    at forward time the hook does nothing, so unfreezing them later still trains them.
    With gradient checkpointing the detached input is marked ``requires_grad`` again: reentrant
    checkpointing needs a grad-requiring input to backpropagate into ``layer``'s own parameters.
    """
    arch = arch or get_arch(model)
    block = arch.layers(model)[layer]
    watched = list(watch)

    def pre_hook(module, args, kwargs):
        if not torch.is_grad_enabled() or any(p.requires_grad for p in watched):
            return None
        hidden = _hidden_arg(args, kwargs)
        if not hidden.requires_grad:
            return None
        cut = hidden.detach()
        if module.training and getattr(module, "gradient_checkpointing", False):
            cut.requires_grad_(True)
        if args:
            return (cut, *args[1:]), kwargs
        kwargs["hidden_states"] = cut
        return args, kwargs

    return block.register_forward_pre_hook(pre_hook, with_kwargs=True)
