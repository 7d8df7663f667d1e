"""Training a circuit adapter with Trainer, TRL's SFTTrainer, resume, and 2-process DDP on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from circuit_peft import CircuitConfig, load_model, load_tokenizer, tiny_model

TESTS = Path(__file__).parent
COMPONENTS = {"q": {"1": [0]}, "k": {"1": [1]}, "mlp": {"2": [4, 5]}}


def _token_dataset(n=12, length=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (n, length), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                weight_decay=0.1, use_cpu=True, report_to=[], save_strategy="steps", save_steps=3,
                logging_steps=1, disable_tqdm=True, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "circuit_" in n}


def test_trainer_checkpoints_hold_adapter_and_resume_matches(tmp_path):
    data = _token_dataset()
    full = get_peft_model(tiny_model("llama"), CircuitConfig(components=COMPONENTS))
    Trainer(model=full, args=_args(tmp_path / "full"), train_dataset=data).train()
    final = _adapter(full)
    assert all(v.abs().sum() > 0 for v in final.values())

    ckpt = tmp_path / "full" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert "model.safetensors" not in files
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "CIRCUIT"

    resumed = get_peft_model(tiny_model("llama"), CircuitConfig(components=COMPONENTS))
    Trainer(model=resumed, args=_args(tmp_path / "resumed"), train_dataset=data).train(resume_from_checkpoint=str(ckpt))
    for name, value in _adapter(resumed).items():
        assert torch.allclose(value, final[name], atol=1e-6), name

    # the checkpoint loads as a plain PEFT adapter
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "full" / "checkpoint-6")
    x = torch.tensor(data[0]["input_ids"])[None]
    with torch.no_grad():
        assert (loaded(x).logits - full.eval()(x).logits).abs().max() < 1e-5


@pytest.mark.slow
def test_sft_trainer_trains_smollm2_circuit(tmp_path):
    """SFTTrainer(peft_config=CircuitConfig) with gradient checkpointing (TRL's default) on the real model."""
    model, tok = load_model("smollm2"), load_tokenizer("smollm2", padding_side="right")
    rows = [json.loads(line) for line in (TESTS / "data" / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]]
    data = Dataset.from_list([{"prompt": r["question"], "completion": " " + r["answer"]} for r in rows])
    config = CircuitConfig(components={"q": {"24": [0, 5]}, "k": {"24": [0]}, "mlp": {"27": [10, 11, 12]}},
                           projections="paper")
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                     max_length=64, bf16=False, use_cpu=True, report_to=[], save_steps=2, logging_steps=1,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=config)
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.base_model.lowest_trained_layer == 24
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(l == l and l < 20 for l in losses)
    adapter = _adapter(trainer.model)
    assert adapter and all(v.abs().sum() > 0 for v in adapter.values())
    saved = json.loads((tmp_path / "checkpoint-2" / "adapter_config.json").read_text())
    assert saved["components"] == config.components and saved["peft_type"] == "CIRCUIT"


def _torchrun_two_ranks(script: str, out_dir):
    """Run ``tests/<script> out_dir`` under torchrun with 2 CPU processes; the two ``rank<r>.pt`` it wrote."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(TESTS.parent) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / script), str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(torch.load(out_dir / f"rank{r}.pt") for r in (0, 1))


@pytest.mark.slow
def test_two_process_ddp_ranks_train_and_agree(tmp_path):
    r0, r1 = _torchrun_two_ranks("ddp_circuit_train.py", tmp_path)
    assert r0["world_size"] == 2 and r0["steps"] == r1["steps"] == 3
    assert r0["seen"] and r1["seen"] and not set(r0["seen"]) & set(r1["seen"])  # each rank its own rows
    assert r0["adapter"].keys() == r1["adapter"].keys() and r0["adapter"]
    for name, value in r0["adapter"].items():
        assert value.abs().sum() > 0, name
        assert torch.equal(value, r1["adapter"][name]), name


@pytest.mark.slow
def test_two_process_fsdp2_matches_one_process_on_the_whole_batch(tmp_path):
    """FSDP2 (fully_shard, gloo, CPU): both ranks end with the adapter a single process trains on the
    concatenated batch (FSDP averages the ranks' gradients); the frozen base does not move."""
    sys.path.insert(0, str(TESTS))
    import fsdp_circuit_train as script

    r0, r1 = _torchrun_two_ranks("fsdp_circuit_train.py", tmp_path)
    reference = script.build_model()
    base = sum(float(p.detach().double().sum()) for n, p in reference.named_parameters() if "circuit_" not in n)
    opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    for ids in script.batches(2):
        reference(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    expected = {n: p.detach() for n, p in reference.named_parameters() if "circuit_" in n}
    assert r0["world_size"] == 2 and r0["adapter"].keys() == r1["adapter"].keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(r0["adapter"][name], r1["adapter"][name]), name
        torch.testing.assert_close(r0["adapter"][name], value, rtol=1e-4, atol=1e-5)
    assert abs(r0["base_checksum"] - base) < 1e-6 * max(1.0, abs(base))
