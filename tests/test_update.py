"""The amplification update on tiny models: only circuit slices change, the margin rises, the cached
loop equals the plain one, best-step selection, the no-mask ablation and bad input."""

import pytest
import torch

from circuit_peft.arch import get_arch
from circuit_peft.circuit import Circuit
from circuit_peft.cca.update import (
    UpdateConfig, accuracy_validator, amplify_update, circuit_config_for, margin_loss, margin_validator,
    measure_update_speedup,
)
from circuit_peft.models import tiny_model
from circuit_peft.tuner import CircuitConfig


def _records(n=12, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 10, (1,), generator=g))
        out.append({"context_ids": torch.randint(3, vocab, (length,), generator=g).tolist(),
                    "desired_id": 5 + i % 7, "undesired_id": 40 + i % 5, "problem_id": f"p{i}"})
    return out


CIRCUIT = [("q", 1, 0), ("k", 1, 1), ("v", 2, 1), ("mlp", 1, 3), ("mlp", 2, 7)]


def test_update_changes_only_circuit_slices_and_raises_margin(tiny):
    family, model = tiny
    config = CircuitConfig.from_components(CIRCUIT, projections="paper")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = amplify_update(model, _records(), config, steps=6, lr=5e-2, optimizer="adam", loss="logsigmoid",
                            progress=False)
    assert result.final_margin > result.initial_margin + 0.1
    assert result.size["components"] == len(CIRCUIT)
    merged = result.model.merge_and_unload()
    arch = get_arch(merged)
    allowed: dict[str, torch.Tensor] = {}
    for comp in config.component_list():
        for s in arch.component_slices(comp, config.projections_for_kind(comp.kind), merged):
            w = merged.get_submodule(s.module).weight
            mask = allowed.setdefault(s.module + ".weight", torch.zeros_like(w, dtype=torch.bool))
            conv = type(merged.get_submodule(s.module)).__name__ == "Conv1D"
            dim = (1 if s.axis == "out" else 0) if conv else (0 if s.axis == "out" else 1)
            mask.narrow(dim, s.start, s.stop - s.start).fill_(True)
    changed = 0
    for name, p in merged.named_parameters():
        diff = (p.detach() - before[name]).abs() > 0
        if name in allowed:
            assert not (diff & ~allowed[name]).any(), f"{family}: {name} changed outside the circuit slices"
            changed += int(diff.any())
        else:
            assert not diff.any(), f"{family}: {name} is outside the circuit but changed"
    assert changed >= 3


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_cached_update_equals_plain_update(family):
    losses = []
    for cached in (True, False):
        model = tiny_model(family)
        r = amplify_update(model, _records(), CircuitConfig.from_components(CIRCUIT, projections="paper"), steps=4,
                           lr=1e-2, cache_lower_layers=cached, micro_batch_size=5, progress=False)
        losses.append([h["loss"] for h in r.history if "loss" in h] + [r.final_margin])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


def _prefixed_records(n=10, prefix_len=20, vocab=128):
    prefix = torch.randint(3, vocab, (prefix_len,), generator=torch.Generator().manual_seed(7)).tolist()
    return [{**r, "context_ids": prefix + r["context_ids"]} for r in _records(n)]


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3", "gpt2"])
@pytest.mark.parametrize("cached", [True, False])
def test_shared_prompt_prefix_update_equals_whole_records(family, cached):
    """Records sharing a 20-token prompt prefix: running it once per micro-batch (its cache repeated for the rows,
    the lower-layer cache on or off) gives the losses, margins and trained weights of running every record whole.

    Trained with SGD, whose step is lr x the gradient: the weights then compare the two paths' gradients to 1e-6.
    (Adam divides each gradient element by its own scale, so float rounding in a near-zero gradient became part
    of a full step: 1.9e-6 apart on GPT-2 on one CPU. With SGD the paths agree to ~1e-9, as in
    test_pivotal_trainers' two-process prefix test.)"""
    runs = []
    for share in (True, False):
        model = tiny_model(family)
        r = amplify_update(model, _prefixed_records(), CircuitConfig.from_components(CIRCUIT, projections="paper"),
                           steps=4, lr=1e-2, optimizer="sgd", loss="logsigmoid", cache_lower_layers=cached,
                           share_prompt_prefix=share, micro_batch_size=4, progress=False)
        weights = [p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad]
        runs.append(([h["loss"] for h in r.history if "loss" in h] + [r.final_margin], weights))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(runs[0][1], runs[1][1]))
    assert runs[0][0][-1] != pytest.approx(runs[0][0][0])  # it trained
    assert max(float(w.abs().max()) for w in runs[0][1]) > 1e-4  # the deltas (zero at the start) moved > 100 x atol


def test_shared_prompt_prefix_is_used_only_when_long_enough():
    from circuit_peft.cca.update import _shared_prompt_prefix

    contexts = [r["context_ids"] for r in _prefixed_records(prefix_len=20)]
    assert len(_shared_prompt_prefix(contexts, UpdateConfig())) >= 20
    assert _shared_prompt_prefix(contexts, UpdateConfig(min_shared_prefix=64)) == []
    assert _shared_prompt_prefix(contexts, UpdateConfig(share_prompt_prefix=False)) == []
    assert _shared_prompt_prefix(contexts[:1], UpdateConfig()) == []


def test_speedup_measurement_restores_model():
    model = tiny_model("llama", n_layers=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    times = measure_update_speedup(model, _records(), CircuitConfig.from_components([("q", 5, 0)]), steps=2)
    assert set(times) == {"plain_step_s", "cached_step_s", "cache_s", "speedup"} and times["speedup"] > 0
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_best_validation_step_is_kept_and_early_stopping():
    model = tiny_model("llama")
    scores = iter([0.1, 0.5, 0.2, 0.3, 0.0, 0.0])
    result = amplify_update(model, _records(), CircuitConfig.from_components(CIRCUIT), validate=lambda m: next(scores),
                            steps=20, lr=5e-2, optimizer="adam", eval_every=2, patience=3, progress=False)
    assert result.best_step == 2 and result.best_val == 0.5
    assert result.history[-1]["step"] == 8  # validations at 0, 2, 4, 6, 8: no gain for 3 after step 2
    margin_at_2 = next(h["margin"] for h in result.history if h["step"] == 2)
    assert result.final_margin == pytest.approx(margin_at_2, abs=1e-5)


def test_no_mask_ablation_trains_every_component_of_the_kinds():
    model = tiny_model("llama")
    circuit = Circuit(CIRCUIT, fingerprint=get_arch(model).fingerprint())
    nomask = circuit_config_for(model, circuit, mask=False)
    arch = get_arch(model)
    assert len(nomask.component_list()) == sum(arch.num_components(k) for k in ("q", "k", "v", "mlp")) * 3
    r = amplify_update(model, _records(), circuit, mask=False, steps=3, lr=1e-2, progress=False)
    assert r.size["component_fraction"] == 1.0 and r.final_margin > r.initial_margin


def test_margin_losses_and_validators():
    m = torch.tensor([-2.0, 0.0, 10.0])
    assert torch.allclose(margin_loss(m, "logit_diff"), -m)
    assert torch.allclose(margin_loss(m, "capped", margin_cap=5.0), torch.tensor([2.0, 0.0, -5.0]))
    assert torch.allclose(margin_loss(m, "logsigmoid"), torch.nn.functional.softplus(-m))
    model = tiny_model("llama")
    recs = _records()
    val = margin_validator(recs[:4])
    r = amplify_update(model, recs, CircuitConfig.from_components(CIRCUIT), validate=val, steps=4, eval_every=2,
                       lr=5e-2, optimizer="adam", progress=False)
    assert r.best_val == max(h["val"] for h in r.history if "val" in h)


def test_update_of_a_peft_model_trains_its_adapter_in_place_like_a_fresh_one():
    from peft import get_peft_model

    config = CircuitConfig.from_components(CIRCUIT, projections="paper")
    kwargs = dict(steps=3, lr=1e-2, progress=False)
    fresh = amplify_update(tiny_model("llama"), _records(), config, **kwargs)
    wrapped = get_peft_model(tiny_model("llama"), CircuitConfig.from_components(CIRCUIT, projections="paper"))
    in_place = amplify_update(wrapped, _records(), None, **kwargs)
    assert in_place.model is wrapped and in_place.size == fresh.size
    assert in_place.final_margin == pytest.approx(fresh.final_margin, rel=1e-5)
    with pytest.raises(ValueError, match="pass circuit=None"):
        amplify_update(wrapped, _records(), config, progress=False)
    with pytest.raises(ValueError, match="no circuit adapter named 'other'"):
        amplify_update(wrapped, _records(), None, adapter_name="other", progress=False)


def test_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="empty"):
        amplify_update(model, _records(), Circuit([], fingerprint=get_arch(model).fingerprint()), progress=False)
    with pytest.raises(ValueError, match="empty"):
        CircuitConfig(components={})
    with pytest.raises(ValueError, match="validation set is empty"):
        accuracy_validator(None, [])
    with pytest.raises(ValueError, match="validation set is empty"):
        margin_validator([])
    with pytest.raises(ValueError, match="desired_id and undesired_id"):
        amplify_update(model, [dict(_records()[0], undesired_id=5)], CircuitConfig.from_components(CIRCUIT),
                       progress=False)
    with pytest.raises(ValueError, match="loss"):
        UpdateConfig(loss="huber")
    with pytest.raises(ValueError, match="min_shared_prefix"):
        UpdateConfig(min_shared_prefix=0)
