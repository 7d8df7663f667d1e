"""Find reasoning heads (CircuitSeer stage 1) and save them: top 5 % of query heads by the
first-order ablation estimate on a few GSM8K problems (use method="ablation" for the exact scan)."""

import json
from pathlib import Path

import torch

from circuit_peft import load_model, load_tokenizer
from circuit_peft.select import ReasoningHeads, find_reasoning_heads

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "gsm8k" / "train.jsonl"
probe = [json.loads(line) for line in DATA.read_text().splitlines()[:4]]

model, tok = load_model("smollm2"), load_tokenizer("smollm2")
heads = find_reasoning_heads(model, tok, probe, method="ablation_estimate", fraction=0.05,
                             prompt_field="question", solution_field="answer")
print("reasoning heads (layer, head):", heads.heads)
path = heads.save("/tmp/smollm2_reasoning_heads.json")
print("saved to", path, "- reload:", ReasoningHeads.load(path, model=model).heads == heads.heads)

# Any explicit list works too (validated against the model):
print(ReasoningHeads.from_list([(3, 1), (12, 4)], model).heads)
