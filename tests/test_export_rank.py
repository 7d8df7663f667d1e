"""`circuit-peft export --lora` prints the max_lora_rank a vLLM server needs (issue 35), and says when a
module is wider than vLLM allows."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import circuit_peft  # noqa: F401
from circuit_peft import CircuitConfig, tiny_model
from circuit_peft.cli import main
from circuit_peft.errors import CircuitPeftError
from circuit_peft.export import VLLM_MAX_LORA_RANKS, export_lora, lora_ranks, vllm_max_lora_rank, widest_lora_rank
from circuit_peft.models import tiny_config


def test_vllm_max_lora_rank_is_the_smallest_allowed_value_at_or_above():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 64, 65, 256, 257, 320, 321, 512)] == \
        [1, 8, 8, 16, 64, 128, 256, 320, 320, 512, 512]
    assert vllm_max_lora_rank(513) is None and VLLM_MAX_LORA_RANKS[-1] == 512
    with pytest.raises(CircuitPeftError, match="rank"):
        vllm_max_lora_rank(0)


def _export(tmp_path, base, components):
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, CircuitConfig(components=components, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return model


def test_export_prints_the_rank_of_its_widest_slice(tmp_path, capsys):
    """Three query heads of one layer (head_dim 16): q_proj and o_proj deltas of rank 48 -> max_lora_rank 64."""
    model = _export(tmp_path, tiny_model("llama"), {"q": {"1": [0, 1, 3]}, "v": {"0": [1]}, "mlp": {"2": [3, 5]}})
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--model", str(tmp_path / "base"),
                 "--lora", str(tmp_path / "lora")]) == 0
    out = capsys.readouterr().out
    assert "widest LoRA rank 48" in out and "max_lora_rank=64" in out and "--max-lora-rank 64" in out
    ranks = lora_ranks(tmp_path / "lora")
    assert ranks["model.layers.1.self_attn.q_proj"] == 48 and ranks["model.layers.1.self_attn.o_proj"] == 48
    assert ranks["model.layers.0.self_attn.v_proj"] == 16 and ranks["model.layers.2.mlp.down_proj"] == 2
    assert widest_lora_rank(tmp_path / "lora") == 48
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    with torch.no_grad():  # the export at that rank is exact
        lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "lora"))
        assert torch.allclose(lora(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_export_wider_than_vllm_allows_points_to_merged(tmp_path, capsys):
    """520 neurons of one layer: gate/up/down deltas of rank 520 > 512, which no vLLM server loads."""
    config = tiny_config("llama", n_layers=1)
    config.hidden_size, config.intermediate_size = 544, 544
    torch.manual_seed(0)
    _export(tmp_path, AutoModelForCausalLM.from_config(config).eval(), {"mlp": {"0": list(range(520))}})
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--model", str(tmp_path / "base"),
                 "--lora", str(tmp_path / "lora")]) == 0
    out = capsys.readouterr().out
    assert "above vLLM's largest max_lora_rank (512)" in out and "3 module(s)" in out
    assert f"--adapter {tmp_path / 'adapter'} --merged OUT" in out and "max_lora_rank=" not in out
    assert widest_lora_rank(tmp_path / "lora") > 512


def test_widest_rank_is_what_vllm_reads(tmp_path):
    """vLLM compares max(r, *rank_pattern.values()) with max_lora_rank; a non-LoRA folder is refused."""
    model = get_peft_model(tiny_model("llama"), CircuitConfig(components={"q": {"2": [0, 1]}}, r=4, init_weights=False))
    with torch.no_grad():  # LoRA B starts at zero: give the branch its full rank
        for name, p in model.named_parameters():
            if "circuit_lora_B" in name:
                p.normal_(0, 0.02)
    assert export_lora(model, tmp_path / "lora") == 36  # two query heads (32 rows) + the LoRA branch (4)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert max([config["r"], *config["rank_pattern"].values()]) == 36
    model.save_pretrained(tmp_path / "circuit")
    with pytest.raises(CircuitPeftError, match="peft_type"):
        widest_lora_rank(tmp_path / "circuit")
