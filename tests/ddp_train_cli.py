"""``circuit-peft train`` under torchrun with 2 CPU processes (gloo); run by tests/test_train_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/ddp_train_cli.py OUT_DIR TRAIN-FLAGS...

Runs the command's own entry point (``circuit_peft.cli.main``) after wrapping three recipe functions (in the stage modules that call them) to
record, per rank, what this process did: ``OUT_DIR/calls<r>.json`` counts evaluations, locating and SFT
runs, and ``OUT_DIR/rank<r>_sft<k>.pt`` holds the adapter after the k-th SFT run (the wrapped functions
are called as before; only the counts and copies are added).
"""

import importlib
import json
import os
import sys

import torch


def main(out_dir: str, argv: list[str]) -> int:
    torch.set_num_threads(1)
    from circuit_peft.cli import main as cli_main

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

    for name, module_names in (("accuracy", ("evaluate", "rates", "controls")), ("locate", ("locate",)),
                               ("train_sft", ("rates",))):
        attr = {"accuracy": "measure_accuracy", "locate": "locate_for_training"}.get(name, name)
        modules = [importlib.import_module(f"circuit_peft.recipe.stages.{m}") for m in module_names]
        wrapped = counted(name, getattr(modules[0], attr))  # one wrapper, bound wherever a stage looks it up
        for module in modules:
            setattr(module, attr, wrapped)
    code = cli_main(argv)
    with open(os.path.join(out_dir, f"calls{rank}.json"), "w") as f:
        json.dump(calls, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
