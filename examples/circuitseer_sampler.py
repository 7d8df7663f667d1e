"""CircuitSeerSampler with a plain DataLoader and with TRL's SFTTrainer (one added line: use_sampler)."""

import json
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from trl import SFTConfig, SFTTrainer

from circuit_peft import load_tokenizer, tiny_model
from circuit_peft.select import CircuitSeerSampler, use_sampler

torch.set_num_threads(1)
scores = np.random.default_rng(0).normal(size=40)

# plain PyTorch: one subset, reshuffled each epoch (redraw_each_epoch=True draws a new subset)
sampler = CircuitSeerSampler(scores, fraction=0.2, tau=0.5, seed=0)
loader = DataLoader(torch.arange(40), batch_size=4, sampler=sampler)
for epoch in range(2):
    sampler.set_epoch(epoch)
    print("epoch", epoch, [b.tolist() for b in loader])
# under torchrun each rank gets a disjoint share: CircuitSeerSampler(scores, num_replicas=2, rank=r)

# SFTTrainer: pass the whole scored pool as train_dataset, then add the sampler
DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "gsm8k" / "train.jsonl"
rows = [json.loads(line) for line in DATA.read_text().splitlines()[:40]]
pool = datasets.Dataset.from_list([{"text": r["question"] + "\n" + r["answer"]} for r in rows])
tok = load_tokenizer("smollm2", padding_side="right")
trainer = SFTTrainer(model=tiny_model("llama", vocab_size=len(tok)), processing_class=tok, train_dataset=pool,
                     args=SFTConfig(output_dir="/tmp/circuitseer_sft", max_steps=4, per_device_train_batch_size=2,
                                    report_to="none", use_cpu=True, save_strategy="no", max_length=128))
use_sampler(trainer, sampler)  # <- the one line
trainer.train()
print("trained", trainer.state.global_step, "steps on", len(sampler), "selected rows")
