"""``circuit-peft train`` launched on 2 CPU processes (torchrun, gloo), in bfloat16: the SFT stage and the
control train data-parallel on both; locating and every evaluation run on the main process only; one
report, one adapter, no lock left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
FLAGS = ["train", "--data", "arithmetic", "--n-train", "8", "--heldout", "arithmetic", "--n-heldout", "4",
         "--epochs", "1", "--max-new-tokens", "8", "--max-cut-share", "1", "--batch-size", "4",
         "--circuit-fraction", "0.05", "--controls", "random_layer", "--device", "cpu", "--dtype", "bfloat16"]


@pytest.mark.slow
def test_two_process_train_trains_on_both_and_measures_and_writes_once(tmp_path):
    from circuit_peft.models import load_tokenizer, tiny_model

    tok = load_tokenizer("smollm2")
    model_dir, out = tmp_path / "tiny", tmp_path / "run"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(TESTS.parent) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "ddp_train_cli.py"), str(tmp_path), *FLAGS, "--model", str(model_dir), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    main, other = (json.loads((tmp_path / f"calls{r}.json").read_text()) for r in (0, 1))
    assert main["locate"] == 1 and main["accuracy"] == 4  # the cap rows, before, after, the control
    assert other == {"accuracy": 0, "locate": 0, "train_sft": 2}  # it trains the circuit and the control, only
    assert main["train_sft"] == 2
    for k in (1, 2):  # DDP kept the two processes' adapters equal, and training moved them
        a, b = (torch.load(tmp_path / f"rank{r}_sft{k}.pt") for r in (0, 1))
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert all(v.dtype == torch.float32 for v in a.values())  # float32 slices on a bfloat16 base
        assert any(v.abs().sum() > 0 for n, v in a.items() if "lora_A" not in n)

    assert proc.stdout.count("circuit-peft train:") == 1 and proc.stdout.count("located - control") >= 1
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["config"]["dtype"] == "bfloat16"
    assert report["before"]["count"] == 4 and "random_layer" in report["controls"]
    assert report["training"]["examples"] == 8
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "circuit.json", "circuit.png", "report.json",
                                                      "run.json", "stages"]  # no lock, no trainer folders
    assert (out / "adapter" / "adapter_config.json").exists()
