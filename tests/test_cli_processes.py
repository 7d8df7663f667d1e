"""Commands under a launcher (WORLD_SIZE > 1): only train and select run there, the others are refused
before any work; compare's rows are drawn with --data-seed, so reordering or growing --seeds keeps them."""

import pytest

from circuit_peft.cli import build_parser, main
from circuit_peft.commands import compare as compare_cmd
from circuit_peft.commands import train as train_cmd
from circuit_peft.compare.grid import run_settings
from circuit_peft.distributed import MULTIPROCESS_COMMANDS, refuse_multiprocess
from circuit_peft.errors import CircuitPeftError
from circuit_peft.runs import fingerprint


@pytest.mark.slow
def test_compare_is_refused_under_a_launcher_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(compare_cmd, "run", lambda args: pytest.fail("compare ran under WORLD_SIZE=2"))
    out = tmp_path / "cmp"
    assert main(["compare", "--model", "smollm2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "circuit-peft compare runs in one process, but WORLD_SIZE is 2" in err
    assert "Only train, select run under torchrun" in err
    assert not out.exists()
    for command in ("amplify", "mine", "eval", "locate", "demo", "compare"):
        with pytest.raises(CircuitPeftError, match=command):
            refuse_multiprocess(command)


@pytest.mark.slow
def test_train_and_select_pass_the_check_under_a_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert MULTIPROCESS_COMMANDS == ("train", "select")
    ran = []
    monkeypatch.setattr(train_cmd, "run", lambda args: ran.append(args.command) or 0)
    assert main(["train", "--model", "smollm2", "--out", "unused"]) == 0
    assert ran == ["train"]
    refuse_multiprocess("select")
    monkeypatch.setenv("WORLD_SIZE", "1")
    refuse_multiprocess("compare")  # one process: every command runs


def _rows_and_settings(*flags: str):
    args = build_parser().parse_args(["compare", "--model", "smollm2", "--out", "unused", "--data", "arithmetic",
                                      "--n-train", "16", *flags])
    rows, heldout = compare_cmd.load_compare_rows(args)
    return fingerprint(rows), run_settings("smollm2", rows, heldout, compare_cmd.config_from_args(args))


def test_compare_rows_do_not_depend_on_the_training_seeds():
    rows, settings = _rows_and_settings("--seeds", "0,1,2")
    for seeds in ("2,1,0", "7,0,1,2", "5,6"):
        assert _rows_and_settings("--seeds", seeds) == (rows, settings), seeds
    other_rows, other_settings = _rows_and_settings("--seeds", "0,1,2", "--data-seed", "3")
    assert other_rows != rows
    assert other_settings["data_seed"] == 3 and "data_seed" not in settings  # absent at 0: older folders open
