"""The task-data layer (circuit_peft/taskdata): the one truncation policy, tokenized task rows read as probe rows,
the per-row answer loss and the contrastive margin (tiny model, no SmolLM2)."""

import pytest
import torch

from circuit_peft.errors import CircuitPeftError
from circuit_peft.models import tiny_model
from circuit_peft.taskdata import (
    IGNORE_INDEX, PivotalCollator, answer_example, build_pivotal_dataset, encode_probe, fit_to_length, logit_margins,
    mean_label_losses,
)


def test_fit_to_length_cuts_the_answer_end_then_the_prompt_start():
    p, a = list(range(10)), list(range(100, 110))
    assert fit_to_length(p, a, None) == (p, a) and fit_to_length(p, a, 20) == (p, a)
    assert fit_to_length(p, a, 15) == (p, a[:5])  # the prompt fits: only the answer's end goes
    assert fit_to_length(p, a, 8) == (p[3:], a[:1])  # at least one answer token; the prompt keeps its end
    assert fit_to_length(p, a, 12, min_answer=6) == (p[4:], a[:6])  # the demo keeps half the window for it
    ex = answer_example(p[:3], a[:4], 6)
    assert ex == {"input_ids": p[:3] + a[:3], "labels": [IGNORE_INDEX] * 3 + a[:3]}


def test_tokenized_task_rows_are_probe_rows_split_at_their_first_label():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], "token_weights": [1.0] * 5},
            {"input_ids": [5, 6, 3, 4], "labels": [IGNORE_INDEX, 6, 3, 4]}]
    split = [{"prompt_ids": [5, 6], "solution_ids": [7, 8, 9]}, {"prompt_ids": [5], "solution_ids": [6, 3, 4]}]
    for max_length in (None, 4):
        got = encode_probe(None, rows, max_length=max_length)
        assert got == encode_probe(None, split, max_length=max_length)
    assert [(e.ids, e.n_solution) for e in encode_probe(None, rows, max_length=4)] == [([5, 6, 7, 8], 2), ([5, 6, 3, 4], 3)]
    with pytest.raises(CircuitPeftError, match="empty prompt_ids or solution_ids"):
        encode_probe(None, [{"input_ids": [1, 2], "labels": [IGNORE_INDEX] * 2}])
    with pytest.raises(CircuitPeftError, match="prompt alone fills max_length=2"):
        encode_probe(None, rows, max_length=2)


@torch.no_grad()
def test_mean_label_losses_are_each_rows_own_model_loss():
    model = tiny_model("llama").eval()
    examples = [answer_example([1, 5, 9], [20, 21, 22]), answer_example([1, 7], [30, 31, 32, 33, 34])]
    batch = PivotalCollator(pad_token_id=0)(examples)
    losses = mean_label_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["labels"])
    for ex, got in zip(examples, losses):
        alone = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss
        assert got.item() == pytest.approx(alone.item(), abs=1e-5)


def test_logit_margins_and_contrastive_rows():
    logits = torch.tensor([[0.0, 1.0, 3.0], [2.0, -1.0, 0.5]])
    assert logit_margins(logits, torch.tensor([2, 0]), torch.tensor([1, 1])).tolist() == [2.0, 3.0]
    row = build_pivotal_dataset([{"context_ids": [4, 5], "desired_id": 6, "undesired_id": 7}], pivotal_weight=3.0)[0]
    assert row["input_ids"] == [4, 5, 6] and row["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 6]
    assert row["token_weights"] == [1.0, 1.0, 3.0] and row["undesired_ids"] == [IGNORE_INDEX, IGNORE_INDEX, 7]
