"""The primitive every component intervention is built on: rewrite the ``(B, T, n, w)`` block of one kind
(q/k/v heads, head outputs, MLP neurons) at one layer, at the site :mod:`circuit_peft.arch` names for it;
plus scaling (DCM masks) and capture, both built on it.

Shapes: ``B`` batch, ``T`` sequence, ``n`` components of a kind per layer, ``w`` the component width
(``head_dim`` for heads, 1 for neurons).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..arch import ModelArch, get_arch

BlockFn = Callable[[torch.Tensor], torch.Tensor]


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
