import torch

from circuit_peft.arch import get_arch
from circuit_peft.models import tiny_model
from circuit_peft.interventions import (
    HeadAblation, ablate_heads, capture_components, capture_layer_input, capture_qk, forward_until,
    scale_components, start_at_layer,
)


def _inputs(vocab=128, B=2, T=7):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab - 1, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0  # left padding in row 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def test_unit_scale_is_identity_and_zero_scale_changes_last_position(tiny):
    family, model = tiny
    arch = get_arch(model)
    x = _inputs()
    base = model(**x).logits
    ones = {k: torch.ones(arch.dims.n_layers, arch.num_components(k)) for k in ("q", "k", "v", "mlp")}
    with scale_components(model, ones):
        assert torch.allclose(model(**x).logits, base, atol=1e-6)
    zeros = {"mlp": torch.zeros(arch.dims.n_layers, arch.num_components("mlp"))}
    with scale_components(model, zeros, positions=torch.tensor([-1, -1])):
        out = model(**x).logits
    real = x["attention_mask"][:, :-1].bool()
    assert (out[:, :-1] - base[:, :-1])[real].abs().max() < 1e-5  # causal: earlier positions untouched
    assert (out[:, -1] - base[:, -1]).abs().max() > 1e-4


@torch.no_grad()
def test_qk_capture_reproduces_eager_attention(tiny):
    family, model = tiny
    arch = get_arch(model)
    model.set_attn_implementation("eager")
    x = {"input_ids": _inputs()["input_ids"][:1]}
    out = model(**x, output_attentions=True)
    with capture_qk(model, [0, 2]) as qk:
        model(**x)
    q, k = qk[2]
    k = k.repeat_interleave(arch.dims.group_size, dim=1)
    scores = q @ k.transpose(-1, -2) * model.get_submodule(f"{arch.layers_path(model)}.2.{arch.spec.attention_module}").scaling
    cap = getattr(model.config, "attn_logit_softcapping", None)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    T = scores.shape[-1]
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    assert torch.allclose(scores.softmax(-1), out.attentions[2], atol=1e-5)


@torch.no_grad()
def test_nested_qk_captures_each_record_and_unwind():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model("llama")
    x = {"input_ids": _inputs()["input_ids"][:1]}
    with capture_qk(model, [0]) as outer:
        with capture_qk(model, [2]) as inner:
            model(**x)
        assert set(outer) == {0} and set(inner) == {2}
        outer.clear()
        model(**x)  # the inner capture has ended: the outer one still records
        assert set(outer) == {0} and set(inner) == {2}
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)


@torch.no_grad()
def test_uniform_ablation_of_a_head_with_zero_query_is_identity(tiny):
    """A head whose query is zero already attends uniformly, so uniform ablation changes nothing."""
    family, model = tiny
    arch = get_arch(model)
    s = arch.component_slices(("q", 1, 3), projections=("q_proj",), model=model)[0]
    mod = model.get_submodule(s.module)
    mod.weight.index_fill_(arch.weight_dim(mod, "out"), torch.arange(s.start, s.stop), 0.0)
    if getattr(mod, "bias", None) is not None:
        mod.bias[s.start:s.stop] = 0
    x = _inputs()
    base = model(**x).logits
    with ablate_heads(model, [(1, 3)], attention_mask=x["attention_mask"]):
        same = model(**x).logits
    with ablate_heads(model, [(1, 2)], attention_mask=x["attention_mask"]):
        other = model(**x).logits
    real = x["attention_mask"].bool()
    assert (same - base)[real].abs().max() < 1e-5
    assert (other - base)[real].abs().max() > 1e-4


@torch.no_grad()
def test_row_wise_ablation_equals_separate_runs(tiny):
    family, model = tiny
    x = _inputs()
    outs = []
    for head in (0, 1):
        with ablate_heads(model, [(2, head)], method="zero"):
            outs.append(model(**x).logits)
    both = {k: torch.cat([v, v]) for k, v in x.items()}
    with ablate_heads(model, [HeadAblation(2, 0, slice(0, 2)), HeadAblation(2, 1, slice(2, 4))], method="zero"):
        batched = model(**both).logits
    assert torch.allclose(batched, torch.cat(outs), atol=1e-5)


@torch.no_grad()
def test_restart_from_cached_layer_input_and_stop_early(tiny):
    family, model = tiny
    x = _inputs()
    full = model(**x, output_hidden_states=True)
    with capture_layer_input(model, 1) as cache:
        model(**x)
    with start_at_layer(model, 1, cache["hidden"]):
        again = model(**x).logits
    assert torch.allclose(again, full.logits, atol=1e-5)
    h = forward_until(model, 0, **x)
    assert torch.allclose(h, full.hidden_states[1], atol=1e-5)


def test_captured_components_carry_gradients(tiny):
    family, model = tiny
    x = _inputs()
    with capture_components(model, "o", [1], detach=False) as store:
        loss = model(**x).logits[:, -1].logsumexp(-1).sum()
    (g,) = torch.autograd.grad(loss, store[1])
    assert g.shape[2] == get_arch(model).dims.n_heads and g.abs().sum() > 0
