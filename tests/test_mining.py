"""Pivotal-token mining: problem family, first wrong digit, prefix/branching records on the real
SmolLM2, resume after an interrupted run, bad input."""

import json

import pytest
import torch

from circuit_peft.cca.mining import (
    MiningConfig, PROGRESS_FILE, RECORDS_FILE, first_wrong_digit, load_records, mine_pivotal_tokens,
)
from circuit_peft.cca.problems import ARITHMETIC_SHOTS, demo_problems, make_problems, problem_split
from circuit_peft.evaluate.answers import NumberAnswer
from circuit_peft.taskdata.prompts import build_prompt, encode_prompts
from circuit_peft.evaluate.generation import generate_batched

SHOTS = [dict(s) for s in ARITHMETIC_SHOTS]
# SmolLM2 answers this one right greedily (so sampling at T=1.2 looks for a wrong trace) ...
RIGHT = {"id": "p-right", "question": "What is 72 + 37?", "answer": "72 + 37 = 109\n#### 109"}
# ... and these wrong.
WRONG = [{"id": "p-wrong1", "question": "What is 63 + 55?", "answer": "63 + 55 = 118\n#### 118"},
         {"id": "p-wrong2", "question": "What is 40 + 49?", "answer": "40 + 49 = 89\n#### 89"}]
FAST = dict(shots=SHOTS, max_new_tokens=14, n_samples=4, progress=False)


def test_problem_family_is_seeded_disjoint_and_parsable():
    train = make_problems(400, "train", seed=3)
    test = make_problems(200, "test", seed=3)
    assert train == make_problems(400, "train", seed=3)
    keys = lambda rows: {(r["op"], r["a"], r["b"]) for r in rows}  # noqa: E731
    assert not keys(train) & keys(test)
    assert all(problem_split(*k) == "test" for k in keys(test))
    fmt = NumberAnswer()
    for r in train[:50] + test[:50]:
        value = r["a"] + r["b"] if r["op"] == "+" else r["a"] - r["b"]
        assert fmt.gold(r) == str(value) and value >= 0
    assert {r["kind"] for r in train} == {"add", "sub", "word_add", "word_sub"}
    assert len({r["id"] for r in train}) == len(train)
    held = demo_problems("val") + demo_problems("test")
    assert not keys(demo_problems("train")) & keys(held)
    with pytest.raises(ValueError, match="split"):
        make_problems(3, "dev")


@pytest.mark.slow
def test_first_wrong_digit(smollm2):
    _, tok = smollm2
    ids = tok.encode("77 + 69 = 145\nThe answer is 145.", add_special_tokens=False)
    j, desired = first_wrong_digit(tok, ids, "146")
    assert tok.decode(ids[:j]) == "77 + 69 = 14" and tok.decode([ids[j]]) == "5" and tok.decode([desired]) == "6"
    short = tok.encode("77 + 69 = 14\nThe answer is 14.", add_special_tokens=False)
    j, desired = first_wrong_digit(tok, short, "146")
    assert tok.decode(short[:j]) == "77 + 69 = 14" and tok.decode([desired]) == "6"
    assert first_wrong_digit(tok, tok.encode("= 146", add_special_tokens=False), "146") is None
    assert first_wrong_digit(tok, tok.encode("no number", add_special_tokens=False), "146") is None


def _prompt_ids(tok, row):
    return encode_prompts(tok, [build_prompt(tok, row["question"], "chat", SHOTS)], "chat")[0]


def _check_well_formed(records, tok, rows):
    by_id = {r["id"]: r for r in rows}
    assert len(records) > 0
    for rec in records:
        assert rec["desired_id"] != rec["undesired_id"]
        prompt = _prompt_ids(tok, by_id[rec["problem_id"]])
        assert rec["context_ids"][: len(prompt)] == prompt
        assert rec["position"] == len(rec["context_ids"]) - len(prompt)


@torch.no_grad()
def _completions_correct(model, tok, rec, gold):
    outs = generate_batched(model, tok, [rec["context_ids"] + [rec["desired_id"]], rec["context_ids"] + [rec["undesired_id"]]],
                            max_new_tokens=max(1, FAST["max_new_tokens"] - rec["position"] - 1), progress=False)
    response = rec["context_ids"][len(rec["context_ids"]) - rec["position"]:]
    return [NumberAnswer().extract(tok.decode(response + [t] + o)) == gold
            for t, o in zip((rec["desired_id"], rec["undesired_id"]), outs)]


@pytest.mark.slow
def test_prefix_and_branching_records_on_smollm2(smollm2):
    model, tok = smollm2
    rows = [RIGHT]
    prefix = mine_pivotal_tokens(model, tok, rows, method="prefix", **FAST)
    _check_well_formed(prefix.records, tok, rows)
    # The context ends where the greedy trace and the sample diverge: its response part is a prefix
    # of the greedy trace, and the greedy token there is the desired one (greedy was right).
    greedy = generate_batched(model, tok, [_prompt_ids(tok, RIGHT)], max_new_tokens=14, progress=False)[0]
    rec = prefix.records[0]
    assert rec["greedy_correct"] is True
    response = rec["context_ids"][len(_prompt_ids(tok, RIGHT)):]
    assert response == greedy[: len(response)] and greedy[len(response)] == rec["desired_id"]

    branching = mine_pivotal_tokens(model, tok, rows, method="branching", **FAST)
    _check_well_formed(branching.records, tok, rows)
    rec = branching.records[0]
    # The alternative is the model's own greedy token after the context ...
    logits = model(input_ids=torch.tensor([rec["context_ids"]])).logits[0, -1]
    assert int(logits.argmax()) in (rec["desired_id"], rec["undesired_id"])
    # ... and the pivotal token changes the outcome (greedy completion).
    good, bad = _completions_correct(model, tok, rec, "109")
    assert good and not bad


@pytest.mark.slow
def test_digit_pivot_outcome_filter_and_dataset(smollm2, tmp_path):
    model, tok = smollm2
    result = mine_pivotal_tokens(model, tok, WRONG, tmp_path / "m", pivot="digit", **FAST)
    _check_well_formed(result.records, tok, WRONG)
    assert all(r["method"] == "digit" for r in result.records)
    assert tok.decode([result.records[0]["desired_id"]]).strip().isdigit()
    ds = load_records(tmp_path / "m")
    assert len(ds) == len(result.records) and set(ds.column_names) >= {"context_ids", "desired_id", "undesired_id",
                                                                         "problem_id"}
    filtered = mine_pivotal_tokens(model, tok, WRONG, pivot="digit", outcome_filter=True, **FAST)
    assert len(filtered.records) <= len(result.records)
    for rec in filtered.records:
        gold = NumberAnswer().gold(next(r for r in WRONG if r["id"] == rec["problem_id"]))
        good, bad = _completions_correct(model, tok, rec, gold)
        assert good and not bad


@pytest.mark.slow
def test_resume_after_interrupted_run_gives_same_records(smollm2, tmp_path):
    model, tok = smollm2
    rows = [RIGHT] + WRONG
    kw = dict(FAST, pivot="digit", batch_size=2)
    full = mine_pivotal_tokens(model, tok, rows, tmp_path / "full", **kw)
    part = mine_pivotal_tokens(model, tok, rows, tmp_path / "part", max_problems=1, **kw)
    assert part.stats["mined"] == 1
    # Simulate a kill: a record of a problem not yet marked done, and a torn last line.
    with open(tmp_path / "part" / RECORDS_FILE, "a") as f:
        f.write(json.dumps(dict(full.records[-1], problem_id="p-wrong1")) + "\n" + '{"context_ids": [1, 2')
    resumed = mine_pivotal_tokens(model, tok, rows, tmp_path / "part", **kw)
    assert resumed.records.to_list() == full.records.to_list()
    assert load_records(tmp_path / "part").to_list() == full.records.to_list()
    assert len((tmp_path / "part" / PROGRESS_FILE).read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="other settings"):
        mine_pivotal_tokens(model, tok, rows, tmp_path / "part", **dict(kw, n_samples=2))


@pytest.mark.slow
def test_bad_input(smollm2):
    model, tok = smollm2
    with pytest.raises(ValueError, match="parsable gold"):
        mine_pivotal_tokens(model, tok, [{"question": "hi", "answer": "no number here"}], progress=False)
    with pytest.raises(ValueError, match="method"):
        MiningConfig(method="sideways")
    with pytest.raises(ValueError, match="duplicate"):
        mine_pivotal_tokens(model, tok, [RIGHT, RIGHT], progress=False)
    # Never right, never a flip: zero records stops with an explanation; the bad row is reported.
    hard = [{"id": "h", "question": "What is 7391 * 2847?", "answer": "#### 21042177"},
            {"id": "bad", "question": "What is 1 + 1?", "answer": "two"}]
    with pytest.raises(ValueError, match="never right"):
        mine_pivotal_tokens(model, tok, hard, shots=SHOTS, max_new_tokens=4, n_samples=1, progress=False)
