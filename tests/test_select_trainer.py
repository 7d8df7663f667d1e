"""CircuitSeerSampler inside transformers.Trainer and trl.SFTTrainer (one line: use_sampler)."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from circuit_peft.models import load_tokenizer, tiny_model
from circuit_peft.select import CircuitSeerSampler, use_sampler

DATA = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"


def _args(tmp_path, **kw):
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3,
                report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, dataloader_num_workers=0, **kw)


def test_trainer_trains_only_on_selected_rows(tmp_path):
    model = tiny_model("llama")
    n = 24
    g = torch.Generator().manual_seed(0)
    pool = datasets.Dataset.from_dict({"input_ids": torch.randint(3, 128, (n, 8), generator=g).tolist(),
                                       "idx": list(range(n))})
    scores = np.random.default_rng(0).normal(size=n)
    seen = []

    def collate(rows):
        seen.extend(r["idx"] for r in rows)
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": ids}

    trainer = Trainer(model=model, args=TrainingArguments(**_args(tmp_path, remove_unused_columns=False)),
                      train_dataset=pool, data_collator=collate)
    sampler = CircuitSeerSampler(scores, fraction=0.25, seed=1)
    use_sampler(trainer, sampler)  # the one line
    assert len(trainer.get_train_dataloader()) == 3
    seen.clear()
    trainer.train()
    assert seen and set(seen) <= set(sampler.selected().tolist())
    with pytest.raises(ValueError, match="train_dataset has 24 rows but the sampler's scores cover 10"):
        use_sampler(trainer, CircuitSeerSampler(np.zeros(10), fraction=0.5))


@pytest.mark.slow
def test_sft_trainer_draws_batches_from_the_selection(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer("smollm2", padding_side="right")
    model = tiny_model("llama", vocab_size=len(tok))
    with open(DATA) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(16))]
    pool = datasets.Dataset.from_list([{"text": r["question"] + "\n" + r["answer"]} for r in rows])
    sampler = CircuitSeerSampler(np.arange(16.0), fraction=0.25, tau=0.0)  # the 4 last rows
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=pool,
                         args=SFTConfig(**_args(tmp_path, max_length=64, packing=False, dataset_text_field="text")))
    use_sampler(trainer, sampler)
    wanted = {tuple(trainer.train_dataset[i]["input_ids"]) for i in sampler.selected().tolist()}
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 2
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            assert tuple(ids[mask.bool()].tolist()) in wanted
    trainer.train()
    assert trainer.state.global_step == 3


def test_sampler_mixin_as_a_trainer_argument(tmp_path):
    """CircuitSeerTrainer(train_sampler=...) overrides _get_train_sampler through the class (super() kept),
    and without a sampler it is the plain Trainer's."""
    from circuit_peft.select.sampler import CircuitSeerSamplerMixin, CircuitSeerTrainer

    model = tiny_model("llama")
    pool = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 12, "labels": [[5, 6, 7, 8]] * 12})
    sampler = CircuitSeerSampler(np.arange(12.0), fraction=0.5, tau=0.0)
    trainer = CircuitSeerTrainer(model=model, args=TrainingArguments(**_args(tmp_path)), train_dataset=pool,
                                 train_sampler=sampler)
    assert trainer._get_train_sampler() is sampler and len(trainer.get_train_dataloader()) == 3
    plain = CircuitSeerTrainer(model=model, args=TrainingArguments(**_args(tmp_path)), train_dataset=pool)
    assert plain._get_train_sampler() is not sampler and len(plain.get_train_dataloader()) == 6
    other = Trainer(model=model, args=TrainingArguments(**_args(tmp_path)), train_dataset=pool)
    use_sampler(other, sampler)
    assert isinstance(other, CircuitSeerSamplerMixin) and isinstance(other, Trainer)
    assert "_get_train_sampler" not in vars(other)  # nothing patched on the instance
