"""PivotalTrainer / PivotalSFTTrainer (issue 11): the same weighted loss as the reference on full logits,
TRL's metrics kept, and the LM head run only at labelled positions."""

import pytest
import torch
from transformers import TrainingArguments

from circuit_peft.cca.trainers import PivotalTrainer, labelled_positions
from circuit_peft.cca.weighting import build_pivotal_dataset, pivotal_weighted_loss
from circuit_peft.models import tiny_model


def _data():
    rows = [{"input_ids": [1, 5, 6, 7, 8, 9], "completion_mask": [0, 0, 0, 1, 1, 1], "pivotal_positions": [4]},
            {"input_ids": [1, 11, 12, 13, 14, 15, 16, 17], "completion_mask": [0, 0, 0, 0, 0, 1, 1, 1],
             "pivotal_positions": [6, 7]}]
    return build_pivotal_dataset(rows, pivotal_weight=5.0)


def test_labelled_positions():
    labels = torch.tensor([[-100, -100, 3, 4], [-100, 7, -100, -100]])
    assert labelled_positions(labels).tolist() == [0, 1, 2]


def _reference(model, batch):
    return pivotal_weighted_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 batch["labels"], batch["token_weights"]).item()


def test_pivotal_trainer_loss_equals_the_full_logits_reference(tmp_path):
    model = tiny_model("llama")
    data = _data()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True)
    trainer = PivotalTrainer(model=model, args=args, train_dataset=data)
    batch = trainer.data_collator([data[0], data[1]])
    expected = _reference(model, batch)
    seen = {}
    def record(_m, inp, _out):
        seen["rows"] = inp[0].shape[1]

    handle = model.lm_head.register_forward_hook(record)
    try:
        loss = trainer.compute_loss(model, dict(batch))
    finally:
        handle.remove()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert seen["rows"] == 5  # positions 2..6 predict a labelled token: not all 8


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_pivotal_sft_trainer_keeps_trl_metrics_and_weights_the_loss(tmp_path, family):
    from trl import SFTConfig

    from circuit_peft.cca.trainers import PivotalSFTTrainer
    from circuit_peft.models import load_tokenizer

    model = tiny_model(family)
    data = _data()
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                     report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3)
    trainer = PivotalSFTTrainer(model=model, args=args, train_dataset=data, processing_class=load_tokenizer("smollm2", padding_side="right"))
    batch = trainer.data_collator([data[0], data[1]])
    expected = _reference(model, batch)
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    trainer.train()
    logged = {k for row in trainer.state.log_history for k in row}
    assert "mean_token_accuracy" in logged and "entropy" in logged
