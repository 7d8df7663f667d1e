"""Component-level hooks: the only package that registers forward hooks (bar the tuner's
``adapter_names`` pre-hook, PEFT's own mixed-batch pattern).

Built on :mod:`circuit_peft.arch`, so every function works on every supported family. Every function
here is a context manager (hooks are always removed on exit) or a plain function that uses one.

Shapes: ``B`` batch, ``T`` sequence, ``n`` components of a kind per layer, ``w`` the component width
(``head_dim`` for heads, 1 for neurons), ``D`` hidden size.

* :mod:`.components` - :func:`edit_components` (the primitive: rewrite the (B, T, n, w) block of one kind at
  one layer), :func:`scale_components` (DCM masks, optionally at given positions), :func:`capture_components`.
* :mod:`.ablation` - :func:`ablate_heads` with the operators :class:`UniformAblation`, :class:`ZeroAblation`,
  :class:`MeanAblation` (each with its formula), :func:`head_output_means`.
* :mod:`.attention` - :func:`capture_qk`: q and k after rotary embedding, from the attention call (the only
  patch of transformers' attention registry, isolated there).
* :mod:`.modules` - :func:`capture_module_output`, :func:`accumulate_weight_grads` (4-bit weights).
* :mod:`.layers` - :func:`capture_layer_input` / :func:`start_at_layer` / :func:`forward_until`: cache the
  residual stream entering a layer, re-run only the layers from there, stop after a layer;
  :func:`stop_gradient_below` (the tuner's gradient cut).
"""

from .ablation import (
    ABLATION_METHODS, ABLATION_OPERATORS, AblationOperator, HeadAblation, MeanAblation, UniformAblation,
    ZeroAblation, ablate_heads, head_output_means, uniform_attention_output,
)
from .attention import capture_qk
from .components import BlockFn, capture_components, edit_components, scale_components
from .layers import (
    StopForward, capture_layer_input, forward_until, start_at_layer, stop_after_layer, stop_gradient_below,
)
from .modules import accumulate_weight_grads, capture_module_output

__all__ = [
    "ABLATION_METHODS", "ABLATION_OPERATORS", "AblationOperator", "BlockFn", "HeadAblation", "MeanAblation",
    "StopForward", "UniformAblation", "ZeroAblation", "ablate_heads", "accumulate_weight_grads", "capture_components",
    "capture_layer_input", "capture_module_output", "capture_qk", "edit_components", "forward_until",
    "head_output_means", "scale_components", "start_at_layer", "stop_after_layer", "stop_gradient_below",
    "uniform_attention_output",
]
