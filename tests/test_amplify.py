"""`circuit-peft mine`, `circuit-peft amplify` (mine -> locate -> update -> evaluate) and the demo's
settings, on the real SmolLM2 with a handful of problems and short traces."""

import json

import pytest
from peft import PeftModel

from circuit_peft.circuit import Circuit
from circuit_peft.cli import build_parser, main
from circuit_peft.models import load_model


@pytest.mark.slow
def test_mine_cli_resumes_and_reports_bad_gold(tmp_path, capsys):
    problems = tmp_path / "p.jsonl"
    rows = [{"id": "a", "question": "What is 63 + 55?", "answer": "#### 118"},
            {"id": "b", "question": "What is 40 + 49?", "answer": "40 + 49 = 89\n#### 89"},
            {"id": "c", "question": "What is 2 + 2?", "answer": "four"}]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["mine", "--problems", str(problems), "--out", str(tmp_path / "m"), "--pivot", "digit", "--shots",
            "arithmetic", "--max-new-tokens", "14", "--no-progress"]
    assert main(base + ["--max-problems", "1"]) == 0
    assert len((tmp_path / "m" / "progress.jsonl").read_text().splitlines()) == 1
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "skipped 1 problems without a parsable gold answer" in out and "['c']" in out
    assert len((tmp_path / "m" / "progress.jsonl").read_text().splitlines()) == 2
    assert main(["mine", "--problems", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_amplify_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["amplify", "--problems", "demo", "--n-problems", "6", "--n-val", "2", "--n-test", "4",
                 "--pivot", "digit", "--max-new-tokens", "14", "--steps", "2", "--eval-every", "1",
                 "--optimizer", "adam", "--lr", "1e-3", "--loss", "logsigmoid", "--mmlu-limit", "1",
                 "--truthfulqa-limit", "2", "--kl-chunks", "1", "--no-progress", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "accuracy before" in printed and "side effects: MMLU" in printed
    report = json.loads((out / "report.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "component_fraction", "param_fraction", "trainable_params",
                "n_records"):
        assert key in report
    assert 0 < report["component_fraction"] <= 0.05 and report["param_fraction"] > 0
    assert report["side_effects"]["kl"] >= 0 and "mmlu_delta" in report["side_effects"]
    assert report["update"]["history"][0]["step"] == 0 and "val" in report["update"]["history"][0]
    assert (out / "circuit.png").stat().st_size > 1000
    model = load_model("smollm2")
    circuit = Circuit.load(out / "circuit.json", model=model)
    assert len(circuit.components) == report["circuit"]["kept"]
    loaded = PeftModel.from_pretrained(model, str(out / "adapter"))
    assert loaded.peft_config["default"].components


def test_demo_settings_and_empty_heldout_error(capsys):
    args = build_parser().parse_args(["demo"])
    assert (args.problems, args.pivot, args.heldout, args.locate) == ("demo", "digit", "demo", "attribution")
    assert args.max_new_tokens <= 16 and args.n_problems <= 64 and args.side_effect_data == "package"
    # a file of training problems needs held-out problems
    assert main(["amplify", "--problems", "x.jsonl", "--out", "/tmp/never"]) == 2
    assert "no data file at x.jsonl" in capsys.readouterr().err
