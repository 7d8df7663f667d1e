"""PivotalTrainer / PivotalSFTTrainer (issue 11): the same weighted loss as the reference on full logits,
TRL's metrics kept, and the LM head run only at labelled positions."""

import pytest
import torch
from transformers import TrainingArguments

from circuit_peft.cca.trainers import PivotalTrainer, labelled_positions
from circuit_peft.taskdata import build_pivotal_dataset, pivotal_weighted_loss
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


@pytest.mark.slow
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


def _prefix_data(prefix_len: int, vocab: int = 128):
    """Three rows: one shared prompt prefix, then prompts and completions of different lengths."""
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=g).tolist()
    rows = []
    for prompt_len, completion_len in ((5, 4), (9, 6), (3, 2)):
        rest = torch.randint(3, vocab, (prompt_len + completion_len,), generator=g).tolist()
        n = prefix_len + len(rest)
        rows.append({"input_ids": prefix + rest, "completion_mask": [0] * (n - completion_len) + [1] * completion_len,
                     "pivotal_positions": [n - 1]})
    return build_pivotal_dataset(rows, pivotal_weight=5.0)


def _loss_and_grads(trainer, model, batch):
    model.zero_grad()
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,prefix_len,adapter", [("llama", 20, "circuit"), ("gemma3", 70, "circuit"),
                                                       ("qwen2", 20, "lora"), ("llama", 20, "full")])
def test_shared_prompt_prefix_runs_once_with_the_same_loss_and_gradients(tmp_path, family, prefix_len, adapter):
    """The batch's shared prompt prefix goes through the model once (batch 1) and the loss and every gradient
    equal running each row whole (gemma3 at 70 prefix tokens: past its sliding window of 64)."""
    from peft import LoraConfig, get_peft_model

    from circuit_peft import CircuitConfig

    model = tiny_model(family)
    if adapter == "circuit":
        model = get_peft_model(model, CircuitConfig(components={"q": {"0": [1]}, "v": {"1": [0]}, "mlp": {"2": [3, 7]}}))
    elif adapter == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False))
    data = _prefix_data(prefix_len)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True)
    trainer = PivotalTrainer(model=model, args=args, train_dataset=data)
    batch = trainer.data_collator([data[i] for i in range(3)])
    shapes = []
    embed = model.get_input_embeddings().register_forward_hook(lambda _m, inp, _o: shapes.append(tuple(inp[0].shape)))
    try:
        shared_loss, shared = _loss_and_grads(trainer, model, batch)
        assert shapes == [(1, prefix_len), (3, batch["input_ids"].shape[1] - prefix_len)]
        trainer.share_prompt_prefix = False
        whole_loss, whole = _loss_and_grads(trainer, model, batch)
        assert shapes[-1] == tuple(batch["input_ids"].shape)
    finally:
        embed.remove()
    assert shared_loss == pytest.approx(whole_loss, rel=1e-5)
    assert shared.keys() == whole.keys() and shared
    for name, grad in whole.items():
        torch.testing.assert_close(shared[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prompt_prefix_is_not_shared_where_it_would_not_be_exact(tmp_path):
    """LoRA dropout would draw one mask for all rows on the prefix, so the rows run whole; so do batches
    whose shared prefix is shorter than ``min_shared_prefix``."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True)
    trainer = PivotalTrainer(model=model, args=args, train_dataset=_prefix_data(20))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model.train()
    assert trainer.shared_prefix_length(model, {k: batch[k] for k in ("input_ids", "attention_mask")}, 20) == 0
    model.eval()  # no dropout acts in eval mode
    assert trainer.shared_prefix_length(model, {k: batch[k] for k in ("input_ids", "attention_mask")}, 20) == 20
    short = PivotalTrainer(model=tiny_model("llama"), args=args, train_dataset=_prefix_data(10))
    batch = short.data_collator([short.train_dataset[i] for i in range(3)])
    assert short.shared_prefix_length(short.model, {k: batch[k] for k in ("input_ids", "attention_mask")}, 10) == 0


def test_shared_prompt_prefix_is_not_shared_under_activation_checkpointing(tmp_path):
    """Checkpointed models keep no KV cache in training: the rows run whole (and the loss is the same)."""
    model = tiny_model("llama")
    model.gradient_checkpointing_enable()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True)
    trainer = PivotalTrainer(model=model, args=args, train_dataset=_prefix_data(20))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model.train()
    assert trainer.shared_prefix_length(model, {k: batch[k] for k in ("input_ids", "attention_mask")}, 20) == 0
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(_reference(model.eval(), batch), rel=1e-5)


@pytest.mark.slow
def test_shared_prompt_prefix_under_two_process_ddp_trains_what_whole_rows_train(tmp_path):
    """Under DDP (2 CPU processes) the prefix runs once per step and rank, and both ranks end with the adapter
    that running every row whole gives (DDP's gradient sync still happens once, in backward)."""
    from test_tuner_training import _torchrun_two_ranks

    r0, r1 = _torchrun_two_ranks("ddp_pivotal_prefix.py", tmp_path)
    assert r0["world_size"] == 2
    assert r0["shared_shapes"][0] == (1, 24) and all(s[0] == 2 for s in r0["whole_shapes"])
    assert r0["shared"].keys() == r0["whole"].keys() and r0["shared"]
    for name, value in r0["whole"].items():
        assert value.abs().sum() > 0, name
        assert torch.equal(r0["shared"][name], r1["shared"][name]), name
        torch.testing.assert_close(r0["shared"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prompt_prefix_is_not_shared_under_prompt_learning(tmp_path):
    """Prefix tuning brings its own key/value prefix: the rows run whole, and training still works."""
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True)
    trainer = PivotalTrainer(model=model, args=args, train_dataset=_prefix_data(20))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model.train()
    assert trainer.shared_prefix_length(model, {k: batch[k] for k in ("input_ids", "attention_mask")}, 20) == 0
    assert torch.isfinite(trainer.compute_loss(model, dict(batch)))
