"""Head ablation scan (CircuitSeer stage 1) on SmolLM2: the loss increase on GSM8K solution tokens when
one query head is ablated (uniform attention). Scans two layers here to stay quick; drop ``layers=``
to scan all 270 heads. ``naive=True`` gives the same numbers with one full forward per head."""

import json
from pathlib import Path

import torch

from circuit_peft import load_model, load_tokenizer
from circuit_peft.locate import head_ablation_scan

torch.set_num_threads(2)
DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "gsm8k" / "train.jsonl"
probe = [json.loads(line) for line in DATA.read_text().splitlines()[:2]]  # {"question", "answer"}

model, tok = load_model("smollm2"), load_tokenizer("smollm2")
circuit = head_ablation_scan(model, tok, probe, method="uniform", layers=[0, 29], keep_fraction=None,
                             prompt_field="question", solution_field="answer")
print(f"base loss {circuit.meta['base_loss']:.3f} nats/token")
for comp, score in circuit.ranked()[:5]:
    print(f"  layer {comp.layer:2d} head {comp.index}: +{score:.4f}")
print(circuit.top(k=3).summary())
