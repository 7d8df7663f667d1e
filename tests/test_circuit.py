import json

import pytest
import torch

from circuit_peft.arch import DEFAULT_PROJECTIONS, Component, get_arch
from circuit_peft.circuit import Circuit
from circuit_peft.models import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _scored(model):
    arch = get_arch(model)
    comps = arch.all_components(("q", "k", "v", "mlp"))
    scores = {c: float((hash(c) % 1000) / 1000) for c in comps}
    return Circuit.from_scores(model, scores, method="test", meta={"note": "x"})


def test_json_round_trip_keeps_components_scores_and_fingerprint(llama, tmp_path):
    c = _scored(llama).top(k=7)
    path = c.save(tmp_path / "sub" / "circuit.json")
    assert [p.name for p in path.parent.iterdir()] == ["circuit.json"]  # no temp file left behind
    back = Circuit.load(path, model=llama)
    assert back.components == c.components and len(back.components) == 7
    assert back.scores == c.scores
    assert back.fingerprint == get_arch(llama).fingerprint()
    assert back.method == "test" and back.meta["note"] == "x"
    assert json.loads(path.read_text())["components"][0] == list(c.components[0])


def test_load_with_another_model_names_the_field(llama, tmp_path):
    path = _scored(llama).top(k=3).save(tmp_path / "c.json")
    with pytest.raises(ValueError, match="n_layers: circuit was made for 3, this model has 2"):
        Circuit.load(path, model=tiny_model("llama", n_layers=2))
    with pytest.raises(ValueError, match="family"):
        Circuit.load(path, model=tiny_model("gpt2"))


def test_load_rejects_non_circuit_json(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="components"):
        Circuit.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Circuit.load(tmp_path / "y.json")
    with pytest.raises(FileNotFoundError):
        Circuit.load(tmp_path / "missing.json")


def test_top_by_k_fraction_and_z(llama):
    c = _scored(llama)
    ranked = [x for x, _ in c.ranked()]
    assert set(c.top(k=5).components) == set(ranked[:5])
    n = len(c.scores)
    assert len(c.top(fraction=0.1).components) == n // 10  # rounded down: never more than asked
    assert len(c.top(fraction=1e-6).components) == 1
    heads = c.top(fraction=0.5, kinds=["q"])
    assert {x.kind for x in heads} == {"q"} and len(heads) == 6
    vals = torch.tensor(list(c.scores.values()), dtype=torch.float64)
    z = (vals - vals.mean()) / vals.std(unbiased=False)
    assert len(c.top(z=1.0)) == int((z >= 1.0).sum())


def test_top_rejects_bad_requests(llama):
    c = _scored(llama)
    with pytest.raises(ValueError, match="larger than the number of scored components"):
        c.top(k=len(c.scores) + 1)
    with pytest.raises(ValueError, match="exactly one"):
        c.top(k=2, fraction=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        c.top()
    with pytest.raises(ValueError, match="fraction"):
        c.top(fraction=1.5)
    with pytest.raises(ValueError, match="positive integer"):
        c.top(k=0)


def test_summary_counts_per_kind_layer_and_fraction(llama):
    c = Circuit([("q", 0, 1), ("q", 2, 3), ("v", 1, 0), ("mlp", 2, 5), ("mlp", 2, 6)],
                fingerprint=get_arch(llama).fingerprint(), method="manual")
    text = c.summary()
    assert "q:      2 / 12" in text and "v:      1 / 6" in text and "mlp:      2 / 288" in text
    assert "layer   2: q=1 v=0 mlp=2" in text
    assert "5 / 312 = 1.603 %" in text  # 312 = 3 layers x (4 q + 2 k + 2 v + 96 neurons)
    assert c.component_fraction() == pytest.approx(5 / 312)


def test_plot_writes_a_png(llama, tmp_path):
    path = _scored(llama).top(fraction=0.05).plot(tmp_path / "c.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    kept_only = Circuit([("k", 1, 1), ("mlp", 0, 3)], fingerprint=get_arch(llama).fingerprint())
    assert kept_only.plot(tmp_path / "k.png").stat().st_size > 5000


def test_bad_components_are_rejected():
    with pytest.raises(ValueError, match="unknown component kind"):
        Circuit([("attn", 0, 1)])
    with pytest.raises(ValueError, match="needs the model's sizes"):
        Circuit([("q", 0, 1)]).summary() and Circuit([("q", 0, 1)]).plot("/tmp/never.png")


def test_to_config_trains_exactly_the_circuit_slices(llama):
    pytest.importorskip("circuit_peft.tuner")
    from peft import get_peft_model

    base = tiny_model("llama")
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    circuit = Circuit([("q", 1, 2), ("v", 0, 1), ("mlp", 2, 5), ("k", 2, 0)], fingerprint=get_arch(base).fingerprint())
    config = circuit.to_config()
    assert set(config.component_list()) == set(circuit.components)
    assert config.base_model_fingerprint == circuit.fingerprint
    model = get_peft_model(base, config)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    merged = model.merge_and_unload()
    arch = get_arch(merged)
    expected: dict[str, torch.Tensor] = {}
    for comp in circuit.components:
        for s in arch.component_slices(comp, DEFAULT_PROJECTIONS[comp.kind], merged):
            mask = expected.setdefault(s.module + ".weight", torch.zeros_like(original[s.module + ".weight"], dtype=torch.bool))
            dim = arch.weight_dim(merged.get_submodule(s.module), s.axis)
            mask.narrow(dim, s.start, s.stop - s.start).fill_(True)
    for name, p in merged.named_parameters():
        changed = (p.detach() - original[name]).abs() > 0
        if name in expected:
            assert not changed[~expected[name]].any(), f"{name} changed outside the circuit"
            assert changed[expected[name]].float().mean() > 0.5, f"{name}: circuit slice did not train"
        else:
            assert not changed.any(), f"{name} changed but is not in the circuit"


def test_empty_circuit_cannot_make_a_config(llama):
    with pytest.raises(ValueError, match="keeps no components"):
        Circuit([], fingerprint=get_arch(llama).fingerprint()).to_config()


def test_membership_and_components_are_sorted(llama):
    c = Circuit([("mlp", 2, 5), ("q", 0, 1), Component("q", 0, 0)])
    assert c.components[0] == Component("q", 0, 0) and ("mlp", 2, 5) in c and ("v", 0, 0) not in c
