"""Pivotal-token weighted SFT with a stock TRL SFTTrainer: build a pre-tokenized dataset whose answer
digits are pivotal (weight 5, unlikelihood on a wrong digit), attach the weighting, and log
pivotal-token accuracy / logit difference on held-out contrastive records during training."""

import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from circuit_peft import load_model, load_tokenizer
from circuit_peft.cca.weighting import PivotalMetricsCallback, PivotalWeighting, pivotal_metrics
from circuit_peft.taskdata.prompts import build_prompt, build_prompt_ids

torch.set_num_threads(2)
model, tok = load_model("smollm2"), load_tokenizer("smollm2")
tok.padding_side = "right"


def digit(text):  # SmolLM2 writes numbers digit by digit
    return tok(text, add_special_tokens=False)["input_ids"][0]


def example(a, b):
    prompt = build_prompt(tok, f"What is {a} + {b}?")
    completion = f"{a} + {b} = {a + b}. The answer is {a + b}."
    start = completion.index("=") + 2
    return {"prompt": prompt, "completion": completion, "pivotal_spans": [[start, start + len(str(a + b))]],
            "undesired_ids": [digit(str(a + b + 10)[0])]}  # unlikelihood on a wrong leading digit


def record(a, b):  # a contrastive record: the context ends right before the answer's first digit
    ctx = build_prompt_ids(tok, f"What is {a} + {b}?") + tok(f"{a} + {b} = ", add_special_tokens=False)["input_ids"]
    return {"context_ids": ctx, "desired_id": digit(str(a + b)[0]), "undesired_id": digit(str(a + b + 10)[0])}


weighting = PivotalWeighting(pivotal_weight=5.0, unlikelihood_weight=0.5)
# chat prompts already hold their special tokens
train = weighting.build_dataset([example(a, b) for a, b in [(12, 7), (23, 14), (31, 25), (40, 16)] * 4], tok,
                                add_special_tokens=False)
held_out = [record(a, b) for a, b in [(11, 22), (34, 13), (25, 30)]]
print("before:", pivotal_metrics(model, tok, held_out))

args = SFTConfig(output_dir="/tmp/pivotal_sft", max_steps=8, per_device_train_batch_size=4, learning_rate=5e-4,
                 logging_steps=2, report_to=[], bf16=False, gradient_checkpointing=False, use_cpu=True,
                 save_strategy="no", max_length=128)
trainer = weighting.attach(SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok,
                                      peft_config=LoraConfig(r=8, target_modules="all-linear")))
callback = PivotalMetricsCallback.install(trainer, held_out)
trainer.train()
for entry in callback.history:
    print(entry)
