"""CCA end to end on SmolLM2 (what `circuit-peft amplify` runs): mine -> locate -> update -> evaluate,
with a few shipped demo problems (a couple of minutes on 2 cores)."""

import torch

from circuit_peft import load_model, load_tokenizer
from circuit_peft.cca import ARITHMETIC_SHOTS, AmplifyConfig, MiningConfig, UpdateConfig, amplify, demo_problems

torch.set_num_threads(2)
model, tok = load_model("smollm2"), load_tokenizer("smollm2")
result = amplify(
    model, tok, demo_problems("train")[:16], demo_problems("val")[:8], demo_problems("test")[:16], "/tmp/cca_amplify",
    mining=MiningConfig(pivot="digit", max_new_tokens=16, shots=list(ARITHMETIC_SHOTS)),
    update=UpdateConfig(steps=10, lr=1e-3, optimizer="adam", loss="logsigmoid", eval_every=5),
    config=AmplifyConfig(circuit_fraction=0.02),  # side effects skipped: no side_effect_data_dir
)
print({k: result.report[k] for k in ("accuracy_before", "accuracy_after", "component_fraction", "param_fraction")})
