"""benchmarks/verdict_v1.py: the pre-registered primary family (10 tests), one Holm over it, the decision rule."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import verdict_v1  # noqa: E402

from circuit_peft.compare.verdict import paired_t  # noqa: E402


def _folder(root, name, model, pairs, budgets=("lora", "lora/10")):
    tests, arms = [], {}
    for (a, b), (xs, ys) in pairs.items():
        for budget, kl in zip(budgets, (0.02, 0.002)):
            tests.append({"a": a, "b": b, "budget": budget, "budget_kl": kl, "seeds": [0, 1, 2, 3, 4], **paired_t(xs, ys)})
            for arm, values in ((a, xs), (b, ys)):
                arms.setdefault(arm, {})[budget] = {"per_seed": dict(enumerate(values))}
    (root / name).mkdir()
    (root / name / "compare.json").write_text(json.dumps({"model": model, "tests": tests, "arms": arms,
                                                          "budgets": dict(zip(budgets, (0.02, 0.002)))}))


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


def test_the_tier1_result_is_read_once_tier2_rewrote_compare_json(tmp_path):
    """After a folder's tier-2 command, compare.json holds the secondary comparisons; the primary table reads tier1/."""
    same = ([0.50, 0.51, 0.50, 0.52, 0.49], [0.50, 0.51, 0.51, 0.51, 0.49])
    _folder(tmp_path, "smollm2_comparison", "smollm2", {
        ("located@gradient_contrast", "twin@gradient_contrast"): same, ("located@gradient_contrast", "lora"): same,
        ("cca_mask", "cca_nomask"): same})
    _folder(tmp_path, "gemma3_comparison", "gemma3-270m", {("located@ablation", "twin@ablation"): same,
                                                          ("located@ablation", "lora"): same})
    folder = tmp_path / "smollm2_comparison"
    (folder / "tier1").mkdir()
    (folder / "compare.json").rename(folder / "tier1" / "compare.json")
    (folder / "compare.json").write_text(json.dumps({"model": "smollm2", "tests": []}))  # tier 2's comparisons
    assert verdict_v1.main(["--results", str(tmp_path)]) == 0
    assert len(json.loads((tmp_path / "primary.json").read_text())["tests"]) == 10


def test_secondary_families_each_get_their_own_holm(tmp_path, capsys):
    """Section 8: S-a (9 comparisons x 2 budgets, one across the two SmolLM2 folders), S-b (P1-P5 on arithmetic),
    and the CCA facts; a family whose folders have not finished says so instead of a table."""
    big = ([0.70, 0.72, 0.71, 0.73, 0.70], [0.50, 0.51, 0.50, 0.52, 0.49])
    same = ([0.50, 0.51, 0.50, 0.52, 0.49], [0.50, 0.51, 0.51, 0.51, 0.49])
    assert verdict_v1.secondary(tmp_path)["S-a"].startswith("not finished")
    _folder(tmp_path, "smollm2_comparison", "smollm2", {(a, b): same for f, a, b in verdict_v1.S_A_IN_FOLDER
                                                        if f == "smollm2_comparison"} | {("lora", "base"): same})
    _folder(tmp_path, "smollm2_comparison_grad2", "smollm2", {("located@gradient", "twin@gradient"): big},
            budgets=("0.02", "0.002"))
    _folder(tmp_path, "gemma3_comparison", "gemma3-270m", {("cca_mask", "cca_nomask"): same})
    assert verdict_v1.secondary(tmp_path)["S-a"] == "tier 2 not finished: gemma3_comparison"
    (tmp_path / "gemma3_comparison" / "compare.json").unlink()
    (tmp_path / "gemma3_comparison").rmdir()
    _folder(tmp_path, "gemma3_comparison", "gemma3-270m", {("cca_mask", "cca_nomask"): same, ("cca_mask", "cca_twin"): same})
    cca = tmp_path / "smollm2_comparison" / "cca"
    cca.mkdir()
    (cca / "dcm_seed0_stats.json").write_text(json.dumps({"records": 60, "mining": {"problems": 64}, "kept": 90,
                                                          "component_fraction": 0.01}))
    (cca / "dcm_seed0.json").write_text(json.dumps({"meta": {"epochs_run": 12, "stopped_early": True}}))
    (cca / "cca_mask_lr0.0001_seed0.json").write_text(json.dumps({"best_step": 20, "best_val": 0.6,
                                                                  "point": {"test_acc": 0.61}}))
    assert verdict_v1.main(["--results", str(tmp_path), "--secondary"]) == 0
    result = json.loads((tmp_path / "secondary.json").read_text())
    s_a = result["S-a"]
    assert len(s_a) == 18 and result["S-b"] == "not finished: smollm2_arithmetic"
    across = [r for r in s_a if (r["a"], r["b"]) == ("located@gradient", "lora")]
    assert len(across) == 2 and across[0]["diff"] == pytest.approx(0.21, abs=0.01)  # grad2's located vs the folder's lora
    grad2 = next(r for r in s_a if r["b"] == "twin@gradient")
    assert grad2["p_holm"] == pytest.approx(min(1.0, grad2["p"] * 18)) and grad2["decision"] == "A ahead"
    seed0 = result["cca"]["smollm2_comparison"]["seeds"]["0"]
    assert seed0["records_per_problem"] == pytest.approx(60 / 64) and seed0["dcm_epochs"] == 12
    assert result["cca"]["smollm2_comparison"]["paper_rule"]["cca_mask_lr0.0001_seed0"]["test_acc"] == 0.61
    assert "(Holm, 18)" in capsys.readouterr().out
    grad2_result = json.loads((tmp_path / "smollm2_comparison_grad2" / "compare.json").read_text())
    grad2_result["budgets"]["0.02"] = 0.021  # not tier 1's number: the cross-folder row refuses
    (tmp_path / "smollm2_comparison_grad2" / "compare.json").write_text(json.dumps(grad2_result))
    with pytest.raises(SystemExit, match="budget B1 0.021 is not"):
        verdict_v1.secondary(tmp_path)
    assert verdict_v1.markdown({"tests": [{**s_a[0], "se": None, "p": None, "p_holm": None}]}).count(" - |") == 3
