"""The one keep rule (circuits/selection.py): Circuit.top, Circuit.keep and top_heads keep alike."""

import pytest

from circuit_peft.circuit import Circuit
from circuit_peft.circuits.selection import Keep, keep_ranked
from circuit_peft.errors import CircuitPeftError
from circuit_peft.select.heads import top_heads

SCORES = {(0, 0): 0.1, (0, 1): 0.2, (0, 2): 0.25, (1, 0): 0.3, (1, 1): 3.0, (1, 2): 0.15}


def _circuit(scores=SCORES) -> Circuit:
    return Circuit([], {("q", layer, h): s for (layer, h), s in scores.items()})


@pytest.mark.parametrize("rule", [{"k": 2}, {"fraction": 0.5}, {"z": 0.0}, {"z": 1.5}, {"z": 9.0}, {"z": -1.0}])
def test_circuit_top_and_top_heads_keep_the_same_heads(rule):
    heads = top_heads(SCORES, **{"fraction": None, **rule})
    assert [(c.layer, c.index) for c in _circuit().top(**rule).components] == sorted(heads)
    assert [(c.layer, c.index) for c in _circuit().keep(Keep(**rule)).components] == sorted(heads)


def test_z_uses_the_population_sd_and_keeps_at_least_the_best():
    # mean 2/3 of (0, 0, 2); population sd 0.943: z(2) = 1.414 (the sample sd would give 1.155)
    ranked = [("a", 2.0), ("b", 0.0), ("c", 0.0)]
    assert keep_ranked(ranked, Keep(z=1.3)) == ["a"]
    assert keep_ranked(ranked, Keep(z=1.5)) == ["a"]  # nobody reaches 1.5: the best is kept
    assert keep_ranked(ranked, Keep(z=-0.8)) == ["a", "b", "c"]  # >=, not >
    assert top_heads({(0, 0): 2.0, (0, 1): 0.0, (0, 2): 0.0}, fraction=None, z=1.3) == [(0, 0)]


def test_equal_scores_and_a_k_above_the_pool_are_refused_alike():
    flat = {(0, h): 1.0 for h in range(3)}
    for call in (lambda: top_heads(flat, z=0.5), lambda: _circuit(flat).top(z=0.5)):
        with pytest.raises(CircuitPeftError, match="z-scores are undefined"):
            call()
    for call in (lambda: top_heads(SCORES, k=7), lambda: _circuit().top(k=7)):
        with pytest.raises(CircuitPeftError, match=r"top k=7 is larger than the number of scored .* \(6\)"):
            call()


def test_keep_per_kind_ranks_each_kind_alone_and_pooled_does_not():
    scores = {("q", 0, h): 10.0 + h for h in range(4)} | {("mlp", 0, i): float(i) for i in range(4)}
    circuit = Circuit([], scores)
    assert circuit.keep(Keep(k=1)).counts() == {"q": 1, "mlp": 1}
    assert circuit.keep(Keep(k=2, per_kind=False)).counts() == {"q": 2}
    assert circuit.keep(0.5).components == circuit.top_each_kind(0.5).components
    assert circuit.keep(None) is circuit
    with pytest.raises(CircuitPeftError, match="exactly one of k=, fraction= or z="):
        Keep(k=1, z=1.0)


@pytest.mark.parametrize("method", ["ablation", "ablation_estimate", "gradient", "refined", "attribution"])
def test_reasoning_heads_of_every_head_locator_are_its_kept_query_heads(method):
    """find_reasoning_heads runs the registry's locators ('attribution': the old name of ablation_estimate)
    and keeps the top heads of their query-head scores by the one rule."""
    import torch

    from circuit_peft.models import tiny_model
    from circuit_peft.select import find_reasoning_heads

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    probe = [{"prompt_ids": torch.randint(3, 120, (6,), generator=g).tolist(),
              "solution_ids": torch.randint(3, 120, (4,), generator=g).tolist()} for _ in range(4)]
    heads = find_reasoning_heads(model, None, probe, method=method, fraction=0.25, progress=False)
    assert len(heads) == 3 and heads.heads == sorted(top_heads(heads.scores, fraction=0.25 if method != "refined"
                                                               else None, k=3 if method == "refined" else None))
    assert heads.source == f"{'ablation_estimate' if method == 'attribution' else method} scan"
    with pytest.raises(CircuitPeftError, match="unknown locator 'dcm'"):
        find_reasoning_heads(model, None, probe, method="dcm")
