"""The lm-evaluation-harness bridge: offline task configs equal lm-eval's own but for the data source,
and the harness's per-document log-likelihoods on SmolLM2 + a CIRCUIT adapter (loaded through lm-eval's
``peft=``) equal the adapter model's own."""

import csv
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from circuit_peft.evaluate.harness import local_task_configs, task_file_config  # noqa: E402

DATA = Path(__file__).parent / "data"
DATA_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "fewshot_split"}


def test_offline_configs_are_lm_evals_own_with_local_data(tmp_path):
    gsm8k, mmlu = local_task_configs(["gsm8k", "mmlu_elementary_mathematics"], DATA, tmp_path)
    for local, own in ((gsm8k, task_file_config("gsm8k", "gsm8k.yaml")),
                       (mmlu, task_file_config("mmlu", "default", "mmlu_elementary_mathematics.yaml"))):
        assert {k: v for k, v in local.items() if k not in DATA_KEYS} == {k: v for k, v in own.items()
                                                                          if k not in DATA_KEYS}
        assert local["dataset_path"] == "json" and local["dataset_name"] is None
    assert gsm8k["dataset_kwargs"]["data_files"]["test"] == str(DATA / "gsm8k" / "test.jsonl")
    rows = [json.loads(x) for x in Path(mmlu["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    with open(DATA / "mmlu" / "test" / "elementary_mathematics_test.csv", newline="") as f:
        source = list(csv.DictReader(f))
    assert len(rows) == len(source) and rows[0]["choices"][2] == source[0]["choice2"]
    assert rows[0]["answer"] == int(source[0]["answer"]) and rows[0]["subject"] == "elementary_mathematics"


def test_offline_tasks_refuse_what_they_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="offline tasks are gsm8k, mmlu_<subject>"):
        local_task_configs(["hellaswag"], DATA, tmp_path)
    with pytest.raises(FileNotFoundError, match="mmlu_anatomy"):
        local_task_configs(["mmlu_anatomy"], DATA, tmp_path)
    bad = tmp_path / "data" / "mmlu" / "test"
    bad.mkdir(parents=True)
    (bad / "x_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,7\n")
    with pytest.raises(ValueError, match=r"x_test.csv: row 1 answer '7' is neither 0-3 nor A-D"):
        local_task_configs(["mmlu_x"], tmp_path / "data", tmp_path)
    from circuit_peft.evaluate.harness import run_harness

    with pytest.raises(ValueError, match="no dev split to draw 5 shots from"):  # not shots from the test split
        run_harness("/no/model/needed", ["mmlu_elementary_mathematics"], data_dir=DATA, work_dir=tmp_path,
                    num_fewshot=5)


@pytest.mark.slow
def test_harness_scores_the_adapter_it_loads_through_peft(tmp_path, capsys):
    from peft import get_peft_model

    from circuit_peft import CircuitConfig
    from circuit_peft.cli import main
    from circuit_peft.evaluate.generation import continuation_logprobs
    from circuit_peft.evaluate.harness import run_harness
    from circuit_peft.models import load_model, load_tokenizer, resolve_model_path

    tok = load_tokenizer("smollm2")
    model = get_peft_model(load_model("smollm2"), CircuitConfig.from_components(
        [("q", 3, 1), ("v", 5, 0)] + [("mlp", 10, i) for i in range(40)], projections="paper"))
    torch.manual_seed(0)
    with torch.no_grad():  # a visible change: the adapter's deltas are zero when created
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    task = "mmlu_elementary_mathematics"
    out = run_harness(resolve_model_path("smollm2"), [task], adapter=tmp_path / "adapter", data_dir=DATA,
                      work_dir=tmp_path / "work", limit=3, batch_size=4, log_samples=True)
    samples = out["samples"][task]
    pairs = [(r["arguments"]["gen_args_%d" % i] if isinstance(r["arguments"], dict) else r["arguments"][i], resp)
             for r in samples for i, resp in enumerate(r["resps"])]
    contexts = [tok(a["arg_0"] if isinstance(a, dict) else a[0])["input_ids"] for a, _ in pairs]
    conts = [tok(a["arg_1"] if isinstance(a, dict) else a[1], add_special_tokens=False)["input_ids"] for a, _ in pairs]
    ours = continuation_logprobs(model.eval(), tok, contexts, conts, progress=False)
    harness = [float(resp[0][0]) for _, resp in pairs]
    assert len(harness) == 12 and ours == pytest.approx(harness, abs=1e-3)
    with model.disable_adapter():
        base = continuation_logprobs(model, tok, contexts, conts, progress=False)
    assert max(abs(a - b) for a, b in zip(base, harness)) > 1e-2  # the harness scored the adapter, not the base

    assert main(["eval", "--harness", "lm-eval", "--model", "smollm2", "--adapter", str(tmp_path / "adapter"),
                 "--data-dir", str(DATA), "--tasks", task, "--limit", "3", "--out", str(tmp_path / "r.json")]) == 0
    assert "elementary_mathematics" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())["results"][task]
    assert saved["acc,none"] == pytest.approx(out["results"][task]["acc,none"])
