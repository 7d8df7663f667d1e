"""Shared fixtures: tiny random models of every family, and the real SmolLM2 (session-scoped); a warning for a
test that looks slow but is not marked ``slow`` (every test that loads SmolLM2/Gemma or starts processes is marked
in its file; ``make test-fast`` skips them)."""

import os
import re

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CIRCUIT_PEFT_TEST_THREADS=1 helps when other jobs share the machine; CI has it to itself.
torch.set_num_threads(int(os.environ.get("CIRCUIT_PEFT_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))

from circuit_peft.models import TINY_FAMILIES, load_model, load_tokenizer, tiny_model  # noqa: E402


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request):
    """(family, model): a tiny random model of each supported family."""
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (float32, eval) and its tokenizer (left padding)."""
    return load_model("smollm2"), load_tokenizer("smollm2")


class UnmarkedSlowTestWarning(pytest.PytestWarning):
    """A test that looks as if it loads a real model or starts processes but is not marked ``slow``."""


# What a test that loads the real SmolLM2/Gemma-3 or starts processes says in its own source. A guess, so it
# only warns: a test is slow because it is marked (``@pytest.mark.slow`` or a module's ``pytestmark``).
_SLOW_SIGNS = re.compile(r"""load_model\(\s*["'](smollm2|gemma3-270m)["']|["']--model["'],\s*["'](smollm2|gemma3-270m)["']"""
                         r"|\btorchrun\b|\bsubprocess\.|\bPopen\(|\bmultiprocessing\b")


def _looks_slow(item: pytest.Item) -> str | None:
    """Why ``item`` looks slow (the fixture or the sign in its source), or None."""
    import inspect

    if "smollm2" in getattr(item, "fixturenames", ()):
        return "uses the smollm2 fixture"
    try:
        found = _SLOW_SIGNS.search(inspect.getsource(item.function))
    except (OSError, TypeError, AttributeError):
        return None
    return f"its source has {found.group(0)!r}" if found else None


def pytest_collection_modifyitems(config, items):
    """Warn about each test that looks slow (:func:`_looks_slow`) but is not marked ``slow``: ``make test-fast``
    (``-m "not slow"``) would run it. Marks nothing: the marks in the test files decide."""
    for item in items:
        if item.get_closest_marker("slow") is None and (why := _looks_slow(item)):
            item.warn(UnmarkedSlowTestWarning(f"{item.nodeid} {why} but is not marked slow: add @pytest.mark.slow "
                                              "if it loads SmolLM2/Gemma or starts processes"))
