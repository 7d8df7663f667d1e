"""Attribution on SmolLM2: first-order estimates of every head's and neuron's effect from one forward and
one backward pass, (1) on the solution loss of GSM8K problems (approximates the ablation scan),
(2) on the logit difference of a contrastive record (the desired vs the undesired next token)."""

import json
from pathlib import Path

import torch

from circuit_peft import load_model, load_tokenizer
from circuit_peft.taskdata.prompts import build_prompt_ids
from circuit_peft.locate import attribution_scan

torch.set_num_threads(2)
DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "gsm8k" / "train.jsonl"
probe = [json.loads(line) for line in DATA.read_text().splitlines()[:2]]
model, tok = load_model("smollm2"), load_tokenizer("smollm2")

heads = attribution_scan(model, tok, probe, target="ablation", prompt_field="question", solution_field="answer")
print("top heads by estimated loss increase:", [(c.layer, c.index) for c, _ in heads.ranked(["q"])[:5]])
print(f"kept {len(heads)} components (top 5 % of heads and of neurons)")

context = build_prompt_ids(tok, "What is 23 + 45?") + tok("23 + 45 = ", add_special_tokens=False)["input_ids"]
record = {"context_ids": context, "desired_id": tok("6", add_special_tokens=False)["input_ids"][0],
          "undesired_id": tok("5", add_special_tokens=False)["input_ids"][0], "problem_id": "demo"}
diff = attribution_scan(model, None, [record], target="logit_diff")
print(f"logit difference {diff.meta['mean_logit_diff']:.3f}; most helpful components:",
      [tuple(c) for c, _ in diff.ranked()[:5]])
