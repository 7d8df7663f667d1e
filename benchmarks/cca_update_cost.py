"""Seconds per full-batch CCA update step at the verdict_v1 run's scale (exploratory timing behind its compute note).

The paper's update (``UpdateConfig.paper``: SGD at 1e-4 on the logit difference) on every weight of SmolLM2
(``cca_nomask``, the costliest target) for ``--steps`` steps on ``--records`` (64 records built from ``comparison``
problems by ``benchmarks/dcm_prefix.py``'s ``task_records(model, tokenizer, "comparison", 100, 5)[:64]``, saved as
``results/cca_update_cost_records.jsonl``), one thread, micro-batches of ``--micro-batch``.
The final JSON line has CPU and wall seconds per step (set-up and the final margin included).

    python benchmarks/cca_update_cost.py --records R.jsonl [--micro-batch 16] [--out F]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench import Stopwatch, final_line  # noqa: E402
from circuit_peft.cca.update import UpdateConfig, amplify_update  # noqa: E402
from circuit_peft.files import read_rows  # noqa: E402
from circuit_peft.models import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--records", required=True)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, model = read_rows(args.records), load_model(args.model)
    cfg = UpdateConfig.paper(lr=1e-4, target="all_weights", steps=args.steps, micro_batch_size=args.micro_batch)
    with Stopwatch() as watch:
        amplify_update(model, rows, None, None, cfg, progress=False)
    return final_line({"model": args.model, "records": len(rows), "micro_batch": args.micro_batch,
                       "cpu_s_per_step": watch.cpu / args.steps, "wall_s_per_step": watch.wall / args.steps}, args.out)


if __name__ == "__main__":
    main()
