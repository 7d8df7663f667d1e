"""The attention patch, isolated: :func:`capture_qk` records query and key states after rotary embedding
by wrapping the attention function the model itself dispatches to (``ALL_ATTENTION_FUNCTIONS``).

It is the one intervention that does not sit on a module: q/k after rotary exist only inside the attention
module's forward, as the arguments of its attention function. The wrapper is an instance attribute of
transformers' registry, put in place on entry and removed (or the enclosing capture's put back) on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..arch import ModelArch, get_arch


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
