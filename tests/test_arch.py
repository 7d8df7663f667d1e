import pytest
import torch
from transformers import AutoConfig

from circuit_peft.arch import Component, get_arch, UnsupportedArchitectureError, fingerprint_diff
from circuit_peft.models import tiny_model


def test_every_slice_fits_its_weight(tiny):
    family, model = tiny
    arch = get_arch(model)
    for kind in ("q", "k", "v", "o", "mlp"):
        n = arch.num_components(kind)
        for layer in range(arch.dims.n_layers):
            for s in arch.component_slices(Component(kind, layer, n - 1), model=model):
                mod = model.get_submodule(s.module)
                assert mod.weight.shape[arch.weight_dim(mod, s.axis)] >= s.stop


def test_query_slice_is_the_query_output(tiny):
    """Zeroing the q slice of head h zeroes exactly head h's query states."""
    from circuit_peft.interventions import capture_qk

    family, model = tiny
    arch = get_arch(model)
    x = torch.randint(3, 100, (1, 6))
    s = arch.component_slices(("q", 1, 2), projections=("q_proj",), model=model)[0]
    mod = model.get_submodule(s.module)
    with torch.no_grad():
        idx = torch.arange(s.start, s.stop)
        mod.weight.index_fill_(arch.weight_dim(mod, "out"), idx, 0.0)
        if getattr(mod, "bias", None) is not None:
            mod.bias[s.start:s.stop] = 0
    with capture_qk(model, [1]) as qk:
        model(x)
    q, k = qk[1]
    assert q.shape[1] == arch.dims.n_heads and k.shape[1] == arch.dims.n_kv_heads
    assert q[:, 2].abs().max() < 1e-6
    assert q[:, 1].abs().max() > 1e-4


def test_bad_indices_raise_clear_errors():
    arch = get_arch(tiny_model("llama"))
    with pytest.raises(ValueError, match="key/value head index 2"):
        arch.validate("k", 0, 2)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        arch.validate("q", 7, 0)
    with pytest.raises(ValueError, match="MLP neuron index 96"):
        arch.validate("mlp", 0, 96)


def test_unknown_architecture_names_supported_families():
    cfg = AutoConfig.for_model("bert")
    with pytest.raises(UnsupportedArchitectureError, match="Supported families: llama"):
        get_arch(cfg)


def test_fingerprint_diff_names_the_field():
    a = get_arch(tiny_model("llama")).fingerprint()
    b = dict(a, n_layers=5)
    assert fingerprint_diff(a, b) == ["n_layers: adapter was made for 3, this model has 5"]
    assert fingerprint_diff(a, a) == []
