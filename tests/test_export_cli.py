"""`circuit-peft export` (issue 11): the merged model and the exact LoRA export reproduce the adapter's logits."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import circuit_peft  # noqa: F401
from circuit_peft import CircuitConfig, tiny_model
from circuit_peft.cli import main


@pytest.mark.slow
def test_export_merged_and_lora_reproduce_the_adapter(tmp_path, monkeypatch):
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, CircuitConfig(components={"q": {"1": [0]}, "v": {"0": [1]}, "mlp": {"2": [3, 5]}},
                                               init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    # a tiny model has no tokenizer of its own: save SmolLM2's next to the merged weights
    smol = circuit_peft.models.load_tokenizer("smollm2")
    monkeypatch.setattr("circuit_peft.models.load_tokenizer", lambda name, **kw: smol)
    code = main(["export", "--adapter", str(tmp_path / "adapter"), "--model", str(tmp_path / "base"),
                 "--merged", str(tmp_path / "merged"), "--lora", str(tmp_path / "lora")])
    assert code == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                         str(tmp_path / "lora"))(input_ids=ids).logits
    assert torch.allclose(merged, expected, atol=1e-4)
    assert torch.allclose(lora, expected, atol=1e-4)
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--merged", str(tmp_path / "merged")]) == 2
