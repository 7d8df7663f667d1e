"""Every `circuit-peft ...` command line in README.md and docs/ parses with the real argument parser, and the
cheap ones (`info`, `export`) run as written (issue 13), so the documentation cannot drift from the CLI."""

import re
import shlex
from pathlib import Path

import pytest

from circuit_peft.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _command_lines():
    for doc in DOCS:
        in_code, pending, start = False, None, 0
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            text = line.strip()
            if text.startswith("```"):
                in_code = not in_code
                continue
            if pending is not None:  # a continued command line
                pending += " " + text.rstrip("\\").strip()
                if not text.endswith("\\"):
                    yield pytest.param(pending, id=f"{doc.name}:{start}")
                    pending = None
                continue
            if in_code and text.startswith("circuit-peft "):
                if text.endswith("\\"):
                    pending, start = text.rstrip("\\").strip(), n
                else:
                    yield pytest.param(text, id=f"{doc.name}:{n}")


def _argv(text: str) -> list[str]:
    text = re.sub(r"\s+#.*$", "", text)  # trailing comment
    argv = shlex.split(text.replace("[", "").replace("]", ""))[1:]  # [--opt x] documents an optional flag
    return [a.split("|")[0] for a in argv]  # "a|b|c" documents choices: take the first


@pytest.mark.parametrize("line", list(_command_lines()))
def test_documented_command_parses(line):
    parser = build_parser()
    try:
        parser.parse_args(_argv(line))
    except SystemExit as err:
        pytest.fail(f"documented command does not parse ({err.code}): {line}")


def _subcommand(line) -> str:
    return _argv(line.values[0])[0]


CHEAP = [line for line in _command_lines() if _subcommand(line) in ("info", "export")]


@pytest.mark.slow
@pytest.mark.parametrize("line", CHEAP)
def test_cheap_documented_command_runs(line, tmp_path, monkeypatch):
    """The documented `info` and `export` lines run as written (export on a tiny adapter placed where the
    line's relative paths point)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from circuit_peft import CircuitConfig, models, tiny_model
    from circuit_peft.cli import main

    argv = _argv(line)
    monkeypatch.chdir(tmp_path)
    if argv[0] == "export":
        if "--adapter" not in argv or any(a.isupper() for a in argv[1:]):
            pytest.skip("a usage pattern (placeholders), not a runnable line")
        tiny_model("llama").save_pretrained(tmp_path / "base")
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # the adapter then names its base
        adapter = get_peft_model(base, CircuitConfig(components={"q": {"1": [0]}}, init_weights=False))
        adapter.save_pretrained(tmp_path / argv[argv.index("--adapter") + 1])
        smol = models.load_tokenizer("smollm2")  # a tiny model has no tokenizer of its own
        monkeypatch.setattr("circuit_peft.models.load_tokenizer", lambda name, **kw: smol)
    assert main(argv) == 0, line
