"""`circuit-peft locate` end to end on a tiny saved model (token-id data, no tokenizer needed)."""

import json

import pytest

from circuit_peft.circuit import Circuit
from circuit_peft.cli import main
from circuit_peft.commands.locate import load_rows
from circuit_peft.models import tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = tiny_model("qwen2")
    model.save_pretrained(d / "model")
    records = [{"context_ids": [1, 20 + i, 30, 40 + i], "desired_id": 5, "undesired_id": 7, "problem_id": f"p{i}"}
               for i in range(6)]
    (d / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    probe = [{"prompt_ids": [1, 11 + i, 12, 13], "solution_ids": [20, 21 + i, 2]} for i in range(4)]
    (d / "probe.jsonl").write_text("\n".join(json.dumps(r) for r in probe))
    return d, model


@pytest.mark.parametrize("method", ["dcm", "attribution"])
def test_cli_on_contrastive_records(files, method, capsys):
    d, model = files
    out, png = d / f"{method}.json", d / f"{method}.png"
    rc = main(["locate", "--model", str(d / "model"), "--data", str(d / "records.jsonl"), "--method", method,
               "--out", str(out), "--plot", str(png), "--epochs", "2", "--lr", "0.05"])
    assert rc == 0
    circuit = Circuit.load(out, model=model)
    assert circuit.method == method and circuit.scores
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "fraction of all components" in capsys.readouterr().out


def test_cli_dcm_step_schedule(files):
    d, model = files
    out = d / "dcm_steps.json"
    assert main(["locate", "--model", str(d / "model"), "--data", str(d / "records.jsonl"), "--method", "dcm",
                 "--out", str(out), "--dcm-steps", "3", "--dcm-check-every", "2", "--lr", "0.05"]) == 0
    meta = Circuit.load(out, model=model).meta
    assert meta["steps"] == 3 and meta["settings"]["schedule"] == "steps" and meta["checks"] == 2


def test_cli_ablation_with_top_k(files):
    d, model = files
    out = d / "heads.json"
    assert main(["locate", "--model", str(d / "model"), "--data", str(d / "probe.jsonl"), "--method", "ablation",
                 "--ablation", "zero", "--top-k", "2", "--out", str(out)]) == 0
    circuit = Circuit.load(out, model=model)
    assert len(circuit.components) == 2 and {c.kind for c in circuit.scores} == {"q"}


def test_cli_refined_rescans_attribution_candidates(files, capsys):
    d, model = files
    out = d / "refined.json"
    assert main(["locate", "--model", str(d / "model"), "--data", str(d / "probe.jsonl"), "--method", "refined",
                 "--keep-fraction", "0.25", "--candidates", "2", "--bound-candidates", "0", "--out", str(out)]) == 0
    circuit = Circuit.load(out, model=model)
    assert circuit.method == "refined_ablation" and len(circuit.scores) == 2 * len(circuit.components)
    assert main(["locate", "--model", str(d / "model"), "--data", str(d / "probe.jsonl"), "--method", "refined",
                 "--keep-fraction", "0.25", "--candidates", "1", "--bound-candidates", "3",
                 "--out", str(d / "refined_bound.json")]) == 0
    bound = Circuit.load(d / "refined_bound.json", model=model)
    assert len(bound.meta["bound_candidates"]) > 0
    assert len(bound.scores) == len(bound.components) + len(bound.meta["bound_candidates"])
    assert main(["locate", "--model", str(d / "model"), "--data", str(d / "probe.jsonl"), "--method", "refined",
                 "--keep-fraction", "0.25", "--candidates", "1", "--bound-candidates", "0", "--ig-steps", "2",
                 "--ig-candidates", "3",
                 "--out", str(d / "refined_ig.json")]) == 0
    ig = Circuit.load(d / "refined_ig.json", model=model)
    assert ig.meta["ig_steps"] == 2 and len(ig.scores) == len(ig.components) + len(ig.meta["ig_candidates"])
    assert main(["locate", "--model", str(d / "model"), "--data", str(d / "records.jsonl"), "--method", "attribution",
                 "--ig-steps", "2", "--out", str(d / "ig.json")]) == 2
    assert "--ig-steps works with" in capsys.readouterr().err
    assert main(["locate", "--model", str(d / "model"), "--data", str(d / "probe.jsonl"), "--method", "ablation",
                 "--estimate", "bound", "--out", str(d / "bound.json")]) == 2
    assert "--estimate bound works with" in capsys.readouterr().err
    assert main(["locate", "--model", str(d / "model"), "--data", str(d / "records.jsonl"), "--method", "refined",
                 "--out", str(out)]) == 2
    assert "needs probe rows" in capsys.readouterr().err


def test_cli_bad_input_exits_2(files, capsys):
    d, _ = files
    base = ["locate", "--model", str(d / "model"), "--out", str(d / "x.json")]
    assert main(base + ["--data", str(d / "probe.jsonl"), "--method", "dcm"]) == 2
    assert "needs contrastive records" in capsys.readouterr().err
    assert main(base + ["--data", str(d / "records.jsonl"), "--method", "ablation"]) == 2
    assert main(base + ["--data", str(d / "missing.jsonl"), "--method", "dcm"]) == 2
    assert "no data file" in capsys.readouterr().err
    assert main(base + ["--data", str(d / "probe.jsonl"), "--method", "ablation", "--top-k", "99"]) == 2
    assert "larger than the number of scored components" in capsys.readouterr().err
    (d / "empty.jsonl").write_text("")
    assert main(base + ["--data", str(d / "empty.jsonl"), "--method", "dcm"]) == 2
    assert "empty" in capsys.readouterr().err


def test_load_rows_reads_csv_json_and_saved_datasets(tmp_path):
    (tmp_path / "p.csv").write_text("question,answer\nWhat is 1+1?,2\n")
    assert load_rows(str(tmp_path / "p.csv")) == [{"question": "What is 1+1?", "answer": "2"}]
    (tmp_path / "p.json").write_text(json.dumps([{"a": 1}, {"a": 2}, {"a": 3}]))
    assert load_rows(str(tmp_path / "p.json"), limit=2) == [{"a": 1}, {"a": 2}]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "x", "solution": "y"}]).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(str(tmp_path / "ds")) == [{"prompt": "x", "solution": "y"}]


def test_cli_keep_fraction_keeps_what_the_library_call_keeps(tmp_path):
    """`locate --keep-fraction F` == attribution_scan(keep_fraction=F): a share of each kind, not pooled."""
    import json as _json

    from circuit_peft import Circuit
    from circuit_peft.cli import main as cli_main
    from circuit_peft.locate import attribution_scan
    from circuit_peft.models import tiny_model

    model = tiny_model("llama", vocab_size=64)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    records = [{"context_ids": [1 + i, 2, 3, 4 + i], "desired_id": 5, "undesired_id": 6, "problem_id": str(i)}
               for i in range(4)]
    data = tmp_path / "records.jsonl"
    data.write_text("".join(_json.dumps(r) + "\n" for r in records))
    assert cli_main(["locate", "--model", str(folder), "--data", str(data), "--method", "attribution",
                     "--keep-fraction", "0.25", "--out", str(tmp_path / "c.json")]) == 0
    cli = Circuit.load(tmp_path / "c.json")
    lib = attribution_scan(model, None, records, target="logit_diff", keep_fraction=0.25, progress=False)
    assert sorted(cli.components) == sorted(lib.components)
    assert set(cli.counts()) == {"q", "k", "v", "mlp"}


def test_cli_refined_refuses_flags_it_would_ignore(files, capsys):
    d, _ = files
    base = ["locate", "--model", str(d / "model"), "--data", str(d / "probe.jsonl"), "--method", "refined",
            "--out", str(d / "r.json")]
    assert main(base + ["--naive"]) == 2
    assert "--target/--naive do not apply" in capsys.readouterr().err
    assert main(base + ["--top-k", "2"]) == 2


def test_cli_field_flags_have_the_names_of_the_other_commands():
    from circuit_peft.cli import build_parser

    args = build_parser().parse_args(["locate", "--model", "m", "--data", "d", "--method", "ablation", "--out", "o.json",
                                      "--question-field", "q", "--answer-field", "a"])
    assert (args.prompt_field, args.solution_field) == ("q", "a")


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """A tiny llama with a tiny word-level tokenizer saved beside it: text probe rows, records, general text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("text")
    text = "the quick brown fox jumps over a lazy dog near river bank what is"
    vocab = ["<unk>", "<pad>", "<eos>", *"0123456789+=?", *text.split()]
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    model = tiny_model("llama", vocab_size=64)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    probe = [{"question": f"what is {a} + {a + 1} ?", "answer": f"{a} + {a + 1} = {2 * a + 1}"} for a in range(4)]
    (d / "probe.jsonl").write_text("\n".join(json.dumps(r) for r in probe))
    records = [{"context_ids": tok(f"{a} + {a + 1} =")["input_ids"], "desired_id": tok("5")["input_ids"][-1],
                "undesired_id": tok("7")["input_ids"][-1], "problem_id": f"p{a}"} for a in range(4)]
    (d / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (d / "text.txt").write_text((text + " ") * 20)
    return d, model


def _every_locator():
    from circuit_peft.locate.registry import locator_names

    return locator_names()


@pytest.mark.parametrize("method", _every_locator())
def test_every_registered_locator_runs_from_the_cli(text_files, method):
    """`circuit-peft locate --method NAME` runs each locator of the registry (train's default, gradient, too)."""
    from circuit_peft.locate.registry import LOCATORS

    d, model = text_files
    spec = LOCATORS[method]
    data = d / ("records.jsonl" if spec.reads == "records" else "probe.jsonl")
    extra = {"dcm": ["--dcm-steps", "2", "--lr", "0.05"], "gradient_contrast": ["--reference", str(d / "text.txt")],
             "refined": ["--keep-fraction", "0.25"]}.get(method, [])
    out = d / f"{method}.json"
    assert main(["locate", "--model", str(d / "model"), "--data", str(data), "--method", method, "--out", str(out),
                 "--max-length", "64"] + extra) == 0
    circuit = Circuit.load(out, model=model)
    assert circuit.scores and {c.kind for c in circuit.scores} <= set(spec.kinds)
    if not spec.own_keep:  # 5 % of each scored kind (refined: a quarter of the heads)
        share = 0.25 if method == "refined" else 0.05
        for kind in {c.kind for c in circuit.scores}:
            scored = len(get_arch_components(model, kind))
            assert circuit.counts()[kind] == max(1, int(share * scored + 1e-9))


def get_arch_components(model, kind):
    from circuit_peft.arch import get_arch

    return get_arch(model).all_components((kind,))


def test_one_locator_vocabulary_for_the_commands_and_the_benchmarks(monkeypatch):
    """locate, train, compare, amplify, select --head-method and benchmarks/recipes.py name locators of the registry."""
    import argparse
    import importlib
    from pathlib import Path

    from circuit_peft.cca.pipeline import LOCATE_METHODS
    from circuit_peft.cli import build_parser
    from circuit_peft.commands.select import HEAD_METHODS
    from circuit_peft.locate.registry import LOCATORS, locator_names
    from circuit_peft.recipe.config import LOCATORS as TRAIN

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices

    def choices(command: str, flag: str) -> tuple:
        return tuple(next(a for a in commands[command]._actions if flag in a.option_strings).choices)

    assert choices("locate", "--method") == locator_names() and "gradient" in locator_names()
    assert choices("train", "--locate") == TRAIN == choices("compare", "--locate")
    assert "gradient" in TRAIN and set(TRAIN) == {n for n in LOCATORS if not LOCATORS[n].own_keep}
    assert choices("amplify", "--locate") == LOCATE_METHODS == locator_names(reads="records")
    assert choices("select", "--head-method") == HEAD_METHODS
    assert set(HEAD_METHODS) - {"attribution"} <= set(locator_names(heads=True))  # "attribution": the old name
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    assert set(importlib.import_module("recipes").LOCATORS.values()) <= set(LOCATORS)


def test_attribution_on_probe_rows_runs_ablation_estimate_its_new_name(files, caplog, capsys):
    """'attribution' is the logit difference on records; on probe rows the old spelling still runs the ablation
    estimate (with a warning), and a foreign locator flag is refused or ignored, never silently taken."""
    d, model = files
    base = ["locate", "--model", str(d / "model"), "--out", str(d / "old.json")]
    with caplog.at_level("WARNING"):
        assert main(base + ["--data", str(d / "probe.jsonl"), "--method", "attribution"]) == 0
    assert Circuit.load(d / "old.json", model=model).method == "ablation_estimate"
    assert "runs the locator ablation_estimate" in caplog.text
    assert main(base + ["--data", str(d / "records.jsonl"), "--method", "attribution", "--target", "ablation"]) == 2
    assert "does not fit this data" in capsys.readouterr().err
    assert main(base + ["--data", str(d / "probe.jsonl"), "--method", "gradient", "--naive"]) == 2
    assert "--naive works with --method ablation, not gradient" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(base + ["--data", str(d / "probe.jsonl"), "--method", "gradient", "--seed", "3"]) == 0
    assert "--seed is ignored: it works with --method dcm, not gradient" in caplog.text
