"""PEFT contract checks that failed before (issue 11): one config object for two adapters, convert_to_lora
of an adapter that covers only some modules, mixed-adapter batches, PEFT's safe-merge and unmerge texts."""

import warnings

import peft
import pytest
import torch
from peft import get_peft_model

import circuit_peft  # noqa: F401
from circuit_peft import CircuitConfig
from circuit_peft.models import TINY_FAMILIES, tiny_model

IDS = torch.tensor([[5, 9, 13, 17, 21], [6, 10, 14, 18, 22], [7, 11, 15, 19, 23]])


def _two_adapters(family: str, r: int = 0):
    model = tiny_model(family)
    a = CircuitConfig(components={"q": {"1": [0]}, "mlp": {"2": [1, 2]}}, r=r, init_weights=False)
    b = CircuitConfig(components={"v": {"0": [1]}, "mlp": {"0": [4]}}, r=r, init_weights=False)
    pm = get_peft_model(model, a)
    pm.add_adapter("b", b)
    return pm.eval()


def test_the_same_config_object_serves_two_adapters():
    pm = get_peft_model(tiny_model("llama"), config := CircuitConfig(components={"q": {"1": [0]}}))
    pm.add_adapter("other", config)
    pm.set_adapter("other")
    pm.delete_adapter("default")
    assert pm.active_adapters == ["other"] and list(pm.peft_config) == ["other"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("r", [0, 2])
@torch.no_grad()
def test_mixed_adapter_batches_match_one_adapter_at_a_time(family, r):
    pm = _two_adapters(family, r)
    names = ["default", "b", "__base__"]
    mixed = pm(input_ids=IDS, adapter_names=names).logits
    for i, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                ref = pm(input_ids=IDS[i : i + 1]).logits
        else:
            pm.set_adapter(name)
            ref = pm(input_ids=IDS[i : i + 1]).logits
        assert torch.allclose(mixed[i : i + 1], ref, atol=1e-5), (family, name)
    with pytest.raises(ValueError, match="non-existing adapter"):
        pm(input_ids=IDS, adapter_names=["default", "typo", "b"])


@torch.no_grad()
def test_mixed_adapter_generate():
    pm = _two_adapters("llama")
    out = pm.generate(input_ids=IDS[:2], adapter_names=["b", "__base__"], max_new_tokens=3, do_sample=False)
    with pm.disable_adapter():
        base = pm.generate(input_ids=IDS[1:2], max_new_tokens=3, do_sample=False)
    assert torch.equal(out[1:2], base)


def test_convert_to_lora_of_an_adapter_covering_only_some_modules():
    pm = _two_adapters("llama")
    pm.set_adapter("b")
    with torch.no_grad():
        expected = pm(input_ids=IDS).logits
    lora = peft.convert_to_lora(pm, rank=1.0, adapter_name="b")  # raised StopIteration before
    assert lora is not None
    assert torch.isfinite(expected).all()


def test_safe_merge_nan_text_and_unmerge_warning_are_peft_s():
    pm = _two_adapters("llama")
    layer = pm.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.circuit_rows["default"].fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        pm.merge_adapter(["default"], safe_merge=True) if hasattr(pm, "merge_adapter") else layer.merge(safe_merge=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        layer.unmerge()
    assert any("Already unmerged" in str(w.message) for w in seen)


@pytest.mark.parametrize("r", [0, 2])
def test_unmerge_after_a_cast_restores_the_base_weights(r):
    """Merge snapshots follow the model when it is moved or cast after merging (.to())."""
    pm = _two_adapters("llama", r)
    before = {n: p.detach().clone() for n, p in pm.get_base_model().named_parameters() if "base_layer" in n}
    pm.base_model.merge_adapter(["default", "b"])
    pm.to(torch.float64)
    pm.base_model.unmerge_adapter()
    after = dict(pm.get_base_model().named_parameters())
    for name, weight in before.items():
        assert after[name].dtype == torch.float64
        torch.testing.assert_close(after[name].float(), weight, rtol=0, atol=1e-6)


def test_a_saved_adapter_without_fingerprint_is_refused_unless_overridden(tmp_path):
    """A hand-made or stripped adapter_config.json cannot silently go onto any base."""
    import json

    from peft import PeftModel

    pm = get_peft_model(tiny_model("llama"), CircuitConfig(components={"q": {"1": [0]}}, init_weights=False))
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_model_fingerprint"] is not None
    PeftModel.from_pretrained(tiny_model("llama"), tmp_path)  # with its fingerprint: loads
    saved["base_model_fingerprint"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="has no base_model_fingerprint"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    config = CircuitConfig.from_pretrained(tmp_path)
    config.check_base_model = False
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path, config=config)
    torch.testing.assert_close(loaded(IDS).logits, pm(IDS).logits)


def test_a_hand_edited_config_is_refused_by_the_saved_index_checksum(tmp_path):
    """Same count, other heads in adapter_config.json: the deltas' checksum no longer matches."""
    import json

    from peft import PeftModel

    pm = get_peft_model(tiny_model("llama"), CircuitConfig(components={"q": {"1": [0]}, "mlp": {"2": [1, 2]}},
                                                           init_weights=False))
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert any("circuit_index_digest" in k for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(loaded(IDS).logits, pm(IDS).logits)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved["components"]["mlp"]["2"] = [3, 4]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="trained for other head/neuron indices"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
