"""PEFT's generic adapter contract (the checks of peft's ``tests/testing_common.py`` ``PeftCommonTester``
that apply to an additive weight-slice adapter), written for CIRCUIT and run on a tiny model of every
supported family, with r=0 (slices only) and r>0 (slices + LoRA branch on extra projections).

Each test names the PeftCommonTester check it follows. Checks that do not apply: prompt-learning and
prefix-tuning ones, weighted combinations (LoRA-only arithmetic), quantised bases, device maps across
several GPUs. convert_to_lora, mixed batches and unmerge-after-cast live in test_tuner_contract.py."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model

import circuit_peft  # noqa: F401
from circuit_peft import CircuitConfig
from circuit_peft.models import TINY_FAMILIES, tiny_model
from circuit_peft.tuner import circuit_size

IDS = torch.tensor([[5, 9, 13, 17, 21, 25], [6, 10, 14, 18, 22, 26]])
MATRIX = [pytest.param(f, r, id=f"{f}-r{r}") for f in TINY_FAMILIES for r in (0, 2)]
ATOL = 1e-5


def _config(r: int, other: bool = False) -> CircuitConfig:
    components = {"v": {"0": [1]}, "mlp": {"0": [4]}} if other else {"q": {"1": [0]}, "mlp": {"2": [1, 2]}}
    return CircuitConfig(components=components, r=r, init_weights=False)


def _peft(family: str, r: int, adapter_name: str = "default"):
    return get_peft_model(tiny_model(family), _config(r), adapter_name=adapter_name).eval()


@torch.no_grad()
def _logits(model, **kwargs) -> torch.Tensor:
    return model(input_ids=IDS, **kwargs).logits


def _base_logits(family: str) -> torch.Tensor:
    return _logits(tiny_model(family))


def _adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family, r", MATRIX)
def test_model_attr_and_adapter_acts(family, r):  # _test_model_attr
    pm = _peft(family, r)
    for attr in ("save_pretrained", "from_pretrained", "peft_config", "base_model", "merge_and_unload"):
        assert hasattr(pm, attr), attr
    assert (_logits(pm) - _base_logits(family)).abs().max() > 1e-4  # init_weights=False: the adapter acts


@pytest.mark.parametrize("family, r", MATRIX)
def test_adapter_names_with_substrings(family, r, tmp_path):  # _test_adapter_name, substring names
    pm = get_peft_model(tiny_model(family), _config(r), adapter_name="adapter")
    pm.add_adapter("adapter_1", _config(r, other=True))
    names = {n for n, _ in pm.named_parameters() if ".adapter_1" in n or n.endswith("adapter_1")}
    assert names, "no parameter carries the second adapter's name"
    pm.set_adapter("adapter_1")
    assert pm.active_adapter == "adapter_1"
    expected = _logits(pm)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(family), tmp_path / "adapter_1", adapter_name="adapter_1")
    torch.testing.assert_close(_logits(loaded), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, r", MATRIX)
def test_prepare_for_training_trains_exactly_the_slices(family, r):  # _test_prepare_for_training
    pm = _peft(family, r)
    trainable = sum(p.numel() for p in _adapter_params(pm).values())
    assert trainable == circuit_size(pm.peft_config["default"], pm)["trainable_params"] > 0
    assert all("circuit_" in n or "lora_" in n for n in _adapter_params(pm)), list(_adapter_params(pm))


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("family, r", MATRIX)
def test_save_pretrained_and_reload(family, r, safe, tmp_path):  # _test_save_pretrained
    pm = _peft(family, r)
    pm.save_pretrained(tmp_path, safe_serialization=safe)
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert (tmp_path / weights).exists() and (tmp_path / "adapter_config.json").exists()
    loaded = PeftModel.from_pretrained(tiny_model(family), tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(pm), atol=ATOL, rtol=0)
    config = PeftConfig.from_pretrained(tmp_path)  # _test_from_pretrained_config_construction
    assert isinstance(config, CircuitConfig) and config.components == pm.peft_config["default"].components


@pytest.mark.parametrize("family, r", MATRIX)
def test_save_selected_adapters(family, r, tmp_path):  # _test_save_pretrained_selected_adapters
    pm = _peft(family, r)
    pm.add_adapter("new_adapter", _config(r, other=True))
    pm.save_pretrained(tmp_path, selected_adapters=["new_adapter"])
    assert (tmp_path / "new_adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter_config.json").exists()
    pm.set_adapter("new_adapter")
    loaded = PeftModel.from_pretrained(tiny_model(family), tmp_path / "new_adapter")
    torch.testing.assert_close(_logits(loaded), _logits(pm), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, r", MATRIX)
def test_low_cpu_mem_usage_and_inference_mode_loads(family, r, tmp_path):  # _test_load_model_low_cpu_mem_usage
    pm = _peft(family, r)
    pm.save_pretrained(tmp_path)
    lazy = PeftModel.from_pretrained(tiny_model(family), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(_logits(lazy), _logits(pm), atol=ATOL, rtol=0)
    assert not any(p.device.type == "meta" for p in lazy.parameters())
    assert not _adapter_params(lazy)  # inference mode: nothing trainable
    trainable = PeftModel.from_pretrained(tiny_model(family), tmp_path, is_trainable=True)
    assert sum(p.numel() for p in _adapter_params(trainable).values()) == \
        sum(p.numel() for p in _adapter_params(pm).values())


@pytest.mark.parametrize("family, r", MATRIX)
def test_auto_peft_model_loads(family, r, tmp_path):  # AutoPeftModel path of _test_save_pretrained
    tiny_model(family).save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), _config(r)).eval()
    pm.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(auto), _logits(pm), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, r", MATRIX)
def test_merge_layers_safe_merge_and_idempotent(family, r):  # _test_merge_layers, _is_idempotent, _safe_merge
    pm = _peft(family, r)
    expected = _logits(pm)
    pm.merge_adapter()
    torch.testing.assert_close(_logits(pm), expected, atol=ATOL, rtol=0)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pm.merge_adapter()  # merging twice changes nothing (PEFT warns "Already merged")
    torch.testing.assert_close(_logits(pm), expected, atol=ATOL, rtol=0)
    pm.unmerge_adapter()
    merged = copy.deepcopy(pm).merge_and_unload(safe_merge=True)
    torch.testing.assert_close(_logits(merged), expected, atol=ATOL, rtol=0)
    assert not any("circuit_" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family, r", MATRIX)
def test_merge_layers_half_precision(family, r, dtype):  # _test_merge_layers_fp16
    pm = _peft(family, r).to(dtype)
    expected = _logits(pm)
    merged = pm.merge_and_unload()
    assert all(p.dtype == dtype for p in merged.parameters())
    torch.testing.assert_close(_logits(merged), expected, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("family, r", MATRIX)
def test_merge_layers_multi(family, r):  # _test_merge_layers_multi
    config = _config(r)
    pm = get_peft_model(tiny_model(family), config).eval()
    first = _logits(pm)
    torch.manual_seed(1)
    pm.add_adapter("adapter-2", config)  # the same config object, as PEFT's own test does
    pm.set_adapter("adapter-2")
    second = _logits(pm)
    assert not torch.allclose(first, second, atol=ATOL)
    pm.set_adapter("default")
    torch.testing.assert_close(_logits(pm), first, atol=ATOL, rtol=0)
    only_2 = copy.deepcopy(pm).merge_and_unload(adapter_names=["adapter-2"])
    torch.testing.assert_close(_logits(only_2), second, atol=ATOL, rtol=0)
    only_default = copy.deepcopy(pm).merge_and_unload(adapter_names=["default"])
    torch.testing.assert_close(_logits(only_default), first, atol=ATOL, rtol=0)
    both = _logits(pm.merge_and_unload(adapter_names=["adapter-2", "default"]))
    assert not torch.allclose(both, first, atol=ATOL) and not torch.allclose(both, second, atol=ATOL)


@pytest.mark.parametrize("family, r", MATRIX)
def test_delete_active_and_inactive_adapters(family, r):  # _test_delete_adapter, _test_delete_inactive_adapter
    pm = _peft(family, r)
    pm.add_adapter("other", _config(r, other=True))
    pm.delete_adapter("other")  # inactive
    assert list(pm.peft_config) == ["default"] and pm.active_adapters == ["default"]
    assert not any(".other" in n for n, _ in pm.named_parameters())
    pm.add_adapter("other", _config(r, other=True))
    pm.set_adapter("other")
    pm.delete_adapter("other")  # active: PEFT falls back to the remaining adapter
    assert "other" not in pm.peft_config and pm.active_adapters == ["default"]
    assert not any(".other" in n for n, _ in pm.named_parameters())


@pytest.mark.parametrize("family, r", MATRIX)
def test_unload_and_disable_give_the_base_model(family, r):  # _test_unload_adapter, _test_disable_adapter
    pm = _peft(family, r)
    base = _base_logits(family)
    with pm.disable_adapter():
        torch.testing.assert_close(_logits(pm), base, atol=0, rtol=0)
    unloaded = pm.unload()
    torch.testing.assert_close(_logits(unloaded), base, atol=0, rtol=0)
    assert not any("circuit_" in n or "base_layer" in n for n, _ in unloaded.named_parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family, r", MATRIX)
def test_training_touches_only_the_adapter(family, r, checkpointing):  # _test_training(_gradient_checkpointing)
    pm = _peft(family, r).train()
    if checkpointing:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base_before = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD(list(_adapter_params(pm).values()), lr=0.1)
    loss = pm(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _adapter_params(pm).values())
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)
    opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in pm.named_parameters() if n in base_before)
    assert pm(input_ids=IDS, labels=IDS).loss < loss


@pytest.mark.parametrize("family, r", MATRIX)
def test_inputs_embeds_and_generate(family, r):  # _test_passing_input_embeds_works, _test_generate(_pos_args)
    pm = _peft(family, r)
    with torch.no_grad():
        embeds = pm.get_input_embeddings()(IDS)
        torch.testing.assert_close(pm(inputs_embeds=embeds).logits, _logits(pm), atol=ATOL, rtol=0)
        out = pm.generate(input_ids=IDS, max_new_tokens=3, do_sample=False)
        positional = pm.generate(IDS, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, IDS.shape[1] + 3) and torch.equal(out, positional)


@pytest.mark.parametrize("family, r", MATRIX)
def test_adapter_dtype_autocast(family, r):  # test_model_with_fp32_adapter autocast (autocast_adapter_dtype)
    pm = get_peft_model(tiny_model(family).to(torch.bfloat16), _config(r))
    assert all(p.dtype == torch.float32 for p in _adapter_params(pm).values())
    kept = get_peft_model(tiny_model(family).to(torch.bfloat16), _config(r), autocast_adapter_dtype=False)
    assert all(p.dtype == torch.bfloat16 for p in _adapter_params(kept).values())
    with torch.no_grad():
        assert torch.isfinite(pm(input_ids=IDS).logits).all()


@pytest.mark.parametrize("family, r", MATRIX)
def test_model_card_written(family, r, tmp_path):  # model card of _test_save_pretrained
    _peft(family, r).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "CIRCUIT" in card and "## Circuit adapter (`default`)" in card
