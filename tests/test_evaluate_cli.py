"""``circuit-peft eval`` end to end on a tiny saved model + LoRA adapter and the vendored data."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from circuit_peft.cli import main
from circuit_peft.models import load_tokenizer, tiny_model

DATA = Path(__file__).parent / "data"


@pytest.mark.slow
def test_eval_cli_report(tmp_path, capsys):
    tok = load_tokenizer("smollm2")
    model_dir, adapter_dir, out = tmp_path / "model", tmp_path / "adapter", tmp_path / "report.json"
    model = tiny_model("llama", vocab_size=len(tok))
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft.save_pretrained(adapter_dir)
    argv = ["eval", "--model", str(model_dir), "--adapter", str(adapter_dir), "--data-dir", str(DATA),
            "--tasks", "gsm8k,mmlu,truthfulqa,kl", "--limit", "2", "--mmlu-subjects", "elementary_mathematics",
            "--mmlu-shots", "1", "--kl-chunks", "2", "--kl-chunk-length", "32", "--max-new-tokens", "4",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["gsm8k"]["count"] == 2 and len(report["gsm8k"]["records"]) == 2
    se = report["side_effects"]
    assert se["mmlu_count"] == 2 and se["truthfulqa_count"] == 2 and se["kl"] > 0
    assert "kl" in capsys.readouterr().out
    # bad input: a clear error and exit code 2, before any model is loaded
    assert main(["eval", "--model", str(model_dir), "--tasks", "gsm8k,trivia"]) == 2
    assert main(["eval", "--model", str(model_dir), "--data-dir", str(DATA), "--tasks", "kl"]) == 2
    assert main(["eval", "--model", str(model_dir), "--data-dir", str(tmp_path), "--tasks", "gsm8k"]) == 2
    assert "trivia" in capsys.readouterr().err
    # the model alone (no base): MMLU and TruthfulQA scored for it; with a base, GSM8K of both
    alone = tmp_path / "alone.json"
    assert main(["eval", "--model", str(model_dir), "--data-dir", str(DATA), "--tasks", "mmlu,truthfulqa",
                 "--limit", "2", "--mmlu-subjects", "elementary_mathematics", "--mmlu-shots", "0", "--quiet",
                 "--out", str(alone)]) == 0
    report = json.loads(alone.read_text())
    assert report["mmlu"]["count"] == 2 and report["truthfulqa"]["count"] == 2 and "side_effects" not in report
    both = tmp_path / "both.json"
    assert main(["eval", "--model", str(model_dir), "--adapter", str(adapter_dir), "--data-dir", str(DATA),
                 "--tasks", "gsm8k", "--limit", "2", "--max-new-tokens", "4", "--with-base", "--no-records",
                 "--quiet", "--out", str(both)]) == 0
    report = json.loads(both.read_text())
    assert report["gsm8k_base"]["count"] == 2 and "records" not in report["gsm8k"]
