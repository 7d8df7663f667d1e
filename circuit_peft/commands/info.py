"""``circuit-peft info MODEL``: where a model keeps its heads and neurons (reads only the config)."""

from __future__ import annotations

import argparse
from typing import Any

from transformers import AutoConfig

from ..arch import get_arch
from ..models import TINY_FAMILIES, resolve_model_path, tiny_config


def load_config(name: str) -> Any:
    """Config of ``smollm2``, a hub id, a local folder, or ``tiny-<family>`` (no weights are loaded)."""
    if name.startswith("tiny-"):
        family = name[len("tiny-"):]
        if family not in TINY_FAMILIES:
            raise ValueError(f"unknown tiny family {family!r}; use one of {', '.join('tiny-' + f for f in TINY_FAMILIES)}")
        return tiny_config(family)
    return AutoConfig.from_pretrained(resolve_model_path(name))


def describe(name: str) -> str:
    """A human-readable table of the model's components per layer."""
    arch = get_arch(load_config(name))
    d = arch.dims
    per_layer = d.n_heads + 2 * d.n_kv_heads + d.n_neurons
    lines = [
        f"model            {name}",
        f"family           {arch.family} (model_type {arch.model_type})",
        f"layers           {d.n_layers}",
        f"query heads      {d.n_heads} per layer (head_dim {d.head_dim})",
        f"key/value heads  {d.n_kv_heads} per layer; {d.n_kv_heads} groups of {d.group_size} query heads",
        f"MLP neurons      {d.n_neurons} per layer" + ("" if arch.spec.has_gate else " (no gate projection)"),
        f"hidden size      {d.hidden_size}",
        f"vocabulary       {d.vocab_size}",
        f"components       {per_layer} per layer (q + k + v heads + neurons), {per_layer * d.n_layers} in all",
        "",
        "projection   module (in each layer)          a component owns",
    ]
    for proj, spec in arch.spec.projections.items():
        where = spec.module + (f" @ offset {arch.offset(proj)}" if arch.offset(proj) else "")
        lines.append(f"{proj:<12} {where:<32} {'output features' if spec.axis == 'out' else 'input features'}")
    lines += ["", "key/value group of each query head: " + ", ".join(
        f"q{h}->kv{arch.kv_head_of(h)}" for h in range(d.n_heads))]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(describe(args.model))
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "info", help="print a model's heads, key/value groups and neurons per layer",
        description="Print where a model keeps its query/key/value heads and MLP neurons (reads only the config).",
    )
    p.add_argument("model", help="'smollm2', a hub id, a local folder, or tiny-<family> (e.g. tiny-gpt2)")
    p.set_defaults(func=run)
