"""Train a circuit adapter under FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU with gloo; run by
tests/test_tuner_training.py.

    torchrun --standalone --nproc_per_node 2 tests/fsdp_circuit_train.py OUT_DIR

Every decoder layer and the root are sharded; each rank trains on its own half of every batch with
AdamW for ``STEPS`` steps. Each rank writes ``OUT_DIR/rank<r>.pt`` with the full (gathered) adapter
tensors and a checksum of the frozen base weights.
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard

from circuit_peft import CircuitConfig, tiny_model

STEPS = 3
CONFIG = dict(components={"q": {"1": [0]}, "mlp": {"2": [4, 5]}}, init_weights=False)


def batches(n_ranks: int) -> list[torch.Tensor]:
    """The global batch of every step, shape (2 * n_ranks, 80); rank r trains on rows 2r, 2r+1 (160 tokens:
    circuit layers take their fused training forward)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (2 * n_ranks, 80), generator=g) for _ in range(STEPS)]


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_peft_model(tiny_model("llama"), CircuitConfig(**CONFIG))


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for ids in batches(world):
        mine = ids[2 * rank : 2 * rank + 2]
        model(input_ids=mine, labels=mine).loss.backward()
        opt.step()
        opt.zero_grad()
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}
    adapter = {n: v for n, v in full.items() if "circuit_" in n}
    base = sum(float(v.double().sum()) for n, v in full.items() if "circuit_" not in n)
    torch.save({"adapter": adapter, "base_checksum": base, "world_size": world}, os.path.join(out_dir, f"rank{rank}.pt"))
    del model, opt, full, adapter
    shut_down()


def shut_down() -> None:
    """Wait until both ranks are past their last all-gather, free what FSDP left (the caller dropped the model
    and optimizer), then destroy the group: a gloo work object still being freed by the group's thread while
    the group was torn down aborted a rank once in CI ("terminate called without an active exception")."""
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1])
