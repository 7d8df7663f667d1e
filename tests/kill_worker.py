"""A worker that the SIGKILL tests (tests/test_kill.py) start and kill at a random moment.

    python tests/kill_worker.py score CACHE_DIR OUT.npy   # CircuitSeer scores of 24 GSM8K rows, resumable cache
    python tests/kill_worker.py save FOLDER               # save an adapter into FOLDER again and again
    python tests/kill_worker.py mine FOLDER               # mine pivotal tokens of 4 problems (SmolLM2), resumable
    python tests/kill_worker.py amplify MODEL_DIR FOLDER  # `circuit-peft amplify` on a tiny model, 6 problems
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"
HEADS = [(0, 1), (1, 0), (1, 3)]


def score(cache_dir: str, out: str) -> None:
    import datasets

    from circuit_peft.models import load_tokenizer, tiny_model
    from circuit_peft.select import CircuitSeerScorer

    torch.set_num_threads(1)
    rows = [json.loads(line) for line, _ in zip(open(DATA), range(24))]
    model, tok = tiny_model("llama", vocab_size=49152), load_tokenizer("smollm2")
    scorer = CircuitSeerScorer(model, tok, HEADS, length_debias=False, cache_dir=cache_dir, chunk_size=2,
                               batch_size=2, progress=False)
    np.save(out, scorer.score(datasets.Dataset.from_list(rows)))


def save(folder: str) -> None:
    from peft import get_peft_model

    from circuit_peft import CircuitConfig
    from circuit_peft.files import atomic_dir
    from circuit_peft.models import tiny_model

    model = get_peft_model(tiny_model("llama"), CircuitConfig.from_components([("q", 1, 0), ("mlp", 2, 5)]))
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(1, 10_000):
        with torch.no_grad():
            for p in params:
                p.fill_(float(step))  # every trained value of this save is `step`
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            (tmp / "step.txt").write_text(str(step))
        print(step, flush=True)  # the parent starts its random clock after the first save


def mine(folder: str) -> None:
    from circuit_peft.cca.mining import mine_pivotal_tokens
    from circuit_peft.cca.problems import ARITHMETIC_SHOTS
    from circuit_peft.models import load_model, load_tokenizer

    torch.set_num_threads(1)
    problems = [{"id": f"p{a}", "question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
                for a, b in ((63, 55), (40, 49), (58, 67), (36, 86))]
    mine_pivotal_tokens(load_model("smollm2"), load_tokenizer("smollm2"), problems, folder, pivot="digit",
                        shots=[dict(s) for s in ARITHMETIC_SHOTS], max_new_tokens=14, n_samples=4, batch_size=2,
                        progress=False)


def amplify(model_dir: str, folder: str) -> None:
    from circuit_peft.cli import main

    torch.set_num_threads(1)
    code = main(["amplify", "--model", model_dir, "--problems", "demo", "--n-problems", "6", "--n-val", "2",
                 "--n-test", "4", "--pivot", "digit", "--max-new-tokens", "14", "--steps", "2", "--eval-every", "1",
                 "--optimizer", "adam", "--lr", "1e-3", "--loss", "logsigmoid", "--mmlu-limit", "1",
                 "--truthfulqa-limit", "2", "--kl-chunks", "1", "--no-progress", "--out", folder])
    sys.exit(code)


if __name__ == "__main__":
    {"score": score, "save": save, "mine": mine, "amplify": amplify}[sys.argv[1]](*sys.argv[2:])
