"""`circuit-peft select` end to end on the real SmolLM2 and a few GSM8K rows, and its bad-input errors."""

import json
from pathlib import Path

import pytest

from circuit_peft.cli import main
from circuit_peft.models import tiny_model
from circuit_peft.select import ReasoningHeads

DATA = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("select_cli")
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:10]]
    path = folder / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, path, rows


@pytest.mark.slow
def test_cli_circuitseer_writes_subset_and_histogram(pool, smollm2, capsys):
    folder, path, rows = pool
    heads = ReasoningHeads.from_list([(2, 3), (5, 1)], smollm2[0]).save(folder / "heads.json")
    out, plot = folder / "subset.jsonl", folder / "scores.png"
    assert main(["select", "--model", "smollm2", "--data", str(path), "--fraction", "0.3", "--heads", str(heads),
                 "--out", str(out), "--plot", str(plot), "--cache-dir", str(folder / "cache")]) == 0
    subset = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(subset) == 3 and all(rows[r["pool_index"]]["question"] == r["question"] for r in subset)
    assert all(isinstance(r["score"], float) for r in subset)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "kept 3 of 10 rows" in text and "examples/s" in text and "Spearman" in text

    assert main(["select", "--data", str(path), "--fraction", "0.5", "--method", "random", "--seed", "3",
                 "--out", str(folder / "random.jsonl")]) == 0
    assert len((folder / "random.jsonl").read_text().splitlines()) == 5


@pytest.mark.slow
def test_cli_max_loss(pool, capsys):
    folder, path, rows = pool
    small = folder / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    out = folder / "maxloss.jsonl"
    assert main(["select", "--data", str(small), "--fraction", "0.5", "--method", "max-loss", "--out", str(out),
                 "--batch-size", "4", "--max-length", "96"]) == 0
    subset = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(subset) == 2 and min(r["score"] for r in subset) > 0
    assert "Spearman" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_bad_input(pool, capsys, tmp_path):
    folder, path, rows = pool
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + json.dumps({"question": "hi"}) + "\n")
    assert main(["select", "--data", str(bad), "--method", "ifd", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "row 3" in capsys.readouterr().err
    assert main(["select", "--data", str(path), "--question-field", "problem", "--out", str(tmp_path / "o")]) == 2
    assert "no question field 'problem'" in capsys.readouterr().err
    for fraction in ("0", "1.5", "-0.2"):
        assert main(["select", "--data", str(path), "--fraction", fraction, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "--fraction" in err and "must be in (0, 1]" in err
    foreign = ReasoningHeads.from_list([(0, 1)], tiny_model("gpt2")).save(tmp_path / "foreign.json")
    assert main(["select", "--data", str(path), "--heads", str(foreign), "--out", str(tmp_path / "o")]) == 2
    assert "made for another model" in capsys.readouterr().err
    heads = ReasoningHeads.from_list([(1, 0)]).save(tmp_path / "h.json")
    assert main(["select", "--data", str(path), "--heads", str(heads), "--max-length", "16", "--on-long", "error",
                 "--out", str(tmp_path / "o")]) == 2
    assert "longer than the model's context of 16 tokens" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
