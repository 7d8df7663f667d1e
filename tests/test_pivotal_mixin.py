"""`class MyTrainer(PivotalLossMixin, SFTTrainer)` (issue 35): the composed trainer keeps its weight columns
and trains the weighted loss; weights asked for but absent from a batch raise instead of training unweighted."""

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from circuit_peft.cca.trainers import PivotalLossMixin
from circuit_peft.taskdata import IGNORE_INDEX, build_pivotal_dataset
from circuit_peft.errors import CircuitPeftError
from circuit_peft.models import load_tokenizer, tiny_model


class MyTrainer(PivotalLossMixin, SFTTrainer):
    """The composition README and docs/weighting.md document."""


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer("smollm2")
    t.padding_side = "right"
    return t


def _rows(tok):
    completion = "We add 17 and 25 to get 42. The answer is 42."
    start = completion.index("42")
    return [{"prompt": "What is 17 + 25?", "completion": completion, "pivotal_spans": [[start, start + 2]],
             "undesired_ids": [tok("5", add_special_tokens=False)["input_ids"][0]]},
            {"prompt": "Add 3 and 4.", "completion": "3 + 4 = 7. The answer is 7."}]


def _weighted_reference(model, rows, ul_weight: float) -> float:
    """Weighted CE (+ unlikelihood) over all label tokens / their count, one row at a time, full logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logp = torch.log_softmax(model(input_ids=torch.tensor([r["input_ids"]])).logits[0].float(), -1)
            for t in range(1, len(r["input_ids"])):
                if r["completion_mask"][t]:
                    total += -float(logp[t - 1, r["input_ids"][t]]) * r["token_weights"][t]
                    count += 1
                if r["undesired_ids"][t] != IGNORE_INDEX:
                    total += ul_weight * -float(torch.log1p(-logp[t - 1, r["undesired_ids"][t]].exp()))
    return total / count


def _trainer(tok, tmp_path, data, **kw):
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                     learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                     max_length=64, seed=0)
    model = tiny_model("llama", vocab_size=len(tok))
    return MyTrainer(model=model, args=args, train_dataset=data, processing_class=tok, **kw)


def test_composed_mixin_trains_the_weighted_loss(tok, tmp_path):
    """Before issue 35 TRL's remove_unused_columns dropped token_weights and the loss was TRL's unweighted one."""
    data = build_pivotal_dataset(_rows(tok), tok, pivotal_weight=5.0)
    trainer = _trainer(tok, tmp_path, data, unlikelihood_weight=0.5)
    expected = _weighted_reference(trainer.model, list(data), ul_weight=0.5)
    unweighted = _weighted_reference(trainer.model, [{**r, "token_weights": [1.0] * len(r["input_ids"]),
                                                      "undesired_ids": [IGNORE_INDEX] * len(r["input_ids"])}
                                                     for r in data], ul_weight=0.0)
    assert abs(expected - unweighted) > 0.1 * unweighted  # the two losses are told apart
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["token_weights"].shape == batch["input_ids"].shape
    trainer.model.train()
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(expected, rel=1e-5)
    trainer.train()  # a real step: the logged loss is the weighted one
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-3)


def test_composed_mixin_refuses_a_batch_that_lost_its_weights(tok, tmp_path):
    data = build_pivotal_dataset(_rows(tok), tok, pivotal_weight=5.0)
    trainer = _trainer(tok, tmp_path, data)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    with pytest.raises(CircuitPeftError, match="'token_weights'"):
        trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "token_weights"})
    ul = _trainer(tok, tmp_path / "ul", data, unlikelihood_weight=0.5)
    with pytest.raises(CircuitPeftError, match="'undesired_ids'"):
        ul.compute_loss(ul.model, {k: v for k, v in batch.items() if k != "undesired_ids"})


def test_composed_mixin_without_weight_columns_trains_the_parent_loss(tok, tmp_path):
    """Data with no weight columns asked for no weights: the parent's (TRL's) loss, as documented."""
    data = build_pivotal_dataset(_rows(tok), tok, pivotal_weight=5.0).remove_columns(["token_weights",
                                                                                      "undesired_ids"])
    trainer = _trainer(tok, tmp_path, data)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert "token_weights" not in batch
    trainer.model.train()
    plain = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch)).item()
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(plain, rel=1e-6)
