"""Loading a CIRCUIT adapter in a fresh interpreter that never imports circuit_peft (issue 11): the
autoload .pth registers the type when peft is imported, costs nothing at start, and can be switched off."""

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

PTH = Path(sysconfig.get_paths()["purelib"]) / "circuit_peft_autoload.pth"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "CIRCUIT_PEFT_NO_AUTOLOAD"}
    full_env.update(HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import circuit_peft  # noqa: F401
    from peft import get_peft_model

    from circuit_peft import CircuitConfig, tiny_model

    root = tmp_path_factory.mktemp("autoload")
    base = tiny_model("llama")
    base.save_pretrained(root / "base")
    model = get_peft_model(base, CircuitConfig(components={"q": {"1": [0]}, "mlp": {"2": [3]}}, init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    model.save_pretrained(root / "adapter")
    ids = torch.tensor([[5, 9, 13, 17]])
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, root / "expected.pt")
    return root


def test_the_autoload_file_is_installed():
    assert PTH.exists(), f"{PTH} is missing: `make setup` (or a normal pip install) puts it there"


@pytest.mark.slow
def test_interpreter_start_imports_nothing_heavy():
    out = _run("import sys; print(sorted(m for m in ('torch', 'peft', 'circuit_peft') if m in sys.modules))")
    assert out.stdout.strip() == "[]", out.stderr


LOAD = """
    import sys, torch
    from peft import PeftModel, AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM
    root = sys.argv[1] if len(sys.argv) > 1 else {root!r}
    ids = torch.tensor([[5, 9, 13, 17]])
    expected = torch.load(root + "/expected.pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + "/base"), root + "/adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(root + "/adapter")
    plain = AutoModelForCausalLM.from_pretrained(root + "/base")
    plain.load_adapter(root + "/adapter")  # transformers' own PEFT integration
    with torch.no_grad():
        for m in (model, auto, plain):
            assert torch.allclose(m(input_ids=ids).logits, expected, atol=1e-5)
    assert "circuit_peft" in sys.modules  # loaded by the autoload hook, not by this script
    print("loaded")
"""


@pytest.mark.slow
def test_a_fresh_interpreter_loads_the_adapter_without_importing_circuit_peft(saved):
    out = _run(LOAD.format(root=str(saved)))
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_autoload_can_be_switched_off(saved):
    out = _run(LOAD.format(root=str(saved)), CIRCUIT_PEFT_NO_AUTOLOAD="1")
    assert out.returncode != 0 and "CIRCUIT" in out.stderr
