"""`circuit-peft info` and the first `circuit-peft demo`."""

import json

import pytest

from circuit_peft.cli import main
from circuit_peft.commands.demo import demo_problems, run_demo


@pytest.mark.slow
def test_info_prints_heads_groups_and_neurons(capsys):
    assert main(["info", "smollm2"]) == 0
    out = capsys.readouterr().out
    assert "layers           30" in out and "query heads      9 per layer (head_dim 64)" in out
    assert "3 groups of 3 query heads" in out and "MLP neurons      1536 per layer" in out
    assert "q8->kv2" in out
    assert main(["info", "tiny-gpt2"]) == 0
    out = capsys.readouterr().out
    assert "attn.c_attn @ offset 64" in out and "no gate projection" in out


def test_info_rejects_unknown_model(capsys):
    assert main(["info", "tiny-bert"]) == 2
    assert "unknown tiny family" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_trains_and_saves(tmp_path):
    assert len(demo_problems()) == 8
    result = run_demo(steps=2, problems=2, max_length=48, output_dir=str(tmp_path / "adapter"))
    assert result["loss_after"] < result["loss_before"]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CIRCUIT" and saved["components"]["q"]
    assert "| query head |" in (tmp_path / "adapter" / "README.md").read_text()
