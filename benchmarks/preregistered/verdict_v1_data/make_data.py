"""Writes the problem files of the pre-registered run verdict_v1 (committed with it; rerun to check: same bytes).

Per task: ``<task>_pool.jsonl`` (96 problems of the training hash split: each seed holds back a seeded third as
validation, fits on the rest) and ``<task>_test.jsonl`` (150 problems of the test hash split; never read before
the run). Seeds 1000+ of the training split were the regime measurement's draws (benchmarks/regime.py); these use
seed 36 (pool) and 3600 (test). Before benchmarks/regime.py, an exploratory greedy-only probe of the base models
drew candidate-format problems without the hash split; of its problems, two are test problems here
(``PROBED``): they are left out of the test files.
"""

import json
from pathlib import Path

from circuit_peft.cca.problems import TASKS, make_problems

HERE = Path(__file__).parent
PROBED = {"test-larger-26-71", "test-add-20-12"}
for task in ("comparison", "arithmetic"):
    kinds = TASKS[task]["kinds"]
    for name, rows in (("pool", make_problems(96, "train", seed=36, kinds=kinds)),
                       ("test", [r for r in make_problems(152, "test", seed=3600, kinds=kinds)
                                 if r["id"] not in PROBED][:150])):
        (HERE / f"{task}_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
