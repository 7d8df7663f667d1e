"""The main job in one call: locate the circuit of SmolLM2 on arithmetic problems, train only it with
answer-weighted SFT, and compare held-out accuracy before/after (what `circuit-peft train` runs).

Sized for a few minutes on a CPU; `make demo` runs the same with 64 training and 100 held-out problems."""

import torch

from circuit_peft import SFTSettings, TrainConfig, make_problems, train

torch.set_num_threads(2)
train_rows = make_problems(32, "train", kinds=("add", "sub"))
heldout_rows = make_problems(48, "test", kinds=("add", "sub"))
config = TrainConfig(locate="gradient", circuit_fraction=0.02, max_new_tokens=32,
                     shots=[{"question": "What is 12 + 35?", "answer": "12 + 35 = 47\n#### 47"}],
                     sft=SFTSettings(learning_rate=1e-3, epochs=4, pivotal_weight=5.0))
result = train("smollm2", train_rows, heldout_rows, "/tmp/circuit_train_example", config)
print(result.report["before"]["accuracy"], "->", result.report["after"]["accuracy"])
# result.model is the trained PEFT model; /tmp/circuit_train_example/adapter is a normal PEFT adapter
