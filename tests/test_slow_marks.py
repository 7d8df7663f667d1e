"""tests/conftest.py's collection hook: a test is slow because its file marks it; the hook only warns about an
unmarked test that looks as if it loads SmolLM2/Gemma or starts processes."""

import subprocess
from types import SimpleNamespace

import pytest
from conftest import UnmarkedSlowTestWarning, _looks_slow, pytest_collection_modifyitems

from circuit_peft.models import load_model


def _starts_a_process():
    subprocess.run(["true"])


def _loads_smollm2():
    return load_model("smollm2")


def _runs_a_command_on_smollm2(main):
    return main(["eval", "--model", "smollm2"])


def _tokenizer_only(load_tokenizer):
    return load_tokenizer("smollm2")  # the tokenizer alone is cheap


class _Item(SimpleNamespace):
    """What the hook reads of a pytest item: its function, fixtures and marks; what it warns, recorded."""

    def __init__(self, function, fixturenames=(), slow=False):
        super().__init__(function=function, fixturenames=fixturenames, nodeid=f"t.py::{function.__name__}",
                         warned=[], slow=slow)

    def get_closest_marker(self, name):
        return pytest.mark.slow.mark if name == "slow" and self.slow else None

    def warn(self, warning):
        self.warned.append(warning)


def test_looks_slow_sees_processes_real_models_and_the_smollm2_fixture():
    assert "has 'subprocess" in _looks_slow(_Item(_starts_a_process))
    assert "has 'load_model" in _looks_slow(_Item(_loads_smollm2))
    assert "has '\"--model" in _looks_slow(_Item(_runs_a_command_on_smollm2))
    assert "smollm2 fixture" in _looks_slow(_Item(_tokenizer_only, fixturenames=("smollm2",)))
    assert _looks_slow(_Item(_tokenizer_only)) is None


def test_the_hook_warns_about_unmarked_slow_looking_tests_and_marks_nothing():
    unmarked, marked, fast = _Item(_loads_smollm2), _Item(_starts_a_process, slow=True), _Item(_tokenizer_only)
    pytest_collection_modifyitems(None, [unmarked, marked, fast])
    assert [type(w) for w in unmarked.warned] == [UnmarkedSlowTestWarning]
    assert "t.py::_loads_smollm2" in str(unmarked.warned[0]) and "@pytest.mark.slow" in str(unmarked.warned[0])
    assert marked.warned == [] and fast.warned == []
    assert unmarked.get_closest_marker("slow") is None  # warned, not marked (an _Item has no add_marker)
