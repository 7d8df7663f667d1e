"""CircuitSeer scoring, soft sampling, the sampler and bad input (tiny models; SmolLM2 briefly)."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from circuit_peft.arch import get_arch
from circuit_peft.models import load_tokenizer, tiny_model
from circuit_peft.select import (
    CircuitSeerSampler, CircuitSeerScorer, ReasoningHeads, attention_variance, debias_length, gumbel_top_k,
    select_indices,
    select_subset,
)
from circuit_peft.select import scoring as scoring_module

DATA = Path(__file__).parent / "data" / "gsm8k"
HEADS = [(0, 1), (1, 0), (1, 3)]


def _rows(split="train", n=12):
    with open(DATA / f"{split}.jsonl") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def _random_ids(lengths, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _eager_reference(model, ids, heads, query, exclude_sink, length_normalized, bos_id=1):
    """The score from the model's own eager attention probabilities (output_attentions=True)."""
    model.set_attn_implementation("eager")
    out = []
    for x in ids:
        t = torch.tensor([x])
        att = model(input_ids=t, output_attentions=True).attentions
        T = len(x)
        sink = torch.zeros(T, dtype=torch.bool)
        sink[0] = True
        sink |= t[0] == bos_id
        total = 0.0
        for layer, head in heads:
            a = att[layer][0, head]  # (T, T)
            if query == "last":
                keep = ~sink if exclude_sink else torch.ones(T, dtype=torch.bool)
                total += attention_variance(a[-1], keep, exclude_sink, length_normalized).item()
            else:
                causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
                keep = causal & ~sink[None] if exclude_sink else causal
                rows = keep.sum(-1) >= 2
                total += attention_variance(a, keep, exclude_sink, length_normalized)[rows].mean().item()
        out.append(total / len(heads))
    return np.array(out)


class _NoTok:
    pad_token_id, bos_token_id = 0, 1


# ----- the score itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("query,exclude_sink,length_normalized",
                         [("last", True, False), ("last", False, True), ("mean", True, True), ("mean", False, False)])
def test_hooked_qk_score_equals_eager_attention_score(tiny, query, exclude_sink, length_normalized):
    family, model = tiny
    ids = _random_ids([5, 11, 8, 17])
    scorer = CircuitSeerScorer(model, _NoTok(), HEADS, query=query, exclude_sink=exclude_sink,
                               length_normalized=length_normalized, batch_size=4, progress=False)
    hooked = scorer.score_ids(ids)
    ref = _eager_reference(model, ids, HEADS, query, exclude_sink, length_normalized)
    assert np.all(np.isfinite(hooked)) and np.all(hooked > 0)
    assert np.abs(hooked - ref).max() < 1e-5
    assert np.abs(hooked - ref).max() <= 1e-4 * np.abs(ref).max()  # also tight relative to the scale


def test_batched_equals_one_by_one_and_truncated_forward_equals_full(tiny, monkeypatch):
    family, model = tiny
    ids = _random_ids([3, 14, 7, 9, 20, 4, 12])
    scorer = CircuitSeerScorer(model, _NoTok(), HEADS, batch_size=7, progress=False)
    batched = scorer.score_ids(ids)
    scorer.batch_size = 1
    single = scorer.score_ids(ids)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-12)  # float32 noise of other batch shapes

    # the truncated forward never runs the layers above the deepest head nor the LM head
    arch = get_arch(model)
    ran = []
    handles = [layer.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, layer in enumerate(arch.layers(model))]
    handles.append(model.get_output_embeddings().register_forward_hook(lambda *_a: ran.append("lm_head")))
    scorer.batch_size = 7
    scorer.heads = ReasoningHeads.from_list([(0, 1), (1, 2)])
    truncated = scorer.score_ids(ids)
    assert set(ran) == {0, 1}
    ran.clear()

    def full_forward(model, layer, arch=None, **inputs):
        return model(**inputs).logits

    monkeypatch.setattr(scoring_module, "forward_until", full_forward)
    full = scorer.score_ids(ids)
    for h in handles:
        h.remove()
    assert "lm_head" in ran and 2 in ran
    assert np.abs(truncated - full).max() < 1e-7


@pytest.mark.slow
def test_smollm2_scores_match_eager_batched_and_report_length_correlation(smollm2):
    model, tok = smollm2
    heads = [(2, 3), (9, 1), (14, 7)]
    rows = _rows(n=6)
    scorer = CircuitSeerScorer(model, tok, heads, batch_size=6, progress=False)
    ids = scorer.tokenize(scorer.prompts(rows))
    scores = scorer.score_ids(ids)
    scorer.batch_size = 1
    np.testing.assert_allclose(scorer.score_ids(ids), scores, rtol=1e-4, atol=1e-12)
    try:
        ref = _eager_reference(model, ids, heads, "last", True, False, bos_id=tok.bos_token_id)
    finally:
        model.set_attn_implementation("sdpa")
    assert np.abs(scores - ref).max() < 1e-5
    assert np.abs(scores - ref).max() <= 1e-3 * np.abs(ref).max()
    scorer.batch_size = 6
    out = scorer.score_dataset(datasets.Dataset.from_list(rows))
    assert out.column_names[-1] == "circuitseer_score"
    np.testing.assert_allclose(out["circuitseer_score"], debias_length(scores, [len(x) for x in ids]), rtol=1e-4)
    assert abs(scorer.length_spearman) < 0.5  # debiased by default
    assert -1 <= scorer.per_example_length_spearman <= 1


def test_raw_score_tracks_length_on_uniform_attention():
    """A head with zero query attends uniformly: raw variance is exactly 0, and with the sink left out too."""
    model = tiny_model("llama")
    arch = get_arch(model)
    s = arch.component_slices(("q", 1, 0), projections=("q_proj",), model=model)[0]
    with torch.no_grad():
        model.get_submodule(s.module).weight[s.start:s.stop] = 0
    ids = _random_ids([4, 9, 16])
    for exclude in (True, False):
        scores = CircuitSeerScorer(model, _NoTok(), [(1, 0)], exclude_sink=exclude, progress=False).score_ids(ids)
        assert np.abs(scores).max() < 1e-12


# ----- cache and resume -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_interruption_loses_no_score(tmp_path, monkeypatch):
    model = tiny_model("llama", vocab_size=49152)
    tok = load_tokenizer("smollm2")
    ds = datasets.Dataset.from_list(_rows(n=10))
    clean = CircuitSeerScorer(model, tok, HEADS, length_debias=False, progress=False).score(ds)

    scorer = CircuitSeerScorer(model, tok, HEADS, length_debias=False, cache_dir=str(tmp_path), chunk_size=3,
                               progress=False)
    calls = []
    original = scorer.score_ids

    def dying(ids, advance=None):
        calls.append(len(ids))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while scoring the third chunk
        return original(ids, advance)

    monkeypatch.setattr(scorer, "score_ids", dying)
    with pytest.raises(KeyboardInterrupt):
        scorer.score(ds)
    cache_dirs = list(tmp_path.iterdir())
    assert len(cache_dirs) == 1 and len(list(cache_dirs[0].glob("chunk-*.npy"))) == 2
    assert not list(cache_dirs[0].glob("*.tmp*"))

    calls.clear()
    monkeypatch.setattr(scorer, "score_ids", lambda ids, advance=None: (calls.append(len(ids)), original(ids))[1])
    resumed = scorer.score(ds)
    assert calls == [3, 1]  # only the two unfinished chunks were scored again
    np.testing.assert_allclose(resumed, clean, rtol=1e-5, atol=0)  # other batch shapes: float32 noise only
    calls.clear()
    again = scorer.score(ds)
    assert calls == [] and np.array_equal(again, resumed)
    # a different data set or other heads get their own cache entry
    CircuitSeerScorer(model, tok, [(0, 0)], cache_dir=str(tmp_path), chunk_size=3, progress=False).score(ds)
    assert len(list(tmp_path.iterdir())) == 2


# ----- soft sampling -------------------------------------------------------------------------------------------


def test_tau_to_zero_is_top_k_and_seed_is_reproducible():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=200)
    top = np.sort(np.argsort(-scores)[:20])
    assert np.array_equal(select_indices(scores, fraction=0.1, tau=0.0), top)
    assert np.array_equal(select_indices(scores, fraction=0.1, tau=1e-6, seed=5), top)
    a = select_indices(scores, fraction=0.1, tau=0.5, seed=3)
    assert np.array_equal(a, select_indices(scores, fraction=0.1, tau=0.5, seed=3))
    assert not np.array_equal(a, select_indices(scores, fraction=0.1, tau=0.5, seed=4))
    assert len(a) == 20 and len(set(a)) == 20
    # tau sets how strongly high scores are preferred; huge tau is a uniform draw
    mean_z = lambda tau: np.mean([scores[select_indices(scores, k=20, tau=tau, seed=s)].mean() for s in range(20)])
    assert mean_z(0.5) > 1.0 > 0.3 > abs(mean_z(1e6))
    assert gumbel_top_k(np.r_[scores, np.nan], k=201, tau=0.5)[-1] == 200  # NaN ranks last


def test_select_subset_returns_dataset_rows_in_order():
    ds = datasets.Dataset.from_dict({"question": [f"q{i}" for i in range(30)], "s": list(range(30))})
    sub = select_subset(ds, "s", fraction=0.2, tau=0.0)
    assert isinstance(sub, datasets.Dataset) and sub["s"] == list(range(24, 30))
    sub2 = select_subset(ds.to_list(), np.arange(30.0), fraction=0.2, tau=0.5, seed=1)
    assert len(sub2) == 6 and sub2["s"] == sorted(sub2["s"])


@pytest.mark.parametrize("fraction", [0, 1.5, -0.1, None, float("nan")])
def test_fraction_outside_unit_interval_is_refused(fraction):
    with pytest.raises(ValueError, match="fraction must be in"):
        select_indices(np.arange(10.0), fraction=fraction)


# ----- sampler -------------------------------------------------------------------------------------------------------


def test_sampler_yields_only_selected_and_ranks_are_disjoint():
    scores = np.random.default_rng(1).normal(size=103)
    chosen = set(select_indices(scores, fraction=0.3, tau=0.5, seed=7).tolist())
    shares = [list(CircuitSeerSampler(scores, fraction=0.3, seed=7, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(s) == len(chosen) // 3 for s in shares)
    union = [i for s in shares for i in s]
    assert len(union) == len(set(union)) and set(union) <= chosen
    assert len(chosen) - len(union) < 3

    sampler = CircuitSeerSampler(scores, fraction=0.3, seed=7)
    loader = DataLoader(torch.arange(103), batch_size=8, sampler=sampler)
    seen = torch.cat(list(loader)).tolist()
    assert sorted(seen) == sorted(chosen) and len(loader) == 4
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(sampler) == sorted(first) and list(sampler) != first  # same subset, new order

    redraw = CircuitSeerSampler(scores, fraction=0.3, seed=7, redraw_each_epoch=True)
    e0 = set(redraw)
    redraw.set_epoch(1)
    assert set(redraw) != e0 and len(set(redraw)) == len(e0)

    fixed = CircuitSeerSampler.from_indices([5, 2, 9], pool_size=20, shuffle=False)
    assert list(fixed) == [2, 5, 9]


# ----- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_rows_long_prompts_and_foreign_heads_are_refused(tmp_path, caplog):
    model = tiny_model("llama", vocab_size=49152)
    tok = load_tokenizer("smollm2")
    scorer = CircuitSeerScorer(model, tok, HEADS, progress=False)
    rows = _rows(n=4)
    bad = rows[:2] + [{"problem": "x", "answer": "1"}] + rows[2:]
    with pytest.raises(ValueError, match=r"row 2 has no question field 'question'"):
        scorer.score(bad)
    with pytest.raises(ValueError, match=r"row 0 has no question field 'prompt'.*columns"):
        CircuitSeerScorer(model, tok, HEADS, question_field="prompt", progress=False).score(
            datasets.Dataset.from_list(rows))
    with pytest.raises(ValueError, match=r"row 1: the question field 'question' is empty"):
        scorer.score([rows[0], {"question": "  "}])
    with pytest.raises(ValueError, match=r"row 0 has no field 'topic' used by the template"):
        CircuitSeerScorer(model, tok, HEADS, prompt_template="{topic}: {question}", progress=False).score(rows)

    strict = CircuitSeerScorer(model, tok, HEADS, max_length=20, on_long="error", progress=False)
    with pytest.raises(ValueError, match=r"longer than the model's context of 20 tokens \(first: row 0"):
        strict.score(rows)
    lenient = CircuitSeerScorer(model, tok, HEADS, max_length=20, progress=False)
    with caplog.at_level("WARNING"):
        scores = lenient.score(rows)
    assert "keeping the first 20 tokens" in caplog.text and np.all(np.isfinite(scores))
    assert lenient.lengths.max() == 20
    with pytest.raises(ValueError, match="on_long"):
        CircuitSeerScorer(model, tok, HEADS, on_long="drop", progress=False).score(rows)

    path = ReasoningHeads.from_list(HEADS, tiny_model("qwen2")).save(tmp_path / "heads.json")
    with pytest.raises(ValueError, match="made for another model.*family"):
        CircuitSeerScorer(model, tok, str(path))
    ok = ReasoningHeads.from_list(HEADS, model).save(tmp_path / "ok.json")
    assert CircuitSeerScorer(model, tok, str(ok)).heads.heads == sorted(HEADS)
    with pytest.raises(ValueError, match="query head index 4"):
        CircuitSeerScorer(model, tok, [(0, 4)])
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        CircuitSeerScorer(model, tok, [(3, 0)])
    with pytest.raises(ValueError, match="no reasoning heads"):
        CircuitSeerScorer(model, tok, [])
    with pytest.raises(ValueError, match="query must be"):
        CircuitSeerScorer(model, tok, HEADS, query="first")


def test_reasoning_heads_from_circuit_top_five_percent(tmp_path):
    from circuit_peft.arch import Component
    from circuit_peft.circuit import Circuit

    model = tiny_model("llama")
    scores = {Component("q", l, h): float(10 * l + h) for l in range(3) for h in range(4)}
    scores[Component("mlp", 0, 5)] = 1e9  # neurons are not heads
    circuit = Circuit.from_scores(model, scores)
    heads = ReasoningHeads.from_circuit(circuit)  # 5 % of 12 heads -> 1
    assert heads.heads == [(2, 3)]
    assert ReasoningHeads.from_circuit(circuit, k=3).heads == [(2, 1), (2, 2), (2, 3)]
    circuit.save(tmp_path / "c.json")
    assert ReasoningHeads.load(tmp_path / "c.json", model=model).heads == [(2, 3)]
    with pytest.raises(ValueError, match="another model"):
        ReasoningHeads.load(tmp_path / "c.json", model=tiny_model("gpt2"))


def test_reasoning_heads_are_a_query_head_circuit_on_disk_and_old_files_still_load(tmp_path):
    import json

    from circuit_peft.circuit import Circuit

    model = tiny_model("llama")
    heads = ReasoningHeads.from_circuit(Circuit.from_scores(
        model, {("q", l, h): float(10 * l + h) for l in range(3) for h in range(4)}), k=3)
    path = heads.save(tmp_path / "heads.json")
    circuit = Circuit.load(path, model=model)  # the circuit format: locate, plot and the tuner read it
    assert circuit.method == "reasoning_heads" and [tuple(c) for c in circuit.components] == [
        ("q", 2, 1), ("q", 2, 2), ("q", 2, 3)]
    again = ReasoningHeads.load(path, model=model)  # exactly these heads, not re-ranked to 5 %
    assert again.heads == heads.heads and again.scores == heads.scores and again.source == heads.source
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "circuit-peft/reasoning-heads", "heads": [[1, 2], [0, 3]],
                               "model_fingerprint": circuit.fingerprint, "scores": {"1.2": 0.5}, "source": "ablation"}))
    legacy = ReasoningHeads.load(old, model=model)
    assert legacy.heads == [(0, 3), (1, 2)] and legacy.scores == {(1, 2): 0.5} and legacy.source == "ablation"


def test_length_debias_removes_a_power_law_in_length_and_keeps_order_within_a_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, size=300)
    quality = rng.normal(size=300)
    scores = np.exp(quality) / lengths.astype(float) ** 2  # a 1/n^2 length effect times a per-example factor
    from circuit_peft.select import length_spearman

    assert length_spearman(scores, lengths) < -0.6
    debiased = debias_length(scores, lengths)
    assert abs(length_spearman(debiased, lengths)) < 0.1
    np.testing.assert_allclose(debiased, quality - quality.mean(), atol=0.3)
    assert np.isnan(debias_length([0.0, 1e-3, 2e-3, np.nan], [5, 6, 7, 8])[[0, 3]]).all()


@pytest.mark.slow
def test_rows_without_a_finite_score_are_refused_or_never_selected(caplog):
    """One-word questions give NaN CircuitSeer scores: too many is an error, a few are never chosen."""
    from circuit_peft.select import select_data

    model = tiny_model("llama", vocab_size=49152)
    tok = load_tokenizer("smollm2")
    short = [{"question": "Hi", "answer": "1"}] * 6
    with pytest.raises(ValueError, match=r"only 0 of 6 rows have a finite score"):
        select_data(model, tok, short, method="circuitseer", fraction=0.5, heads=HEADS, progress=False)
    rows = _rows(n=6) + short[:2]
    with caplog.at_level("WARNING"):
        result = select_data(model, tok, rows, method="circuitseer", fraction=0.5, heads=HEADS, progress=False)
    assert result.info["non_finite_scores"] == 2 and "never selected" in caplog.text
    assert set(result.indices.tolist()) <= set(range(6)) and np.all(np.isfinite(result.subset["score"]))


def test_reasoning_heads_by_the_refined_scan():
    from circuit_peft.select import find_reasoning_heads

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    probe = [{"prompt_ids": torch.randint(3, 120, (6,), generator=g).tolist(),
              "solution_ids": torch.randint(3, 120, (4,), generator=g).tolist()} for _ in range(4)]
    heads = find_reasoning_heads(model, None, probe, method="refined", k=2, candidates=2)
    assert len(heads.heads) == 2 and heads.source == "refined scan"
    with pytest.raises(ValueError, match="keeps fraction= or k="):
        find_reasoning_heads(model, None, probe, method="refined", fraction=None, z=1.0)


def test_select_data_old_argument_order_is_a_clear_error():
    from circuit_peft.select import select_data

    with pytest.raises(TypeError, match="old order was select_data"):
        select_data([{"question": "q", "answer": "a"}], "random", 0.5)
    kept = select_data(None, None, [{"question": str(i), "answer": "a"} for i in range(4)], method="random", fraction=0.5)
    assert len(kept.subset) == 2
