"""Adapter folders on the API path (tuner/saving.py, docs/reliability.md): ``PeftModel.from_pretrained`` refuses
a broken folder with a CircuitPeftError naming the folder and the file, and a CIRCUIT save commits its weights
and config so that a kill leaves one whole save (the random-kill test is in tests/test_kill.py)."""

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

from circuit_peft import CircuitConfig, CircuitPeftError
from circuit_peft.models import tiny_model

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _saved(folder, components=(("q", 1, 0), ("mlp", 2, 5)), value=1.0):
    model = get_peft_model(tiny_model("llama"), CircuitConfig.from_components(list(components)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "circuit_" in name:
                p.fill_(value)
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BREAKAGES = {
    "empty config": (CONFIG, lambda p: p.write_text("")),
    "cut config": (CONFIG, _cut),
    "missing weights": (WEIGHTS, lambda p: p.unlink()),
    "cut weights": (WEIGHTS, _cut),
    "empty weights": (WEIGHTS, lambda p: p.write_bytes(b"")),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_a_broken_adapter_folder_is_refused_naming_the_folder_and_the_file(tmp_path, breakage, how):
    folder = tmp_path / "adapter"
    _saved(folder)
    name, damage = BREAKAGES[breakage]
    damage(folder / name)
    with pytest.raises(CircuitPeftError) as err:
        if how == "from_pretrained":
            PeftModel.from_pretrained(tiny_model("llama"), folder)
        else:
            get_peft_model(tiny_model("llama"), CircuitConfig.from_components([("k", 0, 1)])).load_adapter(
                folder, adapter_name="other")
    assert str(folder) in str(err.value) and (name in str(err.value) or "no weights" in str(err.value))


def test_a_broken_config_of_another_adapter_type_is_refused_naming_the_file(tmp_path):
    """The type is read from the config, so an unreadable one is refused the same way for LoRA."""
    folder = tmp_path / "lora"
    get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], r=2)).save_pretrained(folder)
    PeftModel.from_pretrained(tiny_model("llama"), folder)  # intact: loads, untouched by circuit-peft
    (folder / CONFIG).write_text('{"peft_type": "LO')
    with pytest.raises(CircuitPeftError, match=f"{folder / CONFIG}: not valid JSON"):
        PeftModel.from_pretrained(tiny_model("llama"), folder)


def test_a_save_commits_weights_then_config_and_leaves_no_temporary(tmp_path):
    folder = tmp_path / "adapter"
    _saved(folder)
    import hashlib

    recorded = json.loads((folder / CONFIG).read_text())["weights_sha256"]
    assert recorded == hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]
    assert CircuitConfig.from_pretrained(folder).weights_sha256 == recorded
    # a config saved on its own records no weights, and a config-only folder still seeds a new adapter
    alone = tmp_path / "config-only"
    CircuitConfig.from_pretrained(folder).save_pretrained(alone)
    assert json.loads((alone / CONFIG).read_text())["weights_sha256"] is None
    get_peft_model(tiny_model("llama"), CircuitConfig.from_pretrained(alone))


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.mark.slow
def test_a_save_killed_between_its_two_renames_loads_as_the_new_adapter(tmp_path):
    """The state a kill between the weights' rename and the config's leaves: the new weights beside the old
    config, the new config complete in the dead writer's temporary. Loading finishes that commit."""
    old, new = tmp_path / "old", tmp_path / "new"
    _saved(old)
    new_weights = _saved(new, components=(("q", 0, 1), ("o", 1, 2)), value=2.0)
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / CONFIG).write_bytes((old / CONFIG).read_bytes())
    (torn / WEIGHTS).write_bytes((new / WEIGHTS).read_bytes())
    without_temporary = tmp_path / "torn-copied"  # the same two files without the temporary: refused
    without_temporary.mkdir()
    for name in (CONFIG, WEIGHTS):
        (without_temporary / name).write_bytes((torn / name).read_bytes())
    (torn / f"{CONFIG}.tmp{_dead_pid()}").write_bytes((new / CONFIG).read_bytes())

    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(tiny_model("llama"), torn))
    assert loaded.keys() == new_weights.keys() and all(torch.equal(loaded[k], new_weights[k]) for k in loaded)
    assert sorted(p.name for p in torn.iterdir()) == [CONFIG, WEIGHTS]
    with pytest.raises(CircuitPeftError, match=f"{without_temporary / WEIGHTS}: not the weights that "):
        PeftModel.from_pretrained(tiny_model("llama"), without_temporary)


def test_several_adapters_each_commit_in_their_own_folder(tmp_path):
    model = get_peft_model(tiny_model("llama"), CircuitConfig.from_components([("q", 1, 0)]))
    model.add_adapter("extra", CircuitConfig.from_components([("mlp", 0, 3)]))
    model.save_pretrained(tmp_path)
    for sub in ("", "extra"):
        digest = json.loads((tmp_path / sub / CONFIG).read_text())["weights_sha256"]
        assert digest and not [p for p in (tmp_path / sub).iterdir() if ".tmp" in p.name]
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path / "extra", adapter_name="extra")
    assert set(loaded.peft_config) == {"default", "extra"}


@pytest.mark.parametrize("subfolder", [None, "lora"])
def test_a_hub_id_that_cannot_be_fetched_keeps_peft_s_own_error(monkeypatch, subfolder):
    """Offline, a hub id (any adapter type) fails inside PEFT; circuit-peft must not turn that into its own
    'no such folder' (the id is not a local folder, so there is nothing of ours to check)."""
    from peft.config import PeftConfig, PeftConfigMixin

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kwargs = {"subfolder": subfolder} if subfolder else {}
    unpatched = PeftConfigMixin.__dict__["_get_peft_type"].__func__.__wrapped__
    with pytest.raises(Exception) as peft_own:
        unpatched(PeftConfig, "someorg/some-lora", **kwargs)
    with pytest.raises(Exception) as ours:
        PeftConfig._get_peft_type("someorg/some-lora", **kwargs)
    assert type(ours.value) is type(peft_own.value) and str(ours.value) == str(peft_own.value)


def test_a_broken_local_subfolder_is_still_refused_naming_the_file(tmp_path):
    from peft.config import PeftConfig

    _saved(tmp_path / "sub")
    (tmp_path / "sub" / CONFIG).write_text("")
    with pytest.raises(CircuitPeftError, match=f"{tmp_path / 'sub' / CONFIG}: not valid JSON"):
        PeftConfig._get_peft_type(str(tmp_path), subfolder="sub")


def test_a_config_read_from_a_folder_seeds_new_adapters_after_that_folder_is_saved_again(tmp_path):
    """Read a config from A, train an adapter from it, save to A (new weights), then seed another adapter
    from the same config object: no weight is loaded from A, so A's digest has nothing to refuse."""
    folder = tmp_path / "A"
    _saved(folder)
    config = CircuitConfig.from_pretrained(folder)
    model = get_peft_model(tiny_model("llama"), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "circuit_" in name:
                p.fill_(3.0)
    model.save_pretrained(folder)
    trained = get_peft_model_state_dict(model)
    get_peft_model(tiny_model("llama"), config)  # the same config object, once more
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(tiny_model("llama"), folder))
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in loaded)
