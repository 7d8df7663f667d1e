"""Head ablation: replace chosen query heads' outputs (the input of ``o_proj``) by an operator's value.

Each operator is a small class with its formula in its docstring (as pyreft writes its interventions);
:func:`ablate_heads` looks them up by name in :data:`ABLATION_OPERATORS`. Notation: ``o_h(b, t)`` the
output of query head ``h`` at row ``b``, position ``t`` (width ``d``); ``g(h)`` its key/value head (GQA);
``v_g(b, t)`` that head's value; ``m(b, t)`` 1 for a real token, 0 for padding; ``P`` the length of a cached
prompt prefix the forward continues (0 when none) and ``v^pre_g(p)`` its values.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterable, Iterator

import torch
from torch import nn

from ..arch import ModelArch, get_arch
from .components import capture_components, edit_components


@dataclass(frozen=True)
class HeadAblation:
    """Ablate query head ``head`` of ``layer`` on batch ``rows`` (None: all rows)."""

    layer: int
    head: int
    rows: slice | None = None


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


class AblationOperator:
    """The value an ablated head's output takes at one layer: ``value(head, rows, dtype)`` is written into
    ``o_h(rows, :)``; ``refresh()`` runs once per forward before the values are read."""

    name: ClassVar[str]

    def __init__(self, model: nn.Module, layer: int, arch: ModelArch, attention_mask: torch.Tensor | None = None,
                 means: dict[int, torch.Tensor] | None = None, prefix_values: torch.Tensor | None = None):
        self.layer, self.arch = layer, arch

    def hooks(self, model: nn.Module, stack: ExitStack) -> None:
        """Enter whatever capture the operator reads (none by default)."""

    def refresh(self) -> None:
        """Compute what this forward's values share (nothing by default)."""

    def value(self, head: int, rows: slice, dtype: torch.dtype) -> torch.Tensor | float:
        raise NotImplementedError


class ZeroAblation(AblationOperator):
    """``o_h(b, t) = 0``."""

    name = "zero"

    def value(self, head: int, rows: slice, dtype: torch.dtype) -> float:
        return 0


class MeanAblation(AblationOperator):
    """``o_h(b, t) = mu_h``, the head's mean output over a data set's real tokens
    (``means[layer]`` (n_heads, d), e.g. from :func:`head_output_means`)."""

    name = "mean"

    def __init__(self, model, layer, arch, attention_mask=None, means=None, prefix_values=None):
        super().__init__(model, layer, arch)
        self.means = means[layer]

    def value(self, head: int, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        return self.means[head].to(dtype)


class UniformAblation(AblationOperator):
    """The head attends uniformly to every real position up to its own:

    ``o_h(b, t) = (sum_{p<P} v^pre_g(p) + sum_{t'<=t} m(b, t') v_g(b, t')) / (P + sum_{t'<=t} m(b, t'))``
    with ``g = g(h)`` (:func:`uniform_attention_output`; ``m`` = 1 everywhere when no mask is given).
    """

    name = "uniform"

    def __init__(self, model, layer, arch, attention_mask=None, means=None, prefix_values=None):
        super().__init__(model, layer, arch)
        self.mask, self.prefix_values = attention_mask, prefix_values
        self.captured: dict[str, torch.Tensor] = {}
        self.uniform: torch.Tensor | None = None

    def hooks(self, model: nn.Module, stack: ExitStack) -> None:
        def grab_v(block):
            self.captured["v"] = block
            return block

        stack.enter_context(edit_components(model, "v", self.layer, grab_v, self.arch))

    def refresh(self) -> None:
        self.uniform = uniform_attention_output(self.captured["v"], self.mask, self.prefix_values)

    def value(self, head: int, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        return self.uniform[rows, :, self.arch.kv_head_of(head)]


ABLATION_OPERATORS: dict[str, type[AblationOperator]] = {
    op.name: op for op in (UniformAblation, ZeroAblation, MeanAblation)
}
ABLATION_METHODS = tuple(ABLATION_OPERATORS)


def _by_layer(arch: ModelArch, ablations: Iterable[HeadAblation | tuple[int, int]]) -> dict[int, list[HeadAblation]]:
    by_layer: dict[int, list[HeadAblation]] = {}
    for a in ablations:
        a = a if isinstance(a, HeadAblation) else HeadAblation(*a)
        arch.validate("q", a.layer, a.head)
        by_layer.setdefault(a.layer, []).append(a)
    return by_layer


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
    """Replace chosen query heads' outputs (the input of ``o_proj``) by ``ABLATION_OPERATORS[method]``'s value.

    ``uniform`` (:class:`UniformAblation`): ``attention_mask`` (B, T) marks real tokens; when the forward runs
    after a cached prompt prefix, ``prefix_values[layer]`` (1, P, KV, d) is that prefix's V.
    ``zero`` (:class:`ZeroAblation`). ``mean`` (:class:`MeanAblation`): ``means[layer]`` (n_heads, head_dim).
    """
    if method not in ABLATION_METHODS:
        raise ValueError(f"unknown ablation method {method!r}; use one of {ABLATION_METHODS}")
    arch = arch or get_arch(model)
    by_layer = _by_layer(arch, ablations)
    if method == "mean" and (means is None or any(l not in means for l in by_layer)):
        raise ValueError("mean ablation needs means[layer] for every ablated layer (see head_output_means)")
    with ExitStack() as stack:
        for layer, items in by_layer.items():
            op = ABLATION_OPERATORS[method](model, layer, arch, attention_mask, means,
                                            (prefix_values or {}).get(layer))
            op.hooks(model, stack)

            def replace(block, items=items, op=op):
                out = block.clone()
                op.refresh()
                for a in items:
                    rows = a.rows if a.rows is not None else slice(None)
                    out[rows, :, a.head] = op.value(a.head, rows, out.dtype)
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
