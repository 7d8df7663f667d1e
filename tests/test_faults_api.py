"""Fault suite at the Python API: what the command line refuses, the library refuses too, through one layer
(``circuit_peft.validation``), with a :class:`CircuitPeftError` naming the file and field, or the argument,
and the value, before any work (the CLI side of each case is in ``tests/test_faults.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from circuit_peft import CircuitPeftError
from circuit_peft.arch import get_arch
from circuit_peft.circuit import Circuit
from circuit_peft.models import tiny_model


@pytest.fixture(scope="module")
def llama():
    """3 layers, 4 query heads, 2 key/value heads, 96 neurons, 256 positions."""
    return tiny_model("llama")


def _circuit_json(model) -> dict:
    c = Circuit([("q", 1, 2), ("mlp", 2, 7)], {("q", 1, 2): 0.5, ("q", 0, 1): 0.25, ("mlp", 2, 7): 1.0},
                fingerprint=get_arch(model).fingerprint(), method="test")
    return c.to_dict()


def _set(field, index, value):
    def edit(data):
        data[field][index] = value
    return edit


BAD_CIRCUITS = {  # what is broken in the file -> what the refusal names
    "query head 99": (_set("components", 0, ["q", 1, 99]),
                      r"c\.json: components\[0\]: query head 99 of layer 1 is outside the model's 4 query heads"),
    "index -1": (_set("components", 0, ["q", 1, -1]), r"c\.json: components\[0\]: index -1 .* is negative"),
    "layer 3 of 3": (_set("components", 1, ["mlp", 3, 7]), r"c\.json: components\[1\]: layer 3 .* outside the model's 3 layers"),
    "scored neuron 96": (_set("scores", 1, ["mlp", 2, 96, 1.0]), r"c\.json: scores\[1\]: MLP neuron 96 of layer 2"),
    "layer 'one'": (_set("components", 0, ["q", "one", 2]), r"c\.json: components\[0\]: layer 'one' .* not an integer"),
    "index 2.5": (_set("components", 0, ["q", 1, 2.5]), r"c\.json: components\[0\]: index 2\.5 .* not an integer"),
    "kind 'z'": (_set("components", 0, ["z", 1, 2]), r"c\.json: components\[0\]: unknown component kind 'z'"),
    "score 'high'": (_set("scores", 0, ["q", 0, 1, "high"]), r"c\.json: scores\[0\]: score of \['q', 0, 1\]: 'high' is not a finite number"),
    "score NaN": (_set("scores", 0, ["q", 0, 1, float("nan")]), r"c\.json: scores\[0\]: .* nan is not a finite number"),
    "score null": (_set("scores", 0, ["q", 0, 1, None]), r"c\.json: scores\[0\]: .* None is not a finite number"),
    "short score row": (_set("scores", 0, ["q", 0, 1]), r"c\.json: scores\[0\]: a score row is \[kind, layer, index, score\]"),
    "n_heads 'four'": (lambda d: d["fingerprint"].update(n_heads="four"), r"c\.json: fingerprint\.n_heads: size 'four' is not an integer"),
    "no n_layers": (lambda d: d["fingerprint"].pop("n_layers"), r"c\.json: fingerprint: no 'n_layers'"),
    "meta a list": (lambda d: d.update(meta=[1]), r"c\.json: meta: expected an object"),
}


@pytest.mark.parametrize("case", list(BAD_CIRCUITS))
def test_a_broken_circuit_file_is_refused_at_load_naming_file_and_field(llama, tmp_path, case):
    """With or without a model: the file's own fingerprint gives the sizes; summary() and plot() are never
    reached on such a circuit."""
    edit, match = BAD_CIRCUITS[case]
    data = _circuit_json(llama)
    edit(data)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data, allow_nan=True))
    for model in (llama, None):
        with pytest.raises(CircuitPeftError, match=match):
            Circuit.load(path, model=model)


def test_a_circuit_without_fingerprint_is_refused_on_a_model_and_read_without_one(llama, tmp_path):
    data = _circuit_json(llama)
    data["fingerprint"] = None
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    for model in (llama, tiny_model("llama", n_layers=2)):  # its own model or another size: indices unchecked
        with pytest.raises(CircuitPeftError, match=r"c\.json: fingerprint: null: this circuit does not say which model"):
            Circuit.load(path, model=model)
    alone = Circuit.load(path)  # reading the file alone stays allowed: its indices are integers >= 0
    assert len(alone) == 2 and "2 kept components" in alone.summary()
    with pytest.raises(ValueError, match="needs the model's sizes"):
        alone.plot(tmp_path / "c.png")
    alone.fingerprint = get_arch(llama).fingerprint()  # the documented way to vouch for it
    assert alone.check_model(llama) is None


def test_circuit_built_in_python_is_checked_like_a_file(llama):
    fp = get_arch(llama).fingerprint()
    with pytest.raises(CircuitPeftError, match=r"components\[1\]: query head 4 of layer 0 is outside the model's 4"):
        Circuit([("q", 0, 0), ("q", 0, 4)], fingerprint=fp)
    with pytest.raises(CircuitPeftError, match=r"scores.*'high' is not a finite number"):
        Circuit([], {("q", 0, 0): "high"})
    with pytest.raises(CircuitPeftError, match=r"components\[0\]: layer -1 .* negative"):
        Circuit([("q", -1, 0)])
    assert len(Circuit([("q", 0, 3)], {("q", 0, 3): np.float32(0.5)}, fingerprint=fp)) == 1


# ----- selection inputs -------------------------------------------------------------------------------------


def _pool(n=6):
    return [{"question": f"question {i}", "answer": str(i), "s": float(i)} for i in range(n)]


BAD_SELECTIONS = {
    "k=2.7": (dict(scores="s", k=2.7), r"^k must be a positive integer \(>= 1\), got 2\.7"),
    "k=0": (dict(scores="s", k=0), r"^k must be a positive integer"),
    "k=True": (dict(scores="s", k=True), r"^k must be a positive integer"),
    "k='3'": (dict(scores="s", k="3"), r"^k must be a positive integer"),
    "k=7 of 6": (dict(scores="s", k=7), r"^k=7 is more than the rows in the pool \(6\)"),
    "fraction=0": (dict(scores="s", fraction=0), r"^fraction must be in \(0, 1\]"),
    "fraction=1.5": (dict(scores="s", fraction=1.5), r"^fraction must be in \(0, 1\]"),
    "fraction=nan": (dict(scores="s", fraction=float("nan")), r"^fraction must be in \(0, 1\]"),
    "all NaN": (dict(scores=[float("nan")] * 6, k=2), r"^scores: none of the 6 scores is finite"),
    "some NaN": (dict(scores=[1.0, float("nan"), 2.0, float("inf"), 3.0, 4.0], k=2),
                 r"^scores: 2 of the 6 scores are not finite \(NaN or inf; rows \[1, 3\]\)"),
    "text column": (dict(scores="question", k=2), r"^scores \(column 'question'\): row 0: score 'question 0' is not a number"),
    "wrong length": (dict(scores=[1.0, 2.0], k=1), r"^scores: got 2 scores for 6 rows"),
}


@pytest.mark.parametrize("case", list(BAD_SELECTIONS))
def test_select_subset_refuses_bad_counts_shares_and_scores(case):
    from circuit_peft.select import select_subset

    kwargs, match = BAD_SELECTIONS[case]
    with pytest.raises(CircuitPeftError, match=match):
        select_subset(_pool(), **kwargs)


def test_every_k_is_checked_by_the_one_count_rule(llama):
    """Circuit.top, top_heads, gumbel_top_k and select_indices take k through validation.count."""
    from circuit_peft.select import gumbel_top_k, select_indices, top_heads

    circuit = Circuit.from_scores(llama, {("q", 0, h): float(h) for h in range(4)})
    calls = {"Circuit.top": lambda k: circuit.top(k=k), "top_heads": lambda k: top_heads({(0, 1): 1.0, (0, 2): 2.0}, k=k),
             "gumbel_top_k": lambda k: gumbel_top_k([1.0, 2.0, 3.0], k=k), "select_indices": lambda k: select_indices([1.0, 2.0, 3.0], k=k)}
    for name, call in calls.items():
        for bad in (2.7, 0, "2", True):
            with pytest.raises(CircuitPeftError, match=rf"^k must be a positive integer \(>= 1\), got {bad!r}"):
                call(bad)
        assert len(call(2.0)) == 2, name


def test_select_subset_refuses_a_score_column_with_nan_naming_the_column():
    import datasets

    from circuit_peft.select import select_subset

    pool = datasets.Dataset.from_list(_pool())
    pool = pool.map(lambda row, i: {"s": float("nan") if i in (2, 4) else row["s"]}, with_indices=True)
    with pytest.raises(CircuitPeftError, match=r"scores \(column 's'\): 2 of the 6 scores are not finite .*rows \[2, 4\]"):
        select_subset(pool, "s", k=2)
    assert len(select_subset(_pool(), "s", k=2.0)) == 2  # an integral float is a count


@pytest.mark.parametrize("column", ["question", "answer", "pool_index"])
def test_select_data_refuses_a_score_column_the_data_already_has_before_scoring(column):
    from circuit_peft.select import select_data

    with pytest.raises(CircuitPeftError, match=rf"^score_column: .*{column!r}"):  # before the missing model is noticed
        select_data(None, None, _pool(), method="max-loss", fraction=0.5, score_column=column)
    with pytest.raises(CircuitPeftError, match=r"^pool_index: the data already has a column 'pool_index'"):
        select_data(None, None, [dict(r, pool_index=0) for r in _pool()], method="random", fraction=0.5)
    assert len(select_data(None, None, _pool(), method="random", fraction=0.5, score_column=column).subset) == 3


# ----- rows and records against the model's context ----------------------------------------------------------


def test_records_are_refused_naming_the_record_when_ids_are_not_integers_or_too_long(llama):
    from circuit_peft.locate import learn_masks

    good = {"context_ids": [5, 6, 7], "desired_id": 8, "undesired_id": 9, "problem_id": "p0"}
    cases = [
        ({**good, "context_ids": [5, "six", 7]}, r"^record 0 \(problem_id 'p0'\): context_ids: token id 'six' is not an integer"),
        ({**good, "desired_id": 8.5}, r"^record 0 \(problem_id 'p0'\): desired_id: token id 8\.5 is not an integer"),
        ({**good, "context_ids": "5 6 7"}, r"^record 0 \(problem_id 'p0'\): context_ids: expected a list of token ids"),
        ({**good, "context_ids": [5] * 300}, r"^record 0 \(problem_id 'p0'\): its context_ids is 300 tokens, longer than "
                                             r"the model's context of 256 tokens \(max_position_embeddings\); 1 of 1 rows"),
    ]
    for record, match in cases:
        with pytest.raises(CircuitPeftError, match=match):
            learn_masks(llama, [record], epochs=1, pad_id=0)


@pytest.mark.slow
def test_mining_refuses_a_question_longer_than_the_context_or_empty_before_any_mining(tmp_path):
    from circuit_peft.cca.mining import mine_pivotal_tokens
    from circuit_peft.models import load_tokenizer

    tok = load_tokenizer("smollm2")  # the tiny model's 256 positions; SmolLM2's tokenizer (a chat template)
    model = tiny_model("llama", vocab_size=len(tok))
    problems = [{"id": "short", "question": "What is 1 + 2?", "answer": "3"},
                {"id": "long", "question": "What is " + " + ".join(["1"] * 200) + "?", "answer": "200"}]
    with pytest.raises(CircuitPeftError, match=r"^problem 'long': its prompt \(question, instruction and shots\) is "
                                               r"\d{3} tokens \+ 4 \(max_new_tokens\), longer than the model's context of "
                                               r"256 tokens \(max_position_embeddings\); 1 of 2 rows"):
        mine_pivotal_tokens(model, tok, problems, tmp_path / "mined", max_new_tokens=4, n_samples=1, progress=False)
    assert not (tmp_path / "mined").exists()  # refused before the run folder or any generation
    near = [{"id": "near", "question": "What is " + " + ".join(["1"] * 100) + "?", "answer": "100"}]
    with pytest.raises(CircuitPeftError, match=r"problem 'near': .* \+ 64 \(max_new_tokens\)"):  # fits, with no room to answer
        mine_pivotal_tokens(model, tok, near, max_new_tokens=64, n_samples=1, progress=False)
    for row, match in [({"id": "e", "question": " ", "answer": "1"}, r"^problem 0 \(id 'e'\): question must be a non-empty string"),
                       ({"id": "e", "problem": "1 + 2", "answer": "3"}, r"^problem 0: no 'question' field .*set question_field"),
                       ({"question": "What is 1 + 1?", "answer": "2"}, r"^problem 1: duplicate problem id '1'")]:
        with pytest.raises(CircuitPeftError, match=match):
            mine_pivotal_tokens(model, tok, [row] if "id" in row else [problems[0] | {"id": "1"}, row | {"id": "1"}],
                                max_new_tokens=4, n_samples=1, progress=False)
