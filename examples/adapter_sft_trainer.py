"""Train a circuit adapter with TRL's SFTTrainer (peft_config=CircuitConfig) on a few GSM8K problems."""

import json
import tempfile
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from circuit_peft import CircuitConfig, load_model, load_tokenizer

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "gsm8k" / "train.jsonl"
rows = [json.loads(line) for line in DATA.read_text().splitlines()[:8]]
data = Dataset.from_list([{"prompt": r["question"], "completion": " " + r["answer"]} for r in rows])

model, tok = load_model("smollm2"), load_tokenizer("smollm2", padding_side="right")
config = CircuitConfig(components={"q": {"22": [2, 7]}, "k": {"22": [0, 2]}, "mlp": {"27": list(range(16))}})
with tempfile.TemporaryDirectory() as out:
    args = SFTConfig(output_dir=out, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3, max_length=96,
                     bf16=False, use_cpu=True, report_to=[], logging_steps=1, save_steps=3, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=config)
    trainer.model.print_trainable_parameters()
    trainer.train()  # resume later with trainer.train(resume_from_checkpoint=f"{out}/checkpoint-3")
    print("losses:", [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h])
    print("checkpoint files:", sorted(p.name for p in Path(out, "checkpoint-3").iterdir()))
