"""`circuit-peft compare` and its pieces: Holm, the paired t, test accuracy at a drift budget, uncut baselines,
rate grids widened past a chosen edge, and the command end to end on a tiny model (killed, then resumed)."""

import json
import re
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from circuit_peft.cli import build_parser, main
from circuit_peft.compare.verdict import (
    best_at_budget, betainc, holm, paired_t, resolve_budgets, t_two_sided_p, verdict,
)
from circuit_peft.errors import CircuitPeftError


def test_holm_matches_a_hand_computed_example_and_the_step_down_rule():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4 0.02, x3 0.03, x2 0.06, x1 0.04 -> kept monotone: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.2]) == [pytest.approx(0.5), None, pytest.approx(0.4)]  # None: no test, not counted
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    rng = random.Random(3)
    for _ in range(200):  # adjusted p < alpha  <=>  Holm's step-down rejects at alpha
        ps = [rng.random() ** 3 for _ in range(rng.randint(1, 8))]
        alpha = rng.choice([0.01, 0.05, 0.1])
        order = sorted(range(len(ps)), key=ps.__getitem__)
        rejected = set()
        for k, i in enumerate(order):
            if ps[i] > alpha / (len(ps) - k):
                break
            rejected.add(i)
        adjusted = holm(ps)
        assert all((adjusted[i] <= alpha) == (i in rejected) for i in range(len(ps)) if abs(adjusted[i] - alpha) > 1e-12)


def test_paired_t_and_the_beta_function_match_scipy():
    scipy = pytest.importorskip("scipy")
    from scipy import special, stats

    for a, b, x in [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (5.0, 3.0, 0.01), (1.5, 0.5, 0.999)]:
        assert betainc(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), rel=1e-10, abs=1e-14)
    a, b = [0.42, 0.50, 0.47, 0.39, 0.55], [0.40, 0.44, 0.45, 0.41, 0.47]
    mine, ref = paired_t(a, b), stats.ttest_rel(a, b)
    assert mine["t"] == pytest.approx(float(ref.statistic)) and mine["p"] == pytest.approx(float(ref.pvalue), rel=1e-9)
    assert t_two_sided_p(2.0, 3) == pytest.approx(float(2 * stats.t.sf(2.0, 3)), rel=1e-10)
    assert scipy is not None


def test_paired_t_edge_cases():
    assert paired_t([0.5], [0.4])["p"] is None  # one seed: no test
    assert paired_t([0.5, 0.6], [0.4, 0.5])["p"] == 0.0  # every seed the same gap: no spread
    assert paired_t([0.5, 0.6], [0.5, 0.6])["p"] == 1.0
    with pytest.raises(CircuitPeftError):
        paired_t([0.5], [0.4, 0.3])


def _pt(lr, step, val_acc, val_kl, test_acc):
    return {"lr": lr, "step": step, "val_acc": val_acc, "val_kl": val_kl, "test_acc": test_acc, "test_kl": val_kl}


BASE = _pt(None, 0, 0.2, 0.0, 0.25)


def test_test_accuracy_at_a_budget_is_chosen_on_validation_only():
    points = [BASE, _pt(1e-3, 2, 0.5, 0.01, 0.30), _pt(1e-3, 4, 0.6, 0.05, 0.90), _pt(3e-3, 4, 0.6, 0.03, 0.10)]
    assert best_at_budget(points, 0.0) is BASE  # the base drifts 0: always inside a budget >= 0
    assert best_at_budget(points, 0.02)["test_acc"] == 0.30
    assert best_at_budget(points, 0.04)["test_acc"] == 0.10  # best validation accuracy; its test accuracy is low
    assert best_at_budget(points, 1.0)["test_acc"] == 0.10  # a validation tie goes to the lower KL, not the test
    assert best_at_budget(points[1:], 0.001) is None


def test_budgets_derived_from_an_arm_and_the_verdict_over_seeds():
    lora = {s: [BASE, _pt(1e-3, 4, 0.4, 0.02 * (s + 1), 0.4), _pt(3e-3, 4, 0.5, 0.04 * (s + 1), 0.5),
                _pt(3e-3, 2, 0.9, 0.01, 0.9)] for s in range(3)}
    budgets = resolve_budgets(["lora", "lora/10", "0.5"], {"lora": lora})
    # the last checkpoint's best validation rate (3e-3) per seed: 0.04, 0.08, 0.12 -> mean 0.08
    assert budgets == pytest.approx({"lora": 0.08, "lora/10": 0.008, "0.5": 0.5})
    located = {s: [BASE, _pt(1e-3, 4, 0.6, 0.005, 0.5 + 0.01 * s)] for s in range(3)}
    out = verdict({"located": located, "lora": lora}, {"tight": 0.008, "loose": 0.5}, [("located", "lora")])
    assert out["arms"]["located"]["tight"]["test_acc"] == pytest.approx(0.51)
    assert out["arms"]["lora"]["tight"]["test_acc"] == pytest.approx(0.25)  # nothing within it but the base
    assert out["arms"]["lora"]["loose"]["test_acc"] == pytest.approx(0.9)
    tight, loose = out["tests"]
    assert tight["diff"] == pytest.approx(0.26) and loose["diff"] == pytest.approx(-0.39)
    assert [t["p_holm"] for t in out["tests"]] == pytest.approx(holm([tight["p"], loose["p"]]))
    with pytest.raises(CircuitPeftError, match="not an arm"):
        resolve_budgets(["lora16"], {"lora": lora})


def test_the_base_cap_is_raised_until_few_answers_are_cut_or_the_run_stops():
    from circuit_peft.recipe.caps import uncut_measure

    cut = {32: 0.5, 64: 0.1, 128: 0.01, 256: 0.0}
    calls = []

    def measure(cap):
        calls.append(cap)
        return {"accuracy": 0.3, "capped_fraction": cut[cap]}

    out = uncut_measure(measure, 32, 512, log=lambda _: None)
    assert calls == [32, 64, 128] and out["max_new_tokens"] == 128
    assert [c["capped_fraction"] for c in out["caps_tried"]] == [0.5, 0.1, 0.01]
    with pytest.raises(CircuitPeftError, match="raise --max-new-tokens-limit, or accept cut answers with --max-cut-share"):
        uncut_measure(measure, 32, 64, log=lambda _: None)  # 32 -> 64, still 10 % cut at the limit
    assert uncut_measure(measure, 32, 32, max_cut_share=0.5, log=lambda _: None)["max_new_tokens"] == 32


def test_a_rate_grid_is_widened_while_its_edge_is_chosen(tmp_path):
    from peft import get_peft_model

    from circuit_peft import CircuitConfig
    from circuit_peft.models import tiny_model
    from circuit_peft.recipe import RunFolder, fit_on_grid
    from circuit_peft.recipe.rates import beyond_edge

    assert beyond_edge([3e-4, 1e-3, 3e-3], 3e-3) == pytest.approx(9e-3)
    assert beyond_edge([3e-4, 1e-3, 3e-3], 3e-4) == pytest.approx(9e-5)
    assert beyond_edge([3e-4, 1e-3, 3e-3], 1e-3) is None and beyond_edge([1e-3], 1e-3) is None
    model = get_peft_model(tiny_model("llama"), CircuitConfig.from_components([("q", 1, 0)]))
    params = [p for p in model.parameters() if p.requires_grad]

    def train_at(m, lr):
        with torch.no_grad():
            for p in params:
                p.fill_(lr)

    def score(m):  # validation accuracy rises with the rate up to 0.02, then falls
        lr = float(params[0].flatten()[0])
        return -abs(math.log(lr / 0.02))

    run = RunFolder(tmp_path / "run", {"model": "tiny"})
    run.open()
    choice = fit_on_grid(run, "t", model, train_at, score, [1e-3, 3e-3], lambda _: None, extensions=5)
    assert list(choice.validation_accuracy) == ["0.001", "0.003", "0.009", "0.027", "0.081"]  # stops once inside
    assert choice.lr == pytest.approx(0.027) and not choice.at_edge
    capped = fit_on_grid(run, "u", model, train_at, score, [1e-3, 3e-3], lambda _: None, extensions=1)
    assert capped.lr == pytest.approx(0.009) and capped.at_edge


def test_checkpoints_and_arms_flags():
    from circuit_peft.compare.arms import checkpoint_steps, default_comparisons, parse_arms

    assert checkpoint_steps(9, 3) == [3, 6, 9] and checkpoint_steps(4, 3) == [2, 3, 4] and checkpoint_steps(1, 3) == [1]
    arms = parse_arms("base,located,twin,located@ablation,twin@ablation,lora", "gradient", ("gradient", "ablation"))
    assert [a.name for a in arms] == ["base", "located@gradient", "twin@gradient", "located@ablation",
                                      "twin@ablation", "lora"]
    assert default_comparisons(arms) == [("located@gradient", "twin@gradient"), ("located@gradient", "lora"),
                                         ("located@ablation", "twin@ablation"), ("located@ablation", "lora")]
    from circuit_peft.commands.compare import config_from_args, default_budgets, parse_lrs

    assert default_budgets(arms) == ["lora", "lora/10"] and default_budgets(arms[:2]) == ["located@gradient",
                                                                                        "located@gradient/10"]
    assert parse_lrs("3e-4,1e-3;full=1e-5") == {"*": (3e-4, 1e-3), "full": (1e-5,)}
    cfg = config_from_args(build_parser().parse_args(["compare", "--arms", "base,located,full", "--lrs", "1e-3;full=1e-5",
                                                      "--budgets", "located,0.01", "--out", "x"]))
    assert [cfg.grid(a) for a in cfg.arms] == [(), (1e-3,), (1e-5,)] and cfg.budgets == ("located@gradient", "0.01")
    for bad in ("located,located@gradient", "lora@gradient", "circuit", "located@magic", ","):
        with pytest.raises(CircuitPeftError):
            parse_arms(bad, "gradient", ("gradient", "ablation"))


VERDICT_DATA = "benchmarks/preregistered/verdict_v1_data"
VERDICT_FLAGS = [  # the pre-registered SmolLM2 command (benchmarks/preregistered/verdict_v1.md, section 10)
    "--data", f"{VERDICT_DATA}/comparison_pool.jsonl", "--heldout", f"{VERDICT_DATA}/comparison_test.jsonl",
    "--shots", "comparison", "--locate", "gradient_contrast", "--circuit-fraction", "0.005",
    "--arms", "base,located,twin,lora", "--answer", "number", "--validation-fraction", "0.3333",
    "--seeds", "0,1,2,3,4", "--checkpoints", "3", "--epochs", "3", "--batch-size", "8", "--grid-extensions", "2",
    "--budgets", "lora,lora/10", "--kl-chunks", "4", "--side-effects-data", "/work/shared/data",
    "--max-new-tokens", "32", "--dtype", "float32", "--threads", "1"]


def _compare_key(*flags: str, **train_changes) -> str:
    from dataclasses import replace
    from pathlib import Path

    from circuit_peft.commands import compare as compare_cmd
    from circuit_peft.compare.grid import run_settings
    from circuit_peft.runs import fingerprint

    root = Path(__file__).resolve().parents[1]
    flags = tuple(str(root / f) if f.startswith(VERDICT_DATA) else f for f in flags)
    args = build_parser().parse_args(["compare", "--model", "smollm2", "--out", "unused", *flags])
    rows, heldout = compare_cmd.load_compare_rows(args)
    cfg = compare_cmd.config_from_args(args)
    cfg = replace(cfg, train=replace(cfg.train, **train_changes))
    return fingerprint(run_settings("smollm2", rows, heldout, cfg))


def test_compare_folders_keep_their_key_through_the_run_schema():
    """compare's key through COMPARE_SCHEMA equals the one its folders were made with: the pre-registered
    SmolLM2 folder's run.json key, and the keys the earlier hand-made settings gave; the recipe fields compare
    does not read (or that only add stages) change nothing, data_seed counts only away from 0."""
    assert _compare_key(*VERDICT_FLAGS) == "32bf298ff9ad2b47"  # benchmarks/results/verdict_v1/smollm2_comparison
    small = ("--data", "arithmetic", "--n-train", "16")
    assert _compare_key(*small) == "02f6f90e11a69eb2"
    assert _compare_key(*small, "--dtype", "bfloat16") == "82f2d004d949fbdc"
    assert _compare_key(*small, "--data-seed", "3") == "45366f518361b1de"
    assert _compare_key(*small, "--heldout-fraction", "0.3", "--locate", "ablation", "--seeds", "4,5") \
        == "dc97439410ce76be"
    assert _compare_key(*small, controls=("lora",), learning_rates=(1e-3,), update_steps=7, select="random",
                        cca_kept_step="best_validated", grid_extensions=5, seed=3) == "02f6f90e11a69eb2"
    assert _compare_key(*small, kl_chunks=5) != "02f6f90e11a69eb2"


def test_bad_compare_flags_are_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "o"
    for flags in (["--checkpoints", "0"], ["--lrs", "1e-3,-1"], ["--lrs", "located=1e-3;=2"], ["--seeds", "0,0"],
                  ["--max-cut-share", "1.5"], ["--comparisons", "located"], ["--budgets", "-0.1"],
                  ["--budgets", "lora/0"], ["--budgets", "lora/x"], ["--budgets", ","]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["compare", *flags, "--out", str(out)])
    for flags, message in ((["--arms", "base,circuit"], "unknown arm 'circuit'"),
                           (["--comparisons", "located@gradient:full"], "'full' is not in --arms"),
                           (["--budgets", "full/10"], "'full' is not a trained arm"),
                           (["--lrs", "full=1e-5"], "name no arm"),
                           (["--max-new-tokens", "64", "--max-new-tokens-limit", "32"], "--max-new-tokens-limit")):
        assert main(["compare", *flags, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def _tiny_saved_model(tmp_path):
    from circuit_peft.models import load_tokenizer, tiny_model

    tok = load_tokenizer("smollm2")
    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def _user_jsonl(folder):
    """A user's own rows: question/answer .jsonl files (training and held-out), as `compare --data` reads them."""
    from circuit_peft.cca.problems import make_problems

    files = {}
    for split, n in (("train", 6), ("test", 2)):
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                        for r in make_problems(n, split, seed=5)))
    return files


def _compare_argv(model_dir, out, *extra):
    files = _user_jsonl(Path(model_dir).parent)
    return ["compare", "--model", str(model_dir), "--data", str(files["train"]), "--heldout", str(files["test"]),
            "--epochs", "1", "--batch-size", "2", "--max-new-tokens", "3", "--circuit-fraction",
            "0.1", "--arms", "base,located,twin", "--lrs", "located=1e-3,1e-2;twin=1e-2", "--grid-extensions", "1",
            "--budgets", "located,located/10", "--checkpoints", "2", "--seeds", "0,1", "--kl-chunks", "1",
            "--validation-fraction", "0.34", "--threads", "1", *extra, "--out", str(out)]


@pytest.mark.slow
def test_compare_end_to_end_on_a_tiny_model_killed_and_resumed(tmp_path, capsys):
    """The command on a tiny model: the base's cap check stops a run whose answers are all cut; a run killed
    after its first finished point resumes from the stages it saved and writes the table, the plot, the
    verdict and the chosen adapter."""
    from peft import PeftModel

    import circuit_peft  # noqa: F401
    from circuit_peft.models import load_model

    model_dir = _tiny_saved_model(tmp_path)
    assert main(_compare_argv(model_dir, tmp_path / "cut", "--max-new-tokens-limit", "6")) == 2
    assert "hit the token cap even at --max-new-tokens-limit 6" in capsys.readouterr().err  # a random model never stops

    out = tmp_path / "run"
    argv = _compare_argv(model_dir, out, "--max-cut-share", "1")
    proc = subprocess.Popen([sys.executable, "-m", "circuit_peft.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((out / "stages").glob("point_*.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name for p in (out / "stages").glob("*.json")}
    assert any(name.startswith("point_") for name in finished), proc.stderr.read()[-2000:]

    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in finished:  # every stage the killed run finished is reused, not redone
        assert f"[{name.removesuffix('.json')}] done earlier" in printed
    counts = re.findall(r"\[compare\] point (\d+) of (\d+): (\S+)", printed)  # the points computed now, counted
    assert int(counts[0][0]) == 1 + sum(name.startswith("point_") for name in finished)
    assert counts[-1][:2] == ("8", "8") and counts[0][1] == "6"  # 3 + 3 planned, 2 more when located's grid widened
    assert "h left at" in printed
    result = json.loads((out / "compare.json").read_text())
    assert set(result["arms"]) == {"base", "located@gradient", "twin@gradient"}
    assert set(result["budgets"]) == {"located@gradient", "located@gradient/10"}
    assert result["budgets"]["located@gradient/10"] == pytest.approx(result["budgets"]["located@gradient"] / 10)
    assert [(t["a"], t["b"], t["budget"]) for t in result["tests"]] == [
        ("located@gradient", "twin@gradient", "located@gradient"), ("located@gradient", "twin@gradient", "located@gradient/10")]
    assert all(t["p_holm"] >= t["p"] for t in result["tests"])
    assert result["grids"]["twin@gradient"] == [1e-2] and not result["at_edge"]["twin@gradient"]  # one rate: no edge
    grid = result["grids"]["located@gradient"]  # 1e-3, 1e-2 and one rate past the edge its best point sat at
    assert len(grid) == 3 and {1e-3, 1e-2} < set(grid) and (min(grid) < 1e-3 or max(grid) > 1e-2)
    stage = json.loads((out / "stages" / "point_located@gradient_lr0.01_seed0.json").read_text())
    assert [p["step"] for p in stage["points"]] == [1, 2] and all(p["val_kl"] > 0 for p in stage["points"])
    assert stage["points"][0]["val_kl"] != stage["points"][1]["val_kl"]
    assert not (out / "scratch").exists()
    assert (out / "frontier.png").stat().st_size > 1000
    table = (out / "table.md").read_text()
    assert "| located@gradient |" in table and "Holm" in table
    base = json.loads((out / "stages" / "base_seed0.json").read_text())
    assert base["capped_fraction"] == base["val_capped"] and "test_capped" in result["base"]["0"]  # test chooses no cap
    assert "of the base's validation answers cut" in table
    card = (out / "adapter" / "README.md").read_text()
    assert "Chosen by `circuit-peft compare`" in card and "![frontier](frontier.png)" in card
    assert (out / "adapter" / "frontier.png").exists()
    PeftModel.from_pretrained(load_model(str(model_dir)), str(out / "adapter"))  # a loadable adapter
    assert main([*argv[:-2], "--epochs", "2", "--out", str(out)]) == 2  # another recipe: refused
    assert "holds another run" in capsys.readouterr().err
    assert not list(out.rglob("*.tmp*"))
