"""Circuit adapter quick start on SmolLM2: configure, train a few AdamW steps, save, reload, merge.

Only two query heads (with their key/value head) and a few neurons are trainable; everything
else is frozen, and the saved adapter holds only those slices.
"""

import tempfile

import torch
from peft import PeftModel, get_peft_model

import circuit_peft  # noqa: F401  (registers the CIRCUIT PEFT type)
from circuit_peft import CircuitConfig, load_model, load_tokenizer

torch.set_num_threads(1)
model, tok = load_model("smollm2"), load_tokenizer("smollm2")
config = CircuitConfig(
    components={"q": {"24": [0, 1]}, "k": {"24": [0]}, "v": {"24": [0]}, "mlp": {"26": [3, 14, 159]}},
    projections="all",  # or "paper": q/k/v rows and up_proj rows only
)
model = get_peft_model(model, config)
model.print_trainable_parameters()

batch = tok(["Natalia sold 48 clips in April and half as many in May. Altogether she sold 72 clips."],
            return_tensors="pt")
batch["labels"] = batch["input_ids"].clone()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
model.train()
for step in range(3):
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")

model.eval()
with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
    logits = model(**batch).logits
    model.save_pretrained(folder)  # adapter_model.safetensors + adapter_config.json + README.md model card
    reloaded = PeftModel.from_pretrained(load_model("smollm2"), folder)
    print("reloaded max |diff|:", (reloaded(**batch).logits - logits).abs().max().item())
    with model.disable_adapter():
        print("disabled adapter = base model; loss", model(**batch).loss.item())
    merged = model.merge_and_unload()  # a plain LlamaForCausalLM with the slices folded in
    print("merged max |diff|:", (merged(**batch).logits - logits).abs().max().item())
