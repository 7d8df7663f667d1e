"""Did locating earn the gain on *your* task? Train the located circuit, then a random circuit of the same
kinds and counts in the same layers and a LoRA with about as many parameters, all with the same rows and
recipe, and read located minus each control on the same held-out problems (what `circuit-peft train
--controls random_layer,lora_matched` runs). Controls can be added to a finished run folder: its
stages are reused.

One training run per arm: the paired standard error covers the draw of held-out problems, not another
training seed; repeat with other seeds (``TrainConfig(seed=...)``) before trusting a small gap. Every arm
trains at the same rate here; ``TrainConfig(learning_rates=(3e-4, 1e-3, 3e-3))`` gives each arm its own,
chosen on a fifth of the training rows held back (three trainings per arm): a rate that suits one arm can
make another look worse than it is."""

import torch

from circuit_peft import SFTSettings, TrainConfig, make_problems, train

torch.set_num_threads(2)
train_rows = make_problems(32, "train", kinds=("add", "sub"))
heldout_rows = make_problems(48, "test", kinds=("add", "sub"))
config = TrainConfig(locate="gradient", circuit_fraction=0.005, max_new_tokens=32,
                     shots=[{"question": "What is 12 + 35?", "answer": "12 + 35 = 47\n#### 47"}],
                     sft=SFTSettings(learning_rate=1e-3, epochs=4), controls=("random_layer", "lora_matched"))
result = train("smollm2", train_rows, heldout_rows, "/tmp/circuit_controls_example", config)
for name, control in result.report["controls"].items():
    print(f"{name}: {control['accuracy']:.3f}, located - control {control['gap']:+.3f} +/- {control['gap_se']:.3f}")
