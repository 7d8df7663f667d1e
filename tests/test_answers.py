import json
from pathlib import Path

import pytest

from circuit_peft.evaluate.answers import NumberAnswer, extract_gsm8k_gold, extract_model_answer, is_correct

DATA = Path(__file__).parent / "data" / "gsm8k"


def test_gsm8k_gold_on_real_rows():
    rows = [json.loads(l) for l in (DATA / "train.jsonl").read_text().splitlines()]
    golds = [extract_gsm8k_gold(r["answer"]) for r in rows]
    assert golds[:3] == ["72", "10", "5"]
    assert all(g is not None for g in golds)


@pytest.mark.parametrize("text,expected", [
    ("So the answer is 42.", "42"),
    ("The answer is: $1,250.", "1250"),
    ("3 + 4 = 7, then 7 * 2 = 14", "14"),
    ("#### 18", "18"),
    ("\\boxed{3.50}", "3.5"),
    ("no number here", None),
    ("The answer is -5", "-5"),
])
def test_model_answer_extraction(text, expected):
    assert extract_model_answer(text) == expected


def test_checking_and_missing_field():
    assert is_correct("the answer is 72", "72")
    assert not is_correct("the answer is 71", "72")
    with pytest.raises(ValueError, match="no 'answer' field"):
        NumberAnswer().gold({"question": "q"})
