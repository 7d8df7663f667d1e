"""`circuit-peft train` end to end on the real SmolLM2 (tiny sizes): the run folder, the adapter and its
card, resuming without redoing finished stages, refusing other settings, and the demo's command line."""

import json

import pytest
import torch

from circuit_peft.cli import build_parser, main

ARGS = ["train", "--data", "arithmetic", "--n-train", "8", "--heldout", "arithmetic", "--n-heldout", "6",
        "--epochs", "1", "--max-new-tokens", "24", "--circuit-fraction", "0.01", "--mmlu-limit", "2",
        "--truthfulqa-limit", "4", "--kl-chunks", "1", "--max-cut-share", "1"]  # the cap is tested in test_compare.py


@pytest.mark.slow
def test_train_writes_a_loadable_adapter_and_resumes(tmp_path, capsys, smollm2):
    from peft import PeftModel

    import circuit_peft  # noqa: F401

    from circuit_peft.commands.amplify import package_side_effect_dir

    out = tmp_path / "run"
    assert main([*ARGS, "--side-effects-data", package_side_effect_dir()[0], "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert "before" in first and "after" in first
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["count"] == 6 and 0 <= report["after"]["accuracy"] <= 1
    assert report["before"]["capped_fraction"] < 0.5
    assert set(report["side_effects"]) >= {"kl", "mmlu_delta", "truthfulqa_delta"} and report["side_effects"]["kl"] >= 0
    assert (out / "circuit.png").stat().st_size > 1000
    card = (out / "adapter" / "README.md").read_text()
    assert card.startswith("---") and "| before |" in card and "circuit-peft train" in card
    model, tok = smollm2
    loaded = PeftModel.from_pretrained(model, str(out / "adapter"))
    ids = tok("What is 2 + 3?", return_tensors="pt")
    with torch.no_grad():
        changed = loaded(**ids).logits
        with loaded.disable_adapter():
            base = loaded(**ids).logits
    assert (changed - base).abs().max() > 1e-4  # the trained slices moved
    loaded.unload()

    rerun = [*ARGS, "--side-effects-data", package_side_effect_dir()[0], "--out", str(out)]
    assert main(rerun) == 0  # a re-run reuses every stage
    again = capsys.readouterr().out
    for stage in ("locate", "before", "train", "after", "side_effects"):
        assert f"[{stage}] done earlier" in again
    assert main([*ARGS, "--lr", "5e-4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "config.sft.learning_rate" in err

    # controls may be added to the finished run: its stages are reused, each control trains like the circuit
    assert main([*rerun, "--controls", "random_layer,lora_matched"]) == 0
    with_controls = capsys.readouterr().out
    assert "[train] done earlier" in with_controls and "located - control" in with_controls
    report = json.loads((out / "report.json").read_text())
    random_layer, lora = report["controls"]["random_layer"], report["controls"]["lora_matched"]
    assert random_layer["trainable_params"] == report["trainable_params"]
    from circuit_peft.recipe import matched_lora_rank

    assert lora["lora_rank"] == matched_lora_rank(model, report["trainable_params"])
    for control in (random_layer, lora):
        assert control["count"] == 6 and control["side_effects"]["kl"] >= 0
        assert control["gap"] == pytest.approx(report["after"]["accuracy"] - control["accuracy"])
        assert control["gap_se"] is not None
    assert "| random_layer |" in (out / "adapter" / "README.md").read_text()


def test_bad_train_arguments_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*ARGS, "--circuit-fraction", "0", "--out", str(tmp_path)])
    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no file at" in capsys.readouterr().err
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"q": "What is 1 + 1?", "answer": "2"}\n{"q": "x", "answer": "3"}\n')
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "'question'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        build_parser().parse_args([*ARGS, "--controls", "random_layer,lora2", "--out", str(tmp_path)])
    assert "unknown ['lora2']; choose from random_layer" in capsys.readouterr().err


def test_eval_tasks_name_the_unknown_task():
    from circuit_peft.commands.eval import parse_tasks

    assert parse_tasks("gsm8k, kl") == ["gsm8k", "kl"]
    with pytest.raises(ValueError, match=r"--tasks: unknown \['trivia'\]; choose from gsm8k"):
        parse_tasks("gsm8k,trivia")
    with pytest.raises(ValueError, match="--tasks: name at least one of"):
        parse_tasks(",")


def test_demo_runs_the_train_command_by_default():
    from circuit_peft.commands.demo import TRAIN_DEMO_ARGS

    args = build_parser().parse_args(["train", *TRAIN_DEMO_ARGS, "--out", "x"])
    assert (args.locate, args.n_train, args.n_heldout, args.max_new_tokens) == ("gradient", 64, 100, 32)
    assert not build_parser().parse_args(["demo"]).cca


def test_train_flags_default_to_the_train_config():
    from dataclasses import fields

    from circuit_peft.commands.train import config_from_args
    from circuit_peft.recipe import TrainConfig

    built = config_from_args(build_parser().parse_args(["train", "--data", "file.jsonl", "--out", "x"]))
    default = TrainConfig()
    differ = [f.name for f in fields(TrainConfig) if getattr(built, f.name) != getattr(default, f.name)]
    assert differ == []


def _tiny_saved_model(tmp_path):
    """A tiny random llama with SmolLM2's tokenizer saved to a folder: the train command end to end in seconds."""
    from circuit_peft.models import load_tokenizer, tiny_model

    tok = load_tokenizer("smollm2")
    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def test_train_over_seeds_with_a_control_averages_the_gaps(tmp_path, capsys):
    model_dir = _tiny_saved_model(tmp_path)
    out = tmp_path / "seeds"
    argv = ["train", "--model", str(model_dir), "--data", "arithmetic", "--n-train", "4", "--heldout", "arithmetic",
            "--n-heldout", "3", "--epochs", "1", "--max-new-tokens", "4", "--circuit-fraction", "0.1",
            "--controls", "random_layer", "--seeds", "0,1", "--max-cut-share", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "over seeds 0, 1" in printed and "located - random_layer" in printed
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1]
    reports = [json.loads((out / f"seed{s}" / "report.json").read_text()) for s in (0, 1)]
    gaps = [r["controls"]["random_layer"]["gap"] for r in reports]
    assert summary["minus_random_layer"] == pytest.approx(sum(gaps) / 2)
    assert summary["gain"] == pytest.approx(sum(r["after"]["accuracy"] - r["before"]["accuracy"] for r in reports) / 2)
    assert reports[0]["settings"]["config"]["seed"] == 0 and reports[1]["settings"]["config"]["seed"] == 1
    # a folder holding a single-seed run is refused, and so are bad seed lists, before any work
    assert main([*argv[:-2], "--out", str(out / "seed0")]) == 2
    assert "single-seed run" in capsys.readouterr().err
    for bad in ("0,0", "a,1", ","):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--seeds", bad, "--out", "x"])


def test_train_with_a_rate_grid_chooses_each_arm_on_held_back_rows(tmp_path, capsys):
    model_dir = _tiny_saved_model(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", "arithmetic", "--n-train", "6", "--heldout", "arithmetic",
            "--n-heldout", "3", "--epochs", "1", "--max-new-tokens", "4", "--circuit-fraction", "0.1",
            "--controls", "random_layer", "--lrs", "1e-3,3e-2", "--validation-fraction", "0.34", "--max-cut-share", "1",
            "--grid-extensions", "0", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "learning rate chosen per arm on 2 validation rows" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["n_train"] == 4 and report["n_heldout"] == 3  # two training rows held back, held-out untouched
    stages = out / "stages"
    for arm in (report["training"], report["controls"]["random_layer"]):
        scores, losses = arm["validation_accuracy"], arm["validation_loss"]
        assert list(scores) == list(losses) == ["0.001", "0.03"] and arm["n_validation"] == 2
        assert all(v > 0 for v in losses.values()) and losses["0.001"] != losses["0.03"]  # gold-solution loss
        assert arm["lr"] == max((1e-3, 3e-2), key=lambda lr: (scores[f"{lr:g}"], -losses[f"{lr:g}"]))
    for tag in ("train", "control_random_layer"):
        assert {p.name for p in stages.glob(f"{tag}_lr*.safetensors")} == {f"{tag}_lr0.001.safetensors",
                                                                          f"{tag}_lr0.03.safetensors"}
    from safetensors.torch import load_file

    kept = load_file(str(stages / "train.safetensors"))
    chosen = load_file(str(stages / f"train_lr{report['training']['lr']:g}.safetensors"))
    other = load_file(str(stages / f"train_lr{({1e-3, 3e-2} - {report['training']['lr']}).pop():g}.safetensors"))
    assert all(torch.equal(kept[k], chosen[k]) for k in kept)
    assert any(not torch.equal(kept[k], other[k]) for k in kept)
    assert "learning rate chosen per arm" in (out / "adapter" / "README.md").read_text()
    from circuit_peft.recipe import seeds_table, summarise_seeds

    summary = summarise_seeds({0: report, 1: report})
    assert summary["learning_rates"][0] == {"circuit": report["training"]["lr"],
                                            "random_layer": report["controls"]["random_layer"]["lr"]}
    assert "learning rate chosen on validation, per seed: circuit" in seeds_table(summary)
    assert main(argv) == 0  # a re-run reuses every stage
    again = capsys.readouterr().out
    assert "[train] done earlier" in again and "[control_random_layer] done earlier" in again
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv[:-2], "--lrs", "1e-3,0", "--out", "x"])
