"""The CircuitConfig PEFT adapter on tiny random models of every supported family."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model, save_as_lora
from transformers import AutoConfig, AutoModelForCausalLM

import circuit_peft
from circuit_peft.arch import DEFAULT_PROJECTIONS, PAPER_PROJECTIONS, Component, get_arch
from circuit_peft.models import tiny_model
from circuit_peft.tuner import CircuitConfig, circuit_size

# q/k/v/o heads and neurons over two layers; several share a fused module on phi3/gpt2.
COMPONENTS = {"q": {"1": [0, 3]}, "k": {"1": [1]}, "v": {"2": [0]}, "o": {"2": [2]}, "mlp": {"1": [5], "2": [0, 95]}}


def _inputs(seed=0, batch=2, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def expected_masks(model, config):
    """Independent of the tuner: module path -> bool mask of the weight entries the circuit owns."""
    arch = get_arch(model)
    masks = {}
    for comp in config.component_list():
        projections = config.projections_for_kind(comp.kind)
        for s in arch.component_slices(comp, projections, model):
            w = model.get_submodule(s.module).weight
            m = masks.setdefault(s.module, torch.zeros_like(w, dtype=torch.bool))
            m.narrow(arch.weight_dim(model.get_submodule(s.module), s.axis), s.start, s.stop - s.start).fill_(True)
    return masks


def _train(model, steps=3, lr=1e-2, weight_decay=0.1, seed=0):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        x = _inputs(seed + step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def test_merged_weights_differ_exactly_on_chosen_slices(tiny):
    family, base = tiny
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    config = CircuitConfig(components=COMPONENTS)
    masks = expected_masks(base, config)
    model = _train(get_peft_model(base, config))
    merged = model.merge_and_unload()
    changed_modules = set()
    for name, w in merged.state_dict().items():
        diff = w != reference[name]
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in masks:
            assert torch.equal(diff, masks[module]), f"{family}: {name} changed outside/inside the wrong entries"
            changed_modules.add(module)
        else:
            assert not diff.any(), f"{family}: {name} should be frozen"
    assert changed_modules == set(masks)


@pytest.mark.parametrize("r", [0, 4])
def test_trainable_params_equal_slice_entries(tiny, r):
    family, base = tiny
    config = CircuitConfig(components=COMPONENTS, r=r)
    masks = expected_masks(base, config)
    model = get_peft_model(base, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    arch = get_arch(base)
    # rows and columns of one module are separate parameters, so count each axis' entries separately
    expected = 0
    for path, mask in masks.items():
        module = base.get_submodule(path).get_base_layer()
        out_dim = arch.weight_dim(module, "out")
        out_f, in_f = mask.shape[out_dim], mask.shape[1 - out_dim]
        rows = mask.all(dim=1 - out_dim).sum().item()
        cols = mask.all(dim=out_dim).sum().item()
        expected += rows * in_f + cols * out_f + r * (in_f + out_f)
    assert trainable == expected
    assert circuit_size(config, model)["trainable_params"] == expected


def test_outputs_after_save_load_merge_unmerge_and_disable(tiny, tmp_path):
    family, base = tiny
    x = _inputs()
    with torch.no_grad():
        y_base = base(x).logits
    model = get_peft_model(base, CircuitConfig(components=COMPONENTS, init_weights=False, r=2))
    model.eval()
    with torch.no_grad():
        y = model(x).logits
        assert (y - y_base).abs().max() > 1e-3  # the adapter acts
        with model.disable_adapter():
            assert torch.equal(model(x).logits, y_base)
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_model(family), tmp_path)
        assert (loaded(x).logits - y).abs().max() < 1e-5
        model.merge_adapter()
        assert (model(x).logits - y).abs().max() < 1e-5
        model.unmerge_adapter()
        assert (model(x).logits - y).abs().max() < 1e-5
        assert torch.equal(model.get_base_model()(x).logits, model(x).logits)


def test_unmerge_restores_base_weights_bit_exactly():
    base = tiny_model("gpt2")
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, CircuitConfig(components=COMPONENTS, init_weights=False))
    model.merge_adapter()
    model.unmerge_adapter()
    state = model.get_base_model().state_dict()
    for name, w in reference.items():
        key = name if name in state else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], w), name


def test_merge_snapshots_are_buffers_that_move_with_the_model():
    """The base entries merge overwrote live in non-persistent buffers: ``.to()`` casts (and moves) them with the
    weight, a state dict leaves them out, and unmerge after the cast restores the cast base bit-exactly."""
    base = tiny_model("llama")
    reference = {k: v.to(torch.float64) for k, v in base.state_dict().items()}
    model = get_peft_model(base, CircuitConfig(components=COMPONENTS, init_weights=False))
    model.merge_adapter()
    snapshots = {n: b for n, b in model.named_buffers() if ".circuit_merged_" in n}
    assert snapshots and not any(".circuit_merged_" in k for k in model.state_dict())
    model.to(torch.float64)
    assert all(b.dtype == torch.float64 for n, b in model.named_buffers() if ".circuit_merged_" in n)
    model.unmerge_adapter()
    assert not any(".circuit_merged_" in n for n, _ in model.named_buffers())  # dropped once restored
    state = model.get_base_model().state_dict()
    for name, w in reference.items():
        key = name if name in state else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], w), name


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])  # plain, fused Linear, fused Conv1D
def test_exported_lora_reproduces_outputs(family, tmp_path):
    base = tiny_model(family)
    x = _inputs()
    model = get_peft_model(base, CircuitConfig(components=COMPONENTS, init_weights=False))
    model.eval()
    assert model.supports_lora_conversion()
    with torch.no_grad():
        y = model(x).logits
    save_as_lora(tmp_path, model, rank=1.0)  # energy threshold 1.0: each module keeps its full (slice) rank
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora = PeftModel.from_pretrained(tiny_model(family), tmp_path)
    with torch.no_grad():
        assert (lora(x).logits - y).abs().max() < 1e-4


def test_several_named_adapters_set_and_delete():
    x = _inputs()
    cfg_a = dict(components={"q": {"0": [1]}}, init_weights=False)
    cfg_b = dict(components={"mlp": {"2": [7, 8]}}, init_weights=False)
    torch.manual_seed(1)
    single_a = get_peft_model(tiny_model("llama"), CircuitConfig(**cfg_a)).eval()
    torch.manual_seed(2)
    single_b = get_peft_model(tiny_model("llama"), CircuitConfig(**cfg_b)).eval()

    model = get_peft_model(tiny_model("llama"), CircuitConfig(**cfg_a), adapter_name="first").eval()
    model.add_adapter("second", CircuitConfig(**cfg_b))
    model.load_state_dict(
        {k.replace(".default", ".first"): v for k, v in single_a.state_dict().items() if "circuit_" in k}, strict=False
    )
    model.load_state_dict(
        {k.replace(".default", ".second"): v for k, v in single_b.state_dict().items() if "circuit_" in k}, strict=False
    )
    with torch.no_grad():
        assert torch.equal(model(x).logits, single_a(x).logits)
        model.set_adapter("second")
        assert torch.equal(model(x).logits, single_b(x).logits)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".second" in n for n in trainable)
        model.base_model.set_adapter(["first", "second"])
        both = model(x).logits
        assert (both - single_a(x).logits).abs().max() > 1e-4 and (both - single_b(x).logits).abs().max() > 1e-4
        model.delete_adapter("first")
        assert list(model.peft_config) == ["second"]
        assert not any(".first" in n for n, _ in model.named_parameters())
        assert torch.equal(model(x).logits, single_b(x).logits)


def test_lora_branch_on_extra_projections_trains_and_reloads(tmp_path):
    base = tiny_model("qwen2")
    config = CircuitConfig(components={"mlp": {"2": [1, 2]}}, r=4, lora_alpha=8, lora_target_modules=["v_proj"],
                           init_weights=False)
    model = get_peft_model(base, config)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum("v_proj.circuit_lora_A" in n for n in names) == 3  # every layer's v_proj
    assert any("up_proj.circuit_lora_B" in n for n in names)  # the circuit modules too
    assert model.base_model.lowest_trained_layer is None  # LoRA in layer 0: gradients everywhere
    _train(model, steps=2)
    x = _inputs()
    with torch.no_grad():
        y = model(x).logits
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path)
        assert (loaded(x).logits - y).abs().max() < 1e-5
        merged = loaded.merge_and_unload()
        assert (merged(x).logits - y).abs().max() < 1e-5


def test_config_round_trip_and_helpers(tmp_path):
    comps = [Component("mlp", 2, 9), ("q", 1, 3), ("q", 1, 0), ("k", 1, 1), ("q", 1, 0)]
    config = CircuitConfig.from_components(comps, projections="paper")
    assert config.components == {"mlp": {"2": [9]}, "q": {"1": [0, 3]}, "k": {"1": [1]}}
    assert config.component_list() == [("q", 1, 0), ("q", 1, 3), ("k", 1, 1), ("mlp", 2, 9)]
    assert config.projections_for_kind("mlp") == PAPER_PROJECTIONS["mlp"]
    assert CircuitConfig(components={"q": {1: [2]}}).projections_for_kind("q") == DEFAULT_PROJECTIONS["q"]
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CircuitConfig) and loaded.components == config.components
    assert loaded.peft_type == "CIRCUIT"


def test_circuit_size_counts_components_as_in_the_paper():
    model = tiny_model("llama")  # 3 layers, 4 q heads, 2 kv heads, 96 neurons
    size = circuit_size(CircuitConfig(components={"q": {"0": [0, 1]}, "o": {"0": [3]}, "mlp": {"1": [4]}}), model)
    assert size["components"] == 3  # o slices are not counted as components
    assert size["total_components"] == 3 * (4 + 2 + 2 + 96)
    assert size["total_params"] == sum(p.numel() for p in model.parameters())
    # q rows 2*16 x 64 in, o cols 64 out x 3*16, mlp: gate+up row 64 each, down col 64
    assert size["trainable_params"] == 32 * 64 + 64 * 48 + 3 * 64
    assert size["param_fraction"] == pytest.approx(size["trainable_params"] / size["total_params"])


def test_registration_is_idempotent_and_auto_model_loads(tmp_path):
    circuit_peft.tuner.register()
    circuit_peft.tuner.register()
    tiny_model("mistral").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    config = CircuitConfig(components={"v": {"2": [1]}}, init_weights=False)
    model = get_peft_model(base, config).eval()
    model.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    plain = tiny_model("mistral")
    plain.load_adapter(str(tmp_path / "adapter"))  # transformers' own adapter API
    x = _inputs()
    with torch.no_grad():
        assert (auto(x).logits - model(x).logits).abs().max() < 1e-5
        assert (plain(x).logits - model(x).logits).abs().max() < 1e-5


def test_model_card_names_method_and_components(tmp_path):
    model = get_peft_model(tiny_model("llama"), CircuitConfig(components={"q": {"1": [0, 2]}, "mlp": {"2": [7]}}))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving twice keeps one section
    card = (tmp_path / "README.md").read_text()
    assert "CircuitConfig" in card and "CIRCUIT" in card
    assert "| query head | 1 | 0, 2 |" in card and "| MLP neuron | 2 | 7 |" in card
    assert card.count("## Circuit adapter (`default`)") == 1
    assert "circuit-peft" in card.split("---")[1]  # tag in the YAML header


# ----- no backward work below the lowest trained layer ------------------------------------------


@pytest.mark.parametrize("checkpointing", [None, True, False])
def test_no_gradient_below_lowest_trained_layer(checkpointing):
    base = tiny_model("llama")
    model = get_peft_model(base, CircuitConfig(components={"q": {"2": [1]}, "mlp": {"2": [3]}}, init_weights=False))
    assert model.base_model.lowest_trained_layer == 2
    model.train()
    model.enable_input_require_grads()  # what Trainer/SFTTrainer do with gradient checkpointing
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    layers = get_arch(base).layers(base)
    calls = {i: 0 for i in range(3)}
    for i, layer in enumerate(layers):
        layer.register_full_backward_hook(lambda m, gi, go, i=i: calls.__setitem__(i, calls[i] + 1))
    x = _inputs()
    model(input_ids=x, labels=x).loss.backward()
    assert calls[0] == 0 and calls[1] == 0
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())

    # the cut changes no gradient: compare with the hook removed
    model.zero_grad()
    model.base_model._gradient_stop.remove()
    model(input_ids=x, labels=x).loss.backward()
    assert calls[0] > 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_gradient_cut_switches_off_when_a_lower_parameter_is_unfrozen():
    base = tiny_model("llama")
    model = get_peft_model(base, CircuitConfig(components={"v": {"2": [0]}}))
    layer0 = get_arch(base).layers(base)[0]
    layer0.mlp.up_proj.weight.requires_grad_(True)
    model.train()
    x = _inputs()
    model(input_ids=x, labels=x).loss.backward()
    assert layer0.mlp.up_proj.weight.grad is not None


def test_modules_to_save_keeps_gradients_everywhere():
    model = get_peft_model(tiny_model("llama"), CircuitConfig(components={"q": {"2": [1]}}, modules_to_save=["lm_head"]))
    assert model.base_model.lowest_trained_layer is None


def test_trainable_tokens_and_modules_to_save_round_trip(tmp_path):
    config = CircuitConfig(components={"k": {"1": [0]}}, init_weights=False, trainable_token_indices=[3, 5],
                           modules_to_save=["model.norm"])
    model = _train(get_peft_model(tiny_model("olmo2"), config), steps=2)
    x = _inputs()
    with torch.no_grad():
        y = model(x).logits
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_model("olmo2"), tmp_path)
        assert (loaded(x).logits - y).abs().max() < 1e-5


# ----- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "components, message",
    [
        ({"q": {"0": [4]}}, "query head index 4"),
        ({"k": {"1": [2]}}, "key/value head index 2"),
        ({"v": {"2": [5]}}, "key/value head index 5"),
        ({"mlp": {"0": [96]}}, "MLP neuron index 96"),
        ({"q": {"3": [0]}}, "layer 3 is out of range"),
    ],
)
def test_out_of_range_components_raise_before_injection(components, message):
    base = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, CircuitConfig(components=components))
    assert not any("circuit_" in n for n, _ in base.named_parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(components={}), "circuit is empty"),
        (dict(components={"q": {"0": []}}), "circuit is empty"),
        (dict(components={"head": {"0": [1]}}), "unknown component kind"),
        (dict(components={"q": {"0": [-1]}}), "negative index"),
        (dict(components={"q": {"x": [1]}}), "non-integer layer"),
        (dict(components={"q": {"0": [1]}}, r=-1), "r >= 1"),
        (dict(components={"q": {"0": [1]}}, r=0, lora_target_modules=["q_proj"]), "r >= 1"),
        (dict(components={"q": {"0": [1]}}, projections="some"), "unknown projections preset"),
        (dict(components={"q": {"0": [1]}}, projections={"q": ["w_proj"]}), "unknown projection"),
    ],
)
def test_bad_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CircuitConfig(**kwargs)


def test_disallowed_projection_for_kind_raises():
    with pytest.raises(ValueError, match="cannot touch"):
        get_peft_model(tiny_model("llama"), CircuitConfig(components={"k": {"0": [0]}}, projections={"k": ["q_proj"]}))


def test_unsupported_family_raises():
    cfg = AutoConfig.for_model("opt", vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                               num_attention_heads=2, word_embed_proj_dim=32)
    with pytest.raises(ValueError, match="Supported families"):
        get_peft_model(AutoModelForCausalLM.from_config(cfg), CircuitConfig(components={"q": {"0": [0]}}))


@pytest.mark.parametrize("other, field", [(dict(family="llama", n_layers=4), "n_layers"), (dict(family="qwen2"), "family")])
def test_loading_onto_a_different_base_model_names_the_field(tmp_path, other, field):
    get_peft_model(tiny_model("llama"), CircuitConfig(components={"q": {"0": [0]}})).save_pretrained(tmp_path)
    family = other.pop("family")
    with pytest.raises(ValueError, match=rf"different base model \({field}: adapter was made for"):
        PeftModel.from_pretrained(tiny_model(family, **other), tmp_path)


@pytest.mark.parametrize("family,r,checkpointing", [("llama", 0, False), ("gpt2", 0, False), ("qwen2", 2, False),
                                                    ("llama", 0, True)])
def test_fused_training_forward_matches_the_two_matmul_path(family, r, checkpointing, monkeypatch):
    """Training forwards run base + slices as one matmul (_SliceLinear); outputs and every gradient equal
    the base-then-add path (forced by a huge MIN_FUSED_TOKENS), also under gradient checkpointing."""
    from circuit_peft.tuner import layer

    torch.manual_seed(0)
    comps = {"q": {"1": [0, 2]}, "k": {"1": [1]}, "v": {"2": [0]}, "mlp": {"1": [3, 7, 40], "2": [5]}}
    model = get_peft_model(tiny_model(family), CircuitConfig(components=comps, r=r, init_weights=False)).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 100, (4, 40))  # 160 rows: above MIN_FUSED_TOKENS

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    calls = []
    apply = layer._SliceLinear.apply
    monkeypatch.setattr(layer._SliceLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    fused_loss, fused = loss_and_grads()
    assert len(calls) >= sum(isinstance(m, layer.CircuitLinear) for m in model.modules())  # every layer fused
    monkeypatch.setattr(layer, "MIN_FUSED_TOKENS", 10**9)
    ref_loss, ref = loss_and_grads()
    torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert fused.keys() == ref.keys() and len(fused) > 0
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("unfreeze", ["bias", "weight"])
def test_fused_path_gives_an_unfrozen_base_weight_or_bias_its_gradient(unfreeze):
    """A training forward above MIN_FUSED_TOKENS with the base weight or bias unfrozen (a user's choice) gives it
    the gradient of the dense reference ``x @ (W + slice deltas).T + b``, as the slices get theirs (the fused
    _SliceLinear path returned none for either, silently)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("qwen2"), CircuitConfig(components={"q": {"1": [0, 2]}}, init_weights=False))
    module = model.base_model.model.model.layers[1].self_attn.q_proj  # qwen2's q_proj has a bias
    base = module.get_base_layer()
    getattr(base, unfreeze).requires_grad_(True)
    x = torch.randn(4, 40, module.in_features, requires_grad=True)  # 160 rows: above MIN_FUSED_TOKENS
    module.train()
    module(x).square().sum().backward()
    got = {"base": getattr(base, unfreeze).grad, "slice": module.circuit_rows["default"].grad, "x": x.grad}
    assert got["base"] is not None, f"the unfrozen base {unfreeze} got no gradient"

    ref_param = getattr(base, unfreeze).detach().clone().requires_grad_(True)
    rows = module.circuit_rows["default"].detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = ref_param if unfreeze == "weight" else base.weight.detach()
    b = ref_param if unfreeze == "bias" else base.bias.detach()
    torch.nn.functional.linear(x_ref, w.index_add(0, module.circuit_row_index["default"], rows), b).square().sum().backward()
    for name, ref in (("base", ref_param.grad), ("slice", rows.grad), ("x", x_ref.grad)):
        torch.testing.assert_close(got[name], ref, rtol=1e-4, atol=1e-5, msg=name)
