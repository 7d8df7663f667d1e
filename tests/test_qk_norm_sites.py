"""q/k heads in families that normalise q/k after the projection (Gemma-3, Qwen3, OLMo-2) are read and
scaled after the norm, where a head's scale reaches the attention scores (issue 9)."""

import pytest
import torch

from circuit_peft.arch import get_arch
from circuit_peft.interventions import capture_components, scale_components
from circuit_peft.locate import attribution_scan
from circuit_peft.models import tiny_model

QK_NORM_FAMILIES = ("gemma3", "olmo2", "qwen3")


def _ids():
    torch.manual_seed(1)
    return torch.randint(3, 120, (2, 9))


@pytest.mark.parametrize("family", QK_NORM_FAMILIES)
@pytest.mark.parametrize("kind", ["q", "k"])
@torch.no_grad()
def test_scaling_one_head_after_the_norm_changes_the_logits(family, kind):
    model = tiny_model(family)
    arch = get_arch(model)
    assert arch.qk_norm_site(kind) is not None
    ids = _ids()
    base = model(input_ids=ids).logits
    scales = {kind: torch.ones(arch.dims.n_layers, arch.num_components(kind))}
    scales[kind][1, 0] = 2.0
    with scale_components(model, scales):
        out = model(input_ids=ids).logits
    assert (out - base).abs().max() > 1e-3  # before the fix: the norm cancelled the x2 (change ~1e-6)


@pytest.mark.parametrize("family", QK_NORM_FAMILIES)
@torch.no_grad()
def test_captured_query_heads_are_the_norm_output(family):
    model = tiny_model(family)
    arch = get_arch(model)
    ids = _ids()
    seen = {}
    norm = arch.layers(model)[0].get_submodule(arch.qk_norm_site("q")[0])
    handle = norm.register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out.clone()))
    try:
        with capture_components(model, "q", [0]) as store:
            model(input_ids=ids)
    finally:
        handle.remove()
    block = store[0]
    assert block.shape == (2, 9, arch.dims.n_heads, arch.dims.head_dim)
    out = seen["out"]
    layout = arch.qk_norm_site("q")[1]
    expected = {"BHTD": out.transpose(1, 2), "BTHD": out, "flat": out.unflatten(-1, (arch.dims.n_heads, -1))}[layout]
    assert torch.equal(block, expected)


def test_logit_difference_attribution_sees_query_and_key_heads_on_gemma3():
    model = tiny_model("gemma3")
    torch.manual_seed(2)
    records = [{"context_ids": torch.randint(3, 120, (8,)).tolist(), "desired_id": 5 + i, "undesired_id": 60 + i,
                "problem_id": str(i)} for i in range(6)]
    circuit = attribution_scan(model, None, records, target="logit_diff", keep_fraction=None, progress=False)
    mean_abs = {k: sum(abs(s) for c, s in circuit.scores.items() if c.kind == k) /
                sum(1 for c in circuit.scores if c.kind == k) for k in ("q", "k", "v")}
    assert mean_abs["q"] > 0.01 * mean_abs["v"] and mean_abs["k"] > 0.01 * mean_abs["v"], mean_abs
