"""Score GSM8K questions with CircuitSeer (CircuitSeer stage 2) and check the score is not a length proxy."""

import json
from pathlib import Path

import datasets
import torch

from circuit_peft import load_model, load_tokenizer
from circuit_peft.select import CircuitSeerScorer

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "gsm8k" / "train.jsonl"
pool = datasets.Dataset.from_list([json.loads(line) for line in DATA.read_text().splitlines()[:16]])

model, tok = load_model("smollm2"), load_tokenizer("smollm2")
heads = [(3, 1), (9, 4), (14, 7)]  # or a heads file: "/tmp/smollm2_reasoning_heads.json"
scorer = CircuitSeerScorer(model, tok, heads, batch_size=16, cache_dir="/tmp/circuitseer_cache")
scored = scorer.score_dataset(pool)  # adds a "circuitseer_score" column; cached and resumable
print(scored.select(range(3)).to_pandas()[["question", "circuitseer_score"]])
print(f"Spearman(score, question length) = {scorer.length_spearman:.2f} after length debiasing, "
      f"{scorer.per_example_length_spearman:.2f} before")

raw = CircuitSeerScorer(model, tok, heads, exclude_sink=False, length_debias=False)  # the paper's raw variance
raw.score(pool)
print(f"paper's raw score (attention sink kept): Spearman with length = {raw.length_spearman:.2f}")
print("variants: query='mean' (all prompt rows), length_normalized=True (Var(n*a))")
print(CircuitSeerScorer(model, tok, heads, query="mean", length_normalized=True).score_texts(["What is 2 + 3?"]))
