"""One test per patch in ``circuit_peft.compat`` (the only module that changes or reads PEFT/TRL/transformers
internals): each fails when its patch is gone (checked here by running once without it, ``compat.no_patch``) or
when the installed package leaves the version range the patch was tested for. Plus the trimmed public API."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.config import PeftConfigMixin

import circuit_peft
from circuit_peft import CircuitConfig, CircuitPeftError, compat
from circuit_peft.models import tiny_model


def in_bounds(name: str) -> None:
    patch = compat.PATCHES[name]
    assert patch.in_bounds(), (f"{patch.package} {patch.installed()} is outside {patch.bounds}, the range the "
                               f"{name} patch ({patch.target}) was tested for: recheck it, then widen its bounds")


def _circuit_model(**kwargs):
    return get_peft_model(tiny_model("llama"), CircuitConfig.from_components([("q", 1, 0), ("mlp", 2, 5)], **kwargs))


def test_every_patch_has_its_test():
    tests = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert set(compat.PATCHES) <= tests, f"patches without a test here: {sorted(set(compat.PATCHES) - tests)}"


def test_a_version_outside_the_bounds_warns(monkeypatch):
    patch = compat.PATCHES["peft_type"]
    assert patch.in_bounds("0.21.2") and not patch.in_bounds("0.20.0") and not patch.in_bounds("0.23.0")
    monkeypatch.setattr(compat.Patch, "installed", lambda self: "0.99.0")
    with pytest.warns(compat.CompatWarning, match=r"peft_type.*peft>=0.21,<0.23.*0.99.0"):
        assert not compat.check_bounds("peft_type")


def test_peft_type():
    from peft.utils import PeftType

    in_bounds("peft_type")
    assert PeftType("CIRCUIT") is PeftType.CIRCUIT and "CIRCUIT" in list(PeftType)
    assert CircuitConfig.from_components([("q", 0, 0)]).peft_type.value == "CIRCUIT"  # transformers reads .value


def test_model_card(tmp_path):
    in_bounds("model_card")
    model = _circuit_model()
    model.save_pretrained(tmp_path / "patched")
    card = (tmp_path / "patched" / "README.md").read_text()
    assert "## Circuit adapter (`default`)" in card and "| query head | 1 | 0 |" in card and "circuit-peft" in card
    with compat.no_patch(PeftModel, "create_or_update_model_card"):
        model.save_pretrained(tmp_path / "plain")
    assert "## Circuit adapter" not in (tmp_path / "plain" / "README.md").read_text()


def test_adapter_saving(tmp_path):
    import peft.peft_model as peft_model

    in_bounds("adapter_saving")
    model = _circuit_model()
    model.save_pretrained(tmp_path / "patched")
    recorded = json.loads((tmp_path / "patched" / "adapter_config.json").read_text())["weights_sha256"]
    weights = (tmp_path / "patched" / "adapter_model.safetensors").read_bytes()
    assert recorded == hashlib.sha256(weights).hexdigest()
    assert sorted(os.listdir(tmp_path / "patched")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with compat.no_patch(PeftModel, "save_pretrained"), compat.no_patch(peft_model, "safe_save_file"):
        model.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["weights_sha256"] is None


def test_config_reading(tmp_path):
    in_bounds("config_reading")
    folder = tmp_path / "adapter"
    _circuit_model().save_pretrained(folder)
    (folder / "adapter_config.json").write_text("")
    with pytest.raises(CircuitPeftError, match="adapter_config.json"):
        PeftConfig.from_pretrained(str(folder))  # from_json_file
    with pytest.raises(CircuitPeftError, match=str(tmp_path / "missing")):
        PeftConfigMixin._get_peft_type(str(tmp_path / "missing"))
    with compat.no_patch(PeftConfigMixin, "from_json_file"), pytest.raises(ValueError) as err:
        PeftConfig.from_pretrained(str(folder))
    assert not isinstance(err.value, CircuitPeftError)


@pytest.mark.slow  # starts an interpreter
def test_autoload(tmp_path):
    in_bounds("autoload")
    code = textwrap.dedent("""
        import sys
        import peft
        from peft.utils import PeftType
        print("CIRCUIT" in PeftType.__members__, "circuit_peft.tuner" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "CIRCUIT_PEFT_NO_AUTOLOAD"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"},
                         timeout=300)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]


def _rows():
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": [1, 5, 6, 7], "labels": [1, 5, 6, 7], "token_weights": [1.0] * 4}] * 2)


def test_signature_columns(tmp_path):
    from transformers import Trainer, TrainingArguments

    in_bounds("signature_columns")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=True)
    trainer = Trainer(model=tiny_model("llama"), args=args, train_dataset=_rows())
    assert "token_weights" not in trainer._remove_unused_columns(_rows()).column_names  # what the patch fixes
    compat.keep_signature_columns(trainer, ["token_weights"])
    assert "token_weights" in trainer._remove_unused_columns(_rows()).column_names


def test_fused_head_outputs(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from circuit_peft.models import load_tokenizer

    in_bounds("fused_head_outputs")
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True,
                     save_strategy="no", max_length=16)
    rows = _rows().remove_columns("token_weights")
    trainer = SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=rows,
                         processing_class=load_tokenizer("smollm2", padding_side="right"))
    batch = trainer.data_collator([rows[0], rows[1]])
    trainer.model.train()
    out = compat.fused_head_outputs(trainer.compute_loss, trainer.model, dict(batch))
    assert tuple(out.log_probs.shape) == tuple(out.label_mask.shape) == (2, 3)
    assert bool((out.log_probs < 0).all()) and bool(out.label_mask.all())


def test_attention_interface():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from circuit_peft.interventions import capture_qk

    in_bounds("attention_interface")
    model = tiny_model("llama").eval()
    with capture_qk(model, [1]) as store, torch.no_grad():
        model(input_ids=torch.tensor([[5, 9, 13]]))
    query, key = store[1]
    assert query.shape[-2:] == key.shape[-2:] == (3, model.config.head_dim)
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)  # removed on exit


def test_the_public_api_is_a_small_stable_core():
    from circuit_peft import research

    assert len(circuit_peft.__all__) <= 26 and all(hasattr(circuit_peft, n) for n in circuit_peft.__all__)
    for name in ("train", "amplify", "run_locator", "CircuitConfig", "CircuitModel", "Circuit", "CircuitPeftError",
                 "select_data"):
        assert name in circuit_peft.__all__
    assert not set(research.__all__) & set(circuit_peft.__all__)
    assert all(hasattr(research, n) for n in research.__all__)
    with pytest.raises(AttributeError, match=r"circuit_peft\.research\.random_circuit"):
        circuit_peft.random_circuit  # noqa: B018
