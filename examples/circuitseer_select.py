"""Soft sampling (Gumbel-top-k over z-scored scores) and the baselines, on made-up scores and GSM8K rows."""

import json
from pathlib import Path

import numpy as np
import torch

from circuit_peft import load_model, load_tokenizer
from circuit_peft.select import (
    ResponseLossScorer, gumbel_top_k, ifd_indices, length_matched_indices, max_loss_indices, prompt_lengths,
    random_indices, select_indices, select_subset,
)

torch.set_num_threads(1)
scores = np.random.default_rng(0).normal(size=1000)
print("tau=0 (top-k):", select_indices(scores, fraction=0.01, tau=0.0))
print("tau=0.5      :", select_indices(scores, fraction=0.01, tau=0.5, seed=1))
print("tau=1e9 (~random):", select_indices(scores, fraction=0.01, tau=1e9, seed=1))
print("draw order:", gumbel_top_k(scores, k=5, tau=0.5, seed=1))

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "gsm8k" / "train.jsonl"
rows = [json.loads(line) for line in DATA.read_text().splitlines()[:8]]
model, tok = load_model("smollm2"), load_tokenizer("smollm2")
subset = select_subset(rows, np.arange(8.0), fraction=0.25, tau=0.0)  # a datasets.Dataset
print(len(subset), "rows kept")

losses = ResponseLossScorer(model, tok, batch_size=8)
cond = losses.conditional(rows)              # L(answer | question): the max-loss score
ifd = losses.ifd(rows, conditional=cond)     # L(answer | question) / L(answer)
lengths = prompt_lengths(tok, rows)
print("max-loss:", max_loss_indices(cond, fraction=0.25))
print("IFD (IFD > 1 dropped):", ifd_indices(ifd, fraction=0.25), np.round(ifd, 3))
print("random:", random_indices(len(rows), 0.25, seed=0))
print("length-matched to max-loss:", length_matched_indices(lengths, max_loss_indices(cond, fraction=0.25), seed=0))
