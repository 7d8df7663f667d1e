"""``circuit-peft train`` under torchrun with 2 CPU processes (gloo); run by tests/test_train_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/ddp_train_cli.py OUT_DIR TRAIN-FLAGS...

Runs the command's own entry point (``circuit_peft.cli.main``) after wrapping three recipe functions to
record, per rank, what this process did: ``OUT_DIR/calls<r>.json`` counts evaluations, locating and SFT
runs, and ``OUT_DIR/rank<r>_sft<k>.pt`` holds the adapter after the k-th SFT run (the wrapped functions
are called as before; only the counts and copies are added).
"""

import json
import os
import sys

import torch


def main(out_dir: str, argv: list[str]) -> int:
    torch.set_num_threads(1)
    from circuit_peft.cli import main as cli_main
    from circuit_peft.recipe import pipeline

    rank = int(os.environ["RANK"])
    calls = {"accuracy": 0, "locate": 0, "train_sft": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            result = fn(*args, **kwargs)
            if name == "train_sft":
                adapter = {n: p.detach().clone() for n, p in args[0].named_parameters() if p.requires_grad}
                torch.save(adapter, os.path.join(out_dir, f"rank{rank}_sft{calls[name]}.pt"))
            return result
        return wrapper

    pipeline.measure_accuracy = counted("accuracy", pipeline.measure_accuracy)
    pipeline.locate_for_training = counted("locate", pipeline.locate_for_training)
    pipeline.train_sft = counted("train_sft", pipeline.train_sft)
    code = cli_main(argv)
    with open(os.path.join(out_dir, f"calls{rank}.json"), "w") as f:
        json.dump(calls, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
