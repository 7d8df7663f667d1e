"""Shared fixtures: tiny random models of every family, and the real SmolLM2 (session-scoped)."""

import os

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


_SLOW_SIGNS = ('"smollm2"', "torchrun", "subprocess", "_run(")


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test that loads the real SmolLM2 or starts processes (``make test`` runs
    them all; ``make test-fast`` skips these)."""
    import inspect

    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
            continue
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            continue
        if any(sign in source for sign in _SLOW_SIGNS):
            item.add_marker(pytest.mark.slow)
