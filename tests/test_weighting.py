"""Pivotal-token weighting for SFT: exact loss on a real SFTTrainer / Trainer step, truncation, metrics."""

import pytest
import torch
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from circuit_peft.cca.weighting import PivotalMetricsCallback, PivotalWeighting, pivotal_metrics
from circuit_peft.taskdata import IGNORE_INDEX, PivotalCollator, build_pivotal_dataset
from circuit_peft.models import load_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer("smollm2")
    t.padding_side = "right"
    return t


def _model(tok, seed=0):
    return tiny_model("llama", seed=seed, vocab_size=len(tok))


def _examples(tok):
    completion = "We add 17 and 25 to get 42. The answer is 42."
    return [
        {"prompt": "What is 17 + 25?", "completion": completion,
         "pivotal_spans": [[completion.index("42"), completion.index("42") + 2]],
         "undesired_ids": [tok("5", add_special_tokens=False)["input_ids"][0]]},
        {"prompt": "Add 3 and 4.", "completion": "3 + 4 = 7. The answer is 7."},
        {"context_ids": tok("What is 25 + 6? 25 + 6 = ", add_special_tokens=False)["input_ids"],
         "desired_id": tok("3", add_special_tokens=False)["input_ids"][0],
         "undesired_id": tok("4", add_special_tokens=False)["input_ids"][0], "problem_id": "p3"},
    ]


def _hand_loss(model, rows, ul_weight):
    """Weighted CE (+ unlikelihood) summed over all rows / number of label tokens, one row at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            for t in range(1, len(r["input_ids"])):
                if not r["completion_mask"][t]:
                    continue
                total += -float(logp[t - 1, r["input_ids"][t]]) * r["token_weights"][t]
                count += 1
                if r["undesired_ids"][t] != IGNORE_INDEX:
                    total += ul_weight * -float(torch.log1p(-logp[t - 1, r["undesired_ids"][t]].exp()))
    return total / count


def _sft_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, logging_steps=1,
                learning_rate=1e-3, report_to=[], bf16=False, gradient_checkpointing=False, use_cpu=True,
                save_strategy="no", disable_tqdm=True, max_length=64, seed=0)
    base.update(kw)
    return SFTConfig(**base)


def test_dataset_alignment(tok):
    ds = build_pivotal_dataset(_examples(tok), tok, pivotal_weight=5.0)
    for r in ds:
        n = len(r["input_ids"])
        assert len(r["completion_mask"]) == len(r["token_weights"]) == len(r["undesired_ids"]) == n
    r0 = ds[0]
    pivots = [t for t, w in enumerate(r0["token_weights"]) if w == 5.0]
    assert pivots and tok.decode([r0["input_ids"][t] for t in pivots]).strip() == "42"
    assert r0["undesired_ids"][pivots[0]] == tok("5", add_special_tokens=False)["input_ids"][0]
    assert sum(u != IGNORE_INDEX for u in r0["undesired_ids"]) == 1  # only on the span's first token
    assert r0["input_ids"][-1] == tok.eos_token_id  # add_eos
    assert all(m == 0 for m in r0["completion_mask"][: len(tok("What is 17 + 25?")["input_ids"])])
    r2 = ds[2]  # contrastive record: only the desired token is trained, with the pivotal weight
    assert r2["completion_mask"] == [0] * (len(r2["input_ids"]) - 1) + [1]
    assert r2["token_weights"][-1] == 5.0 and r2["undesired_ids"][-1] == _examples(tok)[2]["undesired_id"]


def test_sft_trainer_loss_equals_hand_weighted_ce(tok, tmp_path):
    torch.manual_seed(0)
    rows = build_pivotal_dataset(_examples(tok), tok, pivotal_weight=5.0)
    model = _model(tok)
    expected = _hand_loss(model, list(rows), ul_weight=0.5)
    trainer = PivotalWeighting(unlikelihood_weight=0.5).attach(
        SFTTrainer(model=model, args=_sft_args(tmp_path), train_dataset=rows, processing_class=tok))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["token_weights"].shape == batch["input_ids"].shape
    got = trainer.compute_loss(trainer.model, dict(batch))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    trainer.train()  # a real optimizer step; the logged loss is this batch's loss before the step
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-3)


def test_unit_weights_match_trl_loss(tok, tmp_path):
    rows = build_pivotal_dataset(_examples(tok)[:2], tok, pivotal_weight=1.0)
    model = _model(tok)
    plain = SFTTrainer(model=model, args=_sft_args(tmp_path / "a"), train_dataset=rows, processing_class=tok)
    batch = plain._prepare_inputs(next(iter(plain.get_train_dataloader())))
    trl_loss = plain.compute_loss(plain.model, dict(batch)).item()
    weighted = PivotalWeighting().attach(
        SFTTrainer(model=model, args=_sft_args(tmp_path / "b"), train_dataset=rows, processing_class=tok))
    wbatch = weighted._prepare_inputs(next(iter(weighted.get_train_dataloader())))
    assert weighted.compute_loss(weighted.model, dict(wbatch)).item() == pytest.approx(trl_loss, rel=1e-5)


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_weights_survive_truncation(tok, tmp_path, mode):
    text = " ".join(f"w{i}" for i in range(40))
    n = len(tok(text)["input_ids"])
    span_word = "w3" if mode == "keep_start" else "w37"
    start = text.index(span_word + " ")
    rows = build_pivotal_dataset([{"text": text, "pivotal_spans": [[start, start + len(span_word)]]}], tok)
    full = rows[0]
    pivots = [t for t, w in enumerate(full["token_weights"]) if w == 5.0]
    max_length = 20
    assert n > max_length
    trainer = PivotalWeighting().attach(SFTTrainer(
        model=_model(tok), args=_sft_args(tmp_path, max_length=max_length, truncation_mode=mode,
                                           per_device_train_batch_size=1),
        train_dataset=rows, processing_class=tok))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape == batch["token_weights"].shape == (1, max_length)
    offset = 0 if mode == "keep_start" else n - max_length
    kept = [t - offset for t in pivots if 0 <= t - offset < max_length]
    assert kept, "the pivotal token must survive this truncation"
    got = [t for t, w in enumerate(batch["token_weights"][0].tolist()) if w == 5.0]
    assert got == kept
    assert batch["input_ids"][0].tolist() == (full["input_ids"][:max_length] if mode == "keep_start"
                                              else full["input_ids"][-max_length:])


def test_plain_trainer_and_left_padding(tok, tmp_path):
    rows = build_pivotal_dataset(_examples(tok), tok, labels=True)
    model = _model(tok)
    expected = _hand_loss(model, list(rows), ul_weight=0.0)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = PivotalWeighting().attach(Trainer(model=model, args=args, train_dataset=rows, processing_class=tok))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(expected, rel=1e-5)
    trainer.train()
    # a collator that pads on the left: weights follow the tokens
    def left(examples):
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.tensor([[0] * (width - len(e["input_ids"])) + e["input_ids"] for e in examples])
        mask = torch.tensor([[0] * (width - len(e["input_ids"])) + [1] * len(e["input_ids"]) for e in examples])
        return {"input_ids": ids, "attention_mask": mask}
    out = PivotalCollator(left)([dict(r) for r in rows])
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert out["token_weights"][i, -n:].tolist() == r["token_weights"]
        assert out["token_weights"][i, : out["input_ids"].shape[1] - n].sum() == 0


def test_pivotal_metrics_and_callback(tok, tmp_path):
    model = _model(tok)
    records = [_examples(tok)[2], {"context_ids": tok("Say hi", add_special_tokens=False)["input_ids"],
                                   "desired_id": 5, "undesired_id": 7}]
    got = pivotal_metrics(model, tok, records)
    diffs, top = [], []
    with torch.no_grad():
        for r in records:
            logits = model(input_ids=torch.tensor([r["context_ids"]])).logits[0, -1]
            diffs.append(float(logits[r["desired_id"]] - logits[r["undesired_id"]]))
            top.append(int(logits.argmax()) == r["desired_id"])
    assert got["pivotal_logit_diff"] == pytest.approx(sum(diffs) / 2, abs=1e-4)
    assert got["pivotal_pair_accuracy"] == sum(d > 0 for d in diffs) / 2
    assert got["pivotal_accuracy"] == sum(top) / 2

    rows = build_pivotal_dataset(_examples(tok), tok)
    trainer = PivotalWeighting().attach(SFTTrainer(
        model=model, args=_sft_args(tmp_path, max_steps=2, learning_rate=1e-2), train_dataset=rows,
        processing_class=tok))
    cb = PivotalMetricsCallback.install(trainer, records)
    trainer.train()
    assert [h["step"] for h in cb.history] == [0, 1, 2]
    logged = [h for h in trainer.state.log_history if "eval_pivotal_logit_diff" in h]
    assert cb.history[0]["eval_pivotal_logit_diff"] == pytest.approx(got["pivotal_logit_diff"], abs=1e-4)
    assert [h["step"] for h in logged] == [1, 2]
    assert logged[0]["eval_pivotal_logit_diff"] == cb.history[1]["eval_pivotal_logit_diff"]
    assert cb.history[2]["eval_pivotal_logit_diff"] != cb.history[0]["eval_pivotal_logit_diff"]  # training moved it


def test_bad_input(tok, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        build_pivotal_dataset([], tok)
    with pytest.raises(ValueError, match="outside"):
        build_pivotal_dataset([{"text": "short", "pivotal_spans": [[2, 50]]}], tok)
    with pytest.raises(ValueError, match="undesired_id"):
        build_pivotal_dataset([{"context_ids": [1, 2], "desired_id": 3}], tok)
    with pytest.raises(ValueError, match="needs 'context_ids'"):
        build_pivotal_dataset([{"question": "no text"}], tok)
    with pytest.raises(ValueError, match="pivotal_positions"):
        build_pivotal_dataset([{"input_ids": [1, 2, 3], "pivotal_positions": [3]}])
    with pytest.raises(ValueError, match="empty"):
        PivotalMetricsCallback([])
    rows = build_pivotal_dataset(_examples(tok), tok)
    with pytest.raises(ValueError, match="packing"):
        PivotalWeighting().attach(SFTTrainer(model=_model(tok), args=_sft_args(tmp_path, packing=True),
                                             train_dataset=rows, processing_class=tok))


def test_gradient_accumulation_matches_full_batch(tok, tmp_path):
    rows = build_pivotal_dataset(_examples(tok), tok, pivotal_weight=5.0)
    model = _model(tok)
    expected = _hand_loss(model, list(rows), ul_weight=0.5)
    trainer = PivotalWeighting(unlikelihood_weight=0.5).attach(SFTTrainer(
        model=model, args=_sft_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=3),
        train_dataset=rows, processing_class=tok))
    trainer.train()  # three micro-batches of one row, normalised by the label tokens of all three
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-3)


def test_circuit_sft_with_pivotal_weighting(tok, tmp_path):
    """Circuit SFT: a CircuitConfig adapter trained by a stock SFTTrainer with the weighting attached."""
    from circuit_peft import CircuitConfig
    from circuit_peft.arch import Component

    rows = build_pivotal_dataset(_examples(tok), tok)
    config = CircuitConfig.from_components([Component("q", 0, 1), Component("v", 1, 0), Component("mlp", 2, 7)])
    trainer = PivotalWeighting(unlikelihood_weight=0.5).attach(SFTTrainer(
        model=_model(tok), args=_sft_args(tmp_path, max_steps=2, learning_rate=1e-2), train_dataset=rows,
        processing_class=tok, peft_config=config))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
