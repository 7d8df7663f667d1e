"""Baseline selectors: random, length-matched random, max-loss and IFD (real SmolLM2 tokenizer, tiny model)."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from circuit_peft.models import load_tokenizer, tiny_model
from circuit_peft.select.baselines import (
    ResponseLossScorer, ifd_indices, ifd_subset, length_matched_indices, max_loss_indices, prompt_lengths,
    random_indices, random_subset,
)

DATA = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="module")
def setup():
    with open(DATA) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(5))]
    tok = load_tokenizer("smollm2")
    return tiny_model("llama", vocab_size=len(tok)), tok, rows


@torch.no_grad()
def test_response_losses_equal_per_row_model_loss(setup):
    model, tok, rows = setup
    scorer = ResponseLossScorer(model, tok, batch_size=4, progress=False)
    cond, uncond = scorer.conditional(rows), scorer.unconditional(rows)
    for i in (0, 4):
        q = tok(rows[i]["question"])["input_ids"]
        a = tok("\n" + rows[i]["answer"], add_special_tokens=False)["input_ids"]
        for prefix, got in ((q, cond[i]), ([tok.bos_token_id], uncond[i])):
            ids = torch.tensor([prefix + a])
            labels = torch.tensor([[-100] * len(prefix) + a])
            assert abs(model(input_ids=ids, labels=labels).loss.item() - got) < 1e-4
    ifd = scorer.ifd(rows, conditional=cond)
    np.testing.assert_allclose(ifd, cond / uncond)
    assert len(max_loss_indices(cond, fraction=0.4)) == 2
    assert set(max_loss_indices(cond, k=3)) == set(np.argsort(-cond)[:3])


def test_ifd_drops_ratios_above_one_and_keeps_the_highest():
    ifd = np.array([0.5, 1.2, 0.9, 0.95, 3.0, 0.1, np.nan, 0.99])
    assert ifd_indices(ifd, k=3).tolist() == [2, 3, 7]
    ds = datasets.Dataset.from_dict({"i": list(range(8))})
    assert ifd_subset(ds, ifd, k=3)["i"] == [2, 3, 7]
    assert len(ifd_indices(ifd, k=7)) == 5  # only five have IFD <= 1


def test_random_and_length_matched_draws(setup):
    _, tok, rows = setup
    a = random_indices(100, 0.1, seed=1)
    assert len(a) == 10 and np.array_equal(a, random_indices(100, 0.1, seed=1))
    assert not np.array_equal(a, random_indices(100, 0.1, seed=2))
    assert len(random_subset(rows, fraction=0.5, seed=0)) == 2  # round(2.5) = 2
    lengths = np.random.default_rng(0).integers(10, 200, size=500)
    reference = np.argsort(lengths)[:50]  # the 50 shortest
    matched = length_matched_indices(lengths, reference, seed=3)
    assert len(matched) == 50 and lengths[matched].max() <= np.quantile(lengths, 0.1) + 1
    other = length_matched_indices(lengths, np.arange(0, 500, 10), seed=3)
    assert abs(np.median(lengths[other]) - np.median(lengths[np.arange(0, 500, 10)])) < 25
    assert prompt_lengths(tok, rows).tolist() == [len(tok(r["question"])["input_ids"]) for r in rows]


def test_baseline_bad_input(setup):
    model, tok, rows = setup
    scorer = ResponseLossScorer(model, tok, progress=False)
    with pytest.raises(ValueError, match=r"row 1 has no field 'answer' used by the template"):
        scorer.conditional([rows[0], {"question": "why?"}])
    with pytest.raises(ValueError, match="longer than the model's context of 40"):
        ResponseLossScorer(model, tok, max_length=40, on_long="error", progress=False).conditional(rows)
    assert np.isfinite(ResponseLossScorer(model, tok, max_length=40, progress=False).conditional(rows)).all()
    with pytest.raises(ValueError, match="fraction must be in"):
        random_indices(10, 0.0)
