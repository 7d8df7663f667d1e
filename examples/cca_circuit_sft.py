"""Circuit SFT, the best circuit-only recipe measured on SmolLM2 (benchmarks/README.md, cca.py):
mine first-wrong-digit pivots, locate the 2 % of components that push toward the right digit,
then train only that circuit with a stock TRL SFTTrainer on gold solutions, answer digits weighted 5.

Sized to run in a few minutes on a CPU; the benchmark uses 160 training and 200 test problems."""

import torch
from trl import SFTConfig, SFTTrainer

from circuit_peft import load_model, load_tokenizer
from circuit_peft.cca import ARITHMETIC_SHOTS, AmplifyConfig, MiningConfig, make_problems, mine_pivotal_tokens
from circuit_peft.cca.pipeline import locate_circuit
from circuit_peft.cca.weighting import PivotalWeighting
from circuit_peft.evaluate.accuracy import evaluate_accuracy
from circuit_peft.taskdata.prompts import build_prompt, format_gsm8k_solution

torch.set_num_threads(2)
model, tok = load_model("smollm2"), load_tokenizer("smollm2")
shots = [dict(s) for s in ARITHMETIC_SHOTS]
train, test = make_problems(32, "train"), make_problems(32, "test")

# 1-2. pivots from the model's own greedy traces, and the circuit that pushes toward the right digit
mined = mine_pivotal_tokens(model, tok, train, "/tmp/circuit_sft/mining",
                            MiningConfig(pivot="digit", shots=shots, max_new_tokens=16))
circuit = locate_circuit(model, mined.records, AmplifyConfig(circuit_fraction=0.02))
print(circuit.summary())


# 3. SFT on gold solutions, only the circuit trainable, the answer digits weighted 5
def example(row):
    completion = format_gsm8k_solution(row["answer"])  # "47 + 38 = 85\nThe answer is 85."
    start = completion.index("=") + 2
    value = completion[start:].split("\n")[0]
    return {"prompt": build_prompt(tok, row["question"], "chat", shots), "completion": completion,
            "pivotal_spans": [[start, start + len(value)]]}


weighting = PivotalWeighting(pivotal_weight=5.0)
data = weighting.build_dataset([example(r) for r in train], tok, add_special_tokens=False)
tok.padding_side = "right"
args = SFTConfig(output_dir="/tmp/circuit_sft/run", num_train_epochs=2, per_device_train_batch_size=8,
                 learning_rate=1e-3, lr_scheduler_type="cosine", logging_steps=2, report_to=[], use_cpu=True,
                 save_strategy="no", max_length=256, gradient_checkpointing=False)
trainer = weighting.attach(SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                      peft_config=circuit.to_config(projections="paper")))
trainer.train()
tok.padding_side = "left"

peft_model = trainer.model.eval()
after = evaluate_accuracy(peft_model, tok, test, style="chat", shots=shots, max_new_tokens=16, progress=False)
with peft_model.disable_adapter():
    before = evaluate_accuracy(peft_model, tok, test, style="chat", shots=shots, max_new_tokens=16, progress=False)
print(f"held-out accuracy {before.accuracy:.3f} -> {after.accuracy:.3f} on {after.count} problems")
peft_model.save_pretrained("/tmp/circuit_sft/adapter")  # a normal PEFT adapter: PeftModel.from_pretrained loads it
