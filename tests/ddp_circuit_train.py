"""Train a circuit adapter with ``Trainer`` under DDP on CPU (gloo); run by tests/test_tuner_training.py.

    torchrun --standalone --nproc_per_node 2 tests/ddp_circuit_train.py OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.pt`` with its final adapter tensors, the ids of the rows it
trained on, and its step count.
"""

import os
import sys

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from circuit_peft import CircuitConfig, tiny_model


class RecordingTrainer(Trainer):
    """Remembers which rows this rank saw (first token of each row identifies it)."""

    seen: list[int] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen.extend(inputs["input_ids"][:, 0].tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (16, 80), generator=g)  # 2 rows x 80 = 160 tokens a step: the fused forward
    ids[:, 0] = torch.arange(16) + 3  # row id in the first token
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = get_peft_model(tiny_model("llama"), CircuitConfig(components={"q": {"1": [0]}, "mlp": {"2": [4, 5]}}))
    args = TrainingArguments(
        output_dir=out_dir, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, weight_decay=0.1,
        use_cpu=True, ddp_backend="gloo", report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=0,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "circuit_" in n}
    torch.save(
        {"adapter": adapter, "seen": trainer.seen, "steps": trainer.state.global_step,
         "world_size": trainer.args.world_size},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    # every rank past its last collective before the group goes: a gloo work object still being freed by the
    # group's thread while the group is destroyed deadlocked (or aborted) a rank at exit under load
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
