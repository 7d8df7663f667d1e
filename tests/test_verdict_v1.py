"""benchmarks/verdict_v1.py: the pre-registered primary family (10 tests), one Holm over it, the decision rule."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import verdict_v1  # noqa: E402

from circuit_peft.compare.verdict import paired_t  # noqa: E402


def _folder(root, name, model, pairs):
    tests = []
    for (a, b), (xs, ys) in pairs.items():
        for budget, kl in (("lora", 0.02), ("lora/10", 0.002)):
            tests.append({"a": a, "b": b, "budget": budget, "budget_kl": kl, "seeds": [0, 1, 2, 3, 4], **paired_t(xs, ys)})
    (root / name).mkdir()
    (root / name / "compare.json").write_text(json.dumps({"model": model, "tests": tests}))


def test_primary_family_is_corrected_once_and_read_by_the_registered_rule(tmp_path, capsys):
    big = ([0.70, 0.72, 0.71, 0.73, 0.70], [0.50, 0.51, 0.50, 0.52, 0.49])  # ~ +0.21, tight: shown after Holm
    same = ([0.50, 0.51, 0.50, 0.52, 0.49], [0.50, 0.51, 0.51, 0.51, 0.49])  # ~0, tight: level
    noisy = ([0.50, 0.70, 0.40, 0.65, 0.45], [0.55, 0.50, 0.60, 0.45, 0.50])  # wide: undecided
    _folder(tmp_path, "smollm2_comparison", "smollm2", {
        ("located@gradient_contrast", "twin@gradient_contrast"): big,
        ("located@gradient_contrast", "lora"): same, ("cca_mask", "cca_nomask"): noisy})
    _folder(tmp_path, "gemma3_comparison", "gemma3-270m", {
        ("located@ablation", "twin@ablation"): (big[1], big[0]), ("located@ablation", "lora"): same})
    assert verdict_v1.main(["--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "primary.json").read_text())
    rows = {(r["row"], r["budget"]): r for r in result["tests"]}
    assert len(rows) == 10
    assert all(r["p_holm"] >= r["p"] for r in rows.values())
    assert rows[("P1", "B1")]["p_holm"] == pytest.approx(min(1.0, rows[("P1", "B1")]["p"] * 10))  # smallest p: x10
    assert rows[("P1", "B1")]["decision"] == "A ahead" and rows[("P4", "B2")]["decision"] == "A behind"
    assert rows[("P2", "B1")]["decision"] == "no difference shown" and rows[("P2", "B1")]["equivalence"] == "level"
    assert rows[("P3", "B1")]["equivalence"] == "undecided"
    assert verdict_v1.t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-3)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"tests": 10, "shown": 4}


def test_an_unfinished_folder_is_named(tmp_path):
    with pytest.raises(SystemExit, match="smollm2_comparison/compare.json: missing"):
        verdict_v1.main(["--results", str(tmp_path)])
