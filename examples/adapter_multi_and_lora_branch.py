"""Several named circuit adapters on one model (add_adapter, set_adapter, delete_adapter), and a
circuit adapter with a LoRA branch inside it (r, lora_alpha, lora_target_modules)."""

import torch
from peft import get_peft_model

from circuit_peft import CircuitConfig, tiny_model

x = torch.randint(3, 128, (1, 8))
model = get_peft_model(tiny_model("llama"), CircuitConfig(components={"q": {"1": [0]}}, init_weights=False),
                       adapter_name="heads")
model.add_adapter("neurons", CircuitConfig(components={"mlp": {"2": [4, 5, 6]}}, init_weights=False))
with torch.no_grad():
    for name in ("heads", "neurons"):
        model.set_adapter(name)
        print(name, "output sum", model(x).logits.sum().item())
    model.base_model.set_adapter(["heads", "neurons"])  # both at once
    print("both   output sum", model(x).logits.sum().item())
model.delete_adapter("heads")
print("left:", list(model.peft_config))

# circuit + LoRA in one adapter: LoRA on the circuit's modules and on every layer's v_proj
config = CircuitConfig(components={"mlp": {"2": [1, 2]}}, r=4, lora_alpha=8, lora_target_modules=["v_proj"])
hybrid = get_peft_model(tiny_model("qwen2"), config)
hybrid.print_trainable_parameters()
