"""Fault suite, part 1: every numeric flag of every subcommand is range-checked at parse time.

A bad count, length, rate or share must stop the command with exit code 2 and a message naming
the flag, before any file is read or model loaded (the parser runs first)."""

from __future__ import annotations

import argparse
import json

import pytest

from circuit_peft.cli import build_parser

REQUIRED = {  # the least each subcommand needs to parse
    "mine": ["--out", "o"], "amplify": ["--out", "o"], "select": ["--data", "d.jsonl", "--out", "o.jsonl"],
    "locate": ["--data", "d.jsonl", "--out", "o.json"], "eval": ["--tasks", "gsm8k"], "train": ["--out", "o"],
    "demo": [], "export": ["--adapter", "a", "--out", "o", "--merged"],
}
BAD = {"positive int": ["0", "-1"], "non-negative int": ["-1"], "positive float": ["0", "-0.5"],
       "non-negative float": ["-0.1"], "fraction": ["0", "1.5", "-0.2"], "at-least-one float": ["0.5", "-1"]}


def _checked_flags():
    """(subcommand, flag, bad value) for every flag whose type is a range-checked type."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, p in sub.choices.items():
        for action in p._actions:
            kind = getattr(action.type, "__name__", None)
            if kind in BAD and action.option_strings:
                cases += [(name, action.option_strings[0], v) for v in BAD[kind]]
    return cases


CASES = _checked_flags()


def test_every_counting_flag_is_checked():
    """Counts and shares of each subcommand carry a checked type (none left as a bare int/float)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = [(name, a.option_strings[0]) for name, p in sub.choices.items() for a in p._actions
            if a.type in (int, float) and a.option_strings and a.dest not in ("seed", "z")]
    assert bare == []
    assert len(CASES) > 60


@pytest.mark.parametrize("command,flag,value", CASES, ids=[f"{c}{f}={v}" for c, f, v in CASES])
def test_bad_number_is_refused_at_parse_time_naming_the_flag(command, flag, value, capsys):
    argv = [command, *REQUIRED.get(command, []), f"{flag}={value}"]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


# ----- part 2: one row reader for every command, errors that name the file and line ----------------


BAD_FILES = [
    ("rows.jsonl", b'{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n', r"rows.jsonl:2: not valid JSON"),
    ("rows.jsonl", b'{"question": "a", "answer": "1"}\n[1, 2]\n', r"rows.jsonl:2: expected a JSON object"),
    ("rows.jsonl", b'{"question": "a", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n',
     r"rows.jsonl:2: not UTF-8 text.*save the file as UTF-8"),
    ("rows.jsonl", b"\n\n", r"rows.jsonl holds no rows"),
    ("rows.json", b'{"question": "a"', r"rows.json:1: not valid JSON"),
    ("rows.json", b'"just a string"', r"holds a list of rows"),
    ("rows.json", b'[{"question": "a"}, 3]', r"row 1 is a int"),
    ("rows.txt", b"question,answer\n", r"unknown data file type '.txt'"),
    ("rows.csv", b"question,answer\n", r"rows.csv holds no rows"),
]


@pytest.mark.parametrize("name,content,match", BAD_FILES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_FILES)])
def test_every_command_reads_rows_through_one_reader_that_names_file_and_line(tmp_path, name, content, match):
    from circuit_peft.commands import _cca, locate, select, train
    from circuit_peft.files import read_rows

    path = tmp_path / name
    path.write_bytes(content)
    loaders = [read_rows, _cca.read_rows, locate.load_rows, select.load_rows,
               lambda p: train.load_examples(str(p), "train", None, 0)]
    for load in loaders:
        with pytest.raises(ValueError, match=match):
            load(str(path))


def test_good_files_give_the_same_rows_whatever_the_format(tmp_path):
    from circuit_peft.files import read_rows

    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "Café?", "answer": "3"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    (tmp_path / "a.csv").write_text("question,answer\n\"What is 1 + 1?\",2\nCafé?,3\n", encoding="utf-8")
    assert read_rows(tmp_path / "a.jsonl") == read_rows(tmp_path / "a.json") == read_rows(tmp_path / "a.csv") == rows
    with pytest.raises(FileNotFoundError, match="no data file"):
        read_rows(tmp_path / "missing.jsonl")


# ----- part 3: output folders that cannot be mixed (mine, amplify, train, select's cache) -------------------------------


@pytest.mark.slow
def test_mine_and_amplify_refuse_another_runs_folder_before_loading_a_model(tmp_path, capsys):
    import subprocess
    import sys

    from circuit_peft.cli import main
    from circuit_peft.runs import OpenRun

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "a", "question": "What is 1 + 2?", "answer": "3"}) + "\n")
    other = OpenRun(tmp_path / "m", {"command": "mine", "flags": {"pivot": "token"}})
    other.open()
    other.close()
    assert main(["mine", "--model", "/no/such/model", "--problems", str(problems), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "flags" in err  # refused before the (missing) model was looked at
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    assert main(["amplify", "--model", "/no/such/model", "--problems", "demo", "--out", str(stray)]) == 2
    assert "not empty and holds no circuit-peft run" in capsys.readouterr().err
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        from circuit_peft.commands._cca import load_problem_rows, open_run

        argv = ["mine", "--model", "/no/such/model", "--problems", str(problems), "--out", str(tmp_path / "busy")]
        args = build_parser().parse_args(argv)
        open_run(args, problems=load_problem_rows(str(problems), None, "train", 0))  # the same run, started...
        (tmp_path / "busy" / "lock").write_text(str(writer.pid))  # ...by a process that is still alive
        assert main(argv) == 2
        assert f"in use by process {writer.pid}" in capsys.readouterr().err
    finally:
        writer.kill()


@pytest.mark.slow
def test_select_cache_dir_is_a_run_folder_of_one_pool_and_one_scoring_setting(tmp_path, capsys):
    import subprocess
    import sys

    from circuit_peft.cli import main

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"question": f"q{i}", "answer": "1"}) + "\n" for i in range(6)))
    cache = tmp_path / "cache"
    argv = ["select", "--data", str(pool), "--method", "random", "--cache-dir", str(cache)]
    assert main(argv + ["--fraction", "0.5", "--out", str(tmp_path / "a.jsonl")]) == 0
    assert (cache / "run.json").exists() and not (cache / "lock").exists()  # lock released at the end
    # what is kept changes, the scores do not: the cache is reused
    assert main(argv + ["--fraction", "0.3", "--seed", "2", "--out", str(tmp_path / "b.jsonl")]) == 0
    other = tmp_path / "other.jsonl"
    other.write_text(pool.read_text() + json.dumps({"question": "q9", "answer": "2"}) + "\n")
    assert main(["select", "--data", str(other), "--method", "random", "--cache-dir", str(cache),
                 "--out", str(tmp_path / "c.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--cache-dir" in err and "holds another run" in err and "pool" in err
    assert main(argv + ["--batch-size", "3", "--out", str(tmp_path / "d.jsonl")]) == 2
    assert "batch_size" in capsys.readouterr().err
    # another method shares the folder (its scores are a subfolder of their own); a cache folder from
    # before caches were run folders (score subfolders only) is taken over
    from circuit_peft.commands.select import _open_cache, load_rows

    ifd = build_parser().parse_args(argv[:4] + ["ifd", "--cache-dir", str(cache), "--out", str(tmp_path / "f.jsonl")])
    _open_cache(ifd, load_rows(str(pool))).close()  # not refused
    legacy = tmp_path / "legacy"
    (legacy / "circuitseer-0123abcd").mkdir(parents=True)
    assert main(["select", "--data", str(pool), "--method", "random", "--cache-dir", str(legacy),
                 "--out", str(tmp_path / "g.jsonl")]) == 0
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (cache / "lock").write_text(str(writer.pid))
        assert main(argv + ["--out", str(tmp_path / "e.jsonl")]) == 2
        assert f"in use by process {writer.pid}" in capsys.readouterr().err
    finally:
        writer.kill()


def test_atomic_dir_leaves_the_old_folder_or_the_new_one(tmp_path):
    from circuit_peft.files import atomic_dir

    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "adapter_config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "adapter_config.json").write_text("new")
            raise RuntimeError("killed while writing the weights")
    assert (target / "adapter_config.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic_dir(target) as tmp:
        (tmp / "adapter_config.json").write_text("new")
    assert (target / "adapter_config.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_non_finite_locating_score_is_refused_never_ranked():
    from circuit_peft.arch import Component
    from circuit_peft.circuit import Circuit

    scores = {Component("q", 0, 0): 1.0, Component("q", 0, 1): float("nan"), Component("mlp", 1, 3): float("inf")}
    with pytest.raises(ValueError, match=r"gradient: 2 of 3 component scores are not finite"):
        Circuit.from_scores(None, scores, method="gradient")
    assert len(Circuit.from_scores(None, {Component("q", 0, 0): 1.0}, method="gradient")) == 1


@pytest.mark.slow
def test_demo_adapter_only_replaces_an_old_adapter_folder_whole(tmp_path):
    from circuit_peft.commands.demo import run_demo

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("another adapter's weights")
    (out / "adapter_config.json").write_text("{}")
    (out / "stale.bin").write_text("a file of the old adapter")
    run_demo("smollm2", steps=1, output_dir=str(out), problems=1, max_length=64)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_bytes()[:8] != b"another "
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary sibling left
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an adapter folder"):  # replacing it would delete the notes
        run_demo("smollm2", steps=1, output_dir=str(work), problems=1)
    assert (work / "notes.txt").read_text() == "mine"


def _broken_adapters(root) -> dict[str, tuple]:
    """A good tiny CIRCUIT adapter and the ways a copied or half-written adapter folder breaks."""
    import shutil

    from peft import get_peft_model

    from circuit_peft import CircuitConfig
    from circuit_peft.models import tiny_model

    good = root / "good"
    get_peft_model(tiny_model("llama"), CircuitConfig(components={"q": {"1": [0]}})).save_pretrained(good)
    for name in ("no_weights", "truncated", "no_peft_type", "bad_json", "no_config"):
        shutil.copytree(good, root / name)
    (root / "no_weights" / "adapter_model.safetensors").unlink()
    weights = (root / "truncated" / "adapter_model.safetensors").read_bytes()
    (root / "truncated" / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    config = json.loads((good / "adapter_config.json").read_text())
    config.pop("peft_type")
    (root / "no_peft_type" / "adapter_config.json").write_text(json.dumps(config))
    (root / "bad_json" / "adapter_config.json").write_text("{")
    (root / "no_config" / "adapter_config.json").unlink()
    return {"no_weights": "no weights", "truncated": "truncated or damaged", "no_peft_type": "no 'peft_type'",
            "bad_json": "not valid JSON", "no_config": "no adapter_config.json", "missing": "no such folder"}


@pytest.mark.parametrize("command", ["eval", "eval --harness lm-eval --tasks gsm8k", "export --merged OUT"])
def test_a_broken_adapter_folder_is_refused_in_one_line_before_the_model_loads(tmp_path, capsys, command):
    from circuit_peft.cli import main

    for name, message in _broken_adapters(tmp_path).items():
        argv = command.replace("OUT", str(tmp_path / f"out-{name}")).split()
        code = main([*argv, "--model", "/no/such/model", "--adapter", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (name, err)


# ----- part 4: the command line refuses through the same validation layer as the API (tests/test_faults_api.py) -----


def _pool_file(tmp_path, extra: dict | None = None):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i), **(extra or {})}) + "\n" for i in range(6)))
    return pool


@pytest.mark.parametrize("method,column", [("max-loss", "question"), ("circuitseer", "answer"), ("ifd", "pool_index")])
def test_select_refuses_a_score_column_the_data_has_naming_the_flag_before_the_model_loads(tmp_path, capsys, method,
                                                                                           column):
    from circuit_peft.cli import main

    argv = ["select", "--model", "/no/such/model", "--data", str(_pool_file(tmp_path)), "--method", method,
            "--score-column", column, "--out", str(tmp_path / "o.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--score-column: the data already has a column {column!r}" in err or (
        column == "pool_index" and "--score-column: 'pool_index'" in err), err
    assert main(["select", "--data", str(_pool_file(tmp_path, {"pool_index": 3})), "--method", "random",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "pool_index: the data already has a column 'pool_index'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def _heads_file(tmp_path, edit) -> str:
    from circuit_peft.models import tiny_model
    from circuit_peft.select import ReasoningHeads

    path = ReasoningHeads.from_list([(1, 2), (2, 0)], tiny_model("llama")).save(tmp_path / "heads.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return str(path)


BAD_HEADS = {
    "query head 99": (lambda d: d["components"].__setitem__(0, ["q", 1, 99]),
                      "heads.json: components[0]: query head 99 of layer 1 is outside the model's 4 query heads"),
    "head -1": (lambda d: d["components"].__setitem__(0, ["q", 1, -1]), "heads.json: components[0]: index -1"),
    "layer 'one'": (lambda d: d["components"].__setitem__(0, ["q", "one", 2]), "heads.json: components[0]: layer 'one'"),
    "score 'high'": (lambda d: d.update(scores=[["q", 1, 2, "high"]]), "heads.json: scores[0]: score of ['q', 1, 2]: 'high'"),
}


@pytest.mark.parametrize("case", list(BAD_HEADS))
def test_select_refuses_a_broken_heads_file_naming_file_and_field_before_the_model_loads(tmp_path, capsys, case):
    from circuit_peft.cli import main

    edit, message = BAD_HEADS[case]
    argv = ["select", "--model", "/no/such/model", "--data", str(_pool_file(tmp_path)), "--heads",
            _heads_file(tmp_path, edit), "--out", str(tmp_path / "o.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


@pytest.mark.slow
def test_mine_refuses_a_question_longer_than_the_context_naming_problem_tokens_and_context(tmp_path, capsys):
    from circuit_peft.cli import main
    from circuit_peft.models import load_tokenizer, tiny_model

    tok = load_tokenizer("smollm2")
    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(model_dir)  # 256 positions
    tok.save_pretrained(model_dir)
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "a", "question": "What is 1 + 2?", "answer": "3"}) + "\n"
                        + json.dumps({"id": "b", "question": "Add " + " + ".join(["1"] * 200), "answer": "200"}) + "\n")
    argv = ["mine", "--model", str(model_dir), "--problems", str(problems), "--out", str(tmp_path / "m"),
            "--n-samples", "1", "--max-new-tokens", "4", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "problem 'b': its prompt" in err and "longer than the model's context of 256 tokens (max_position_embeddings)" in err
    assert not (tmp_path / "m" / "records.jsonl").exists() and not (tmp_path / "m" / "progress.jsonl").exists()
