"""Export a circuit adapter as an equivalent standard LoRA adapter (peft.save_as_lora / convert_to_lora),
for serving stacks that only know LoRA. A head or neuron slice delta is low-rank by construction."""

import tempfile

import torch
from peft import PeftModel, convert_to_lora, get_peft_model, save_as_lora

from circuit_peft import CircuitConfig, load_model, load_tokenizer

tok = load_tokenizer("smollm2")
config = CircuitConfig(components={"q": {"20": [3]}, "v": {"20": [1]}, "mlp": {"21": [5, 6]}}, init_weights=False)
model = get_peft_model(load_model("smollm2"), config).eval()  # init_weights=False: random deltas, to see a change
x = tok(["The circuit adapter exports to LoRA."], return_tensors="pt")["input_ids"]
with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
    lora_config, state_dict = convert_to_lora(model, rank=64)  # 64 = one head's rows: exact
    print("LoRA rank", lora_config.r, "tensors", len(state_dict))
    save_as_lora(folder, model, rank=1.0)  # or a float: keep all the energy, per-module rank
    lora = PeftModel.from_pretrained(load_model("smollm2"), folder)
    print("LoRA reproduces the circuit adapter, max |diff| =", (lora(x).logits - model(x).logits).abs().max().item())
