"""CircuitSeer under torchrun: each process scores a shard, results are gathered in order, and the
sampler gives each rank a disjoint share (2 CPU processes, gloo)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from circuit_peft.models import load_tokenizer, tiny_model
from circuit_peft.select import CircuitSeerScorer, select_indices

DATA = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"
HEADS = [(0, 1), (1, 2)]

WORKER = textwrap.dedent("""
    import atexit, json, os, sys
    import torch
    # registered before the library's handler, so it runs after it: was the group ended before exit?
    atexit.register(lambda: open(sys.argv[2] + ".ended" + os.environ["RANK"], "w").write(
        str(not torch.distributed.is_initialized())))
    torch.set_num_threads(1)
    from circuit_peft.models import load_tokenizer, tiny_model
    from circuit_peft.select import CircuitSeerSampler, CircuitSeerScorer
    from circuit_peft.select.cache import dist_info

    data, out, cache = sys.argv[1], sys.argv[2], sys.argv[3]
    rows = [json.loads(line) for line in open(data)][:11]
    tok = load_tokenizer("smollm2")
    model = tiny_model("llama", vocab_size=len(tok))
    calls = []
    scorer = CircuitSeerScorer(model, tok, %r, chunk_size=2, cache_dir=cache, progress=False)
    original = scorer.score_ids
    scorer.score_ids = lambda ids, advance=None: (calls.append(len(ids)), original(ids, advance))[1]
    scores = scorer.score(rows)
    rank, world = dist_info()
    share = list(CircuitSeerSampler(scores, k=6, tau=0.5, seed=3))
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, {"rank": rank, "share": share, "calls": calls,
                                                   "scores": scores.tolist()})
    if rank == 0:
        json.dump(gathered, open(out, "w"))
""" % (HEADS,))


@pytest.mark.slow
def test_torchrun_two_processes_shard_gather_and_disjoint_sampler(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(DATA), str(out), str(tmp_path / "cache")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(json.loads(out.read_text()), key=lambda r: r["rank"])
    # the process group the scorer started was destroyed at exit by the library (not left to shutdown)
    assert [Path(f"{out}.ended{r}").read_text() for r in (0, 1)] == ["True", "True"]

    rows = [json.loads(line) for line in open(DATA)][:11]
    tok = load_tokenizer("smollm2")
    torch.manual_seed(0)
    expected = CircuitSeerScorer(tiny_model("llama", vocab_size=len(tok)), tok, HEADS, progress=False).score(rows)
    for r in results:  # every process returns the full vector, in pool order
        np.testing.assert_allclose(r["scores"], expected, rtol=1e-5, atol=1e-12)
    assert results[0]["calls"] == [2, 2, 2] and results[1]["calls"] == [2, 2, 1]  # chunks 0,2,4 / 1,3,5

    a, b = results[0]["share"], results[1]["share"]
    assert len(a) == len(b) == 3 and not set(a) & set(b)
    assert set(a) | set(b) == set(select_indices(expected, k=6, tau=0.5, seed=3).tolist())
    assert len(list((tmp_path / "cache").glob("*/chunk-*.npy"))) == 6
