"""Train a circuit adapter with ``PivotalTrainer`` under DDP on CPU (gloo), once with the batch's shared prompt
prefix run once and once with every row whole; run by tests/test_pivotal_trainers.py.

    torchrun --standalone --nproc_per_node 2 tests/ddp_pivotal_prefix.py OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.pt`` with both runs' final adapter tensors and the batch shapes that
reached the input embeddings.
"""

import os
import sys

import torch
from peft import get_peft_model
from transformers import TrainingArguments

from circuit_peft import CircuitConfig, tiny_model
from circuit_peft.cca.trainers import PivotalTrainer
from circuit_peft.taskdata import build_pivotal_dataset


def rows(n: int = 8, prefix_len: int = 24):
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 128, (prefix_len,), generator=g).tolist()
    out = []
    for i in range(n):
        rest = torch.randint(3, 128, (6 + i % 3,), generator=g).tolist()
        ids = prefix + rest
        out.append({"input_ids": ids, "completion_mask": [0] * (len(ids) - 3) + [1] * 3,
                    "pivotal_positions": [len(ids) - 1]})
    return build_pivotal_dataset(out, pivotal_weight=5.0)


def train(out_dir: str, share: bool):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), CircuitConfig(components={"q": {"1": [0]}, "mlp": {"2": [4, 5]}}))
    # plain SGD: Adam turns float rounding in near-zero gradients into full-size steps (1e-6 apart on some CPUs)
    args = TrainingArguments(
        output_dir=out_dir, max_steps=2, per_device_train_batch_size=2, learning_rate=1.0, optim="sgd", use_cpu=True,
        ddp_backend="gloo", report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    trainer = PivotalTrainer(model=model, args=args, train_dataset=rows())
    trainer.share_prompt_prefix = share
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, inp, _o: shapes.append(tuple(inp[0].shape)))
    trainer.train()
    hook.remove()
    adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "circuit_" in n}
    return trainer, adapter, shapes


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    _, shared, shared_shapes = train(out_dir, True)
    trainer, whole, whole_shapes = train(out_dir, False)
    rank = int(os.environ.get("RANK", 0))
    torch.save({"shared": shared, "whole": whole, "shared_shapes": shared_shapes, "whole_shapes": whole_shapes,
                "world_size": trainer.args.world_size}, os.path.join(out_dir, f"rank{rank}.pt"))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
