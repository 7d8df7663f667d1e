"""A worker that the SIGKILL tests (tests/test_kill.py) start and kill at a random moment.

    python tests/kill_worker.py score CACHE_DIR OUT.npy   # CircuitSeer scores of 24 GSM8K rows, resumable cache
    python tests/kill_worker.py save FOLDER               # save an adapter into FOLDER again and again
    python tests/kill_worker.py mine FOLDER               # mine pivotal tokens of 4 problems (SmolLM2), resumable
    python tests/kill_worker.py amplify MODEL_DIR FOLDER  # `circuit-peft amplify` on a tiny model, 6 problems
    python tests/kill_worker.py alternate ROOT SEED TRIALS  # save_pretrained of two adapters alternately, killed
    python tests/kill_worker.py train MODEL_DIR FOLDER    # `circuit-peft train` on a tiny model: controls, rate grid
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


TRAIN_ARGS = ["--data", "arithmetic", "--n-train", "6", "--heldout", "arithmetic", "--n-heldout", "3", "--epochs", "1",
              "--max-new-tokens", "4", "--circuit-fraction", "0.1", "--controls", "random_layer", "--lrs", "1e-3,3e-2",
              "--validation-fraction", "0.34", "--mmlu-limit", "1", "--truthfulqa-limit", "2", "--kl-chunks", "1",
              "--grid-extensions", "0", "--max-cut-share", "1"]


def train(model_dir: str, folder: str) -> None:
    from circuit_peft.cli import main

    torch.set_num_threads(1)
    sys.exit(main(["train", "--model", model_dir, *TRAIN_ARGS, "--out", folder]))


def two_adapters(which: str):
    """PeftModel ``a`` or ``b`` on the tiny llama, each with two CIRCUIT adapters (``default``, ``extra``) of
    different components and settings; every trained value of an adapter is one number (a: 1 and 3, b: 2 and 4)."""
    from peft import get_peft_model

    from circuit_peft import CircuitConfig
    from circuit_peft.models import tiny_model

    spec = {"a": ([("q", 1, 0), ("mlp", 2, 5)], {}, [("k", 0, 1)], 1.0),
            "b": ([("q", 0, 1), ("o", 1, 2), ("mlp", 1, 3)], {"r": 2}, [("v", 1, 0), ("mlp", 0, 7)], 2.0)}[which]
    model = get_peft_model(tiny_model("llama"), CircuitConfig.from_components(spec[0], **spec[1]))
    model.add_adapter("extra", CircuitConfig.from_components(spec[2]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "circuit_" in name:
                p.fill_(spec[3] + (2.0 if ".extra" in name else 0.0))
    return model


def alternate(root: str, seed: str, trials: str) -> None:
    """Per trial: fork a child that saves adapters a and b alternately into one folder (``save_pretrained``, no
    atomic_dir) forever, SIGKILL it at a random moment, print the folder, wait for a line on stdin. Even trials
    start in a new folder, odd ones save into the folder the trial before left. One process, forked children:
    no interpreter start per trial."""
    import os
    import random
    import signal
    import time

    torch.set_num_threads(1)  # no thread pool in the children of fork
    models = two_adapters("a"), two_adapters("b")
    start = time.perf_counter()
    for m in models:
        m.save_pretrained(os.path.join(root, "timing"))
    cycle = time.perf_counter() - start  # seconds to save a and b once
    rng = random.Random(int(seed))
    for trial in range(int(trials)):
        folder = os.path.join(root, f"f{trial // 2}")
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    for m in models:
                        m.save_pretrained(folder)
            finally:
                os._exit(1)  # never run the parent's code in the child
        time.sleep(rng.uniform(0, 3 * cycle))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print(folder, flush=True)
        sys.stdin.readline()


if __name__ == "__main__":
    {"score": score, "save": save, "mine": mine, "amplify": amplify, "alternate": alternate,
     "train": train}[sys.argv[1]](*sys.argv[2:])
