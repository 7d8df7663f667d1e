"""Side effects of an adapter on SmolLM2: MMLU (5-shot, log-likelihood), TruthfulQA (MC1) and
KL(base || tuned) on general text. The base is the same PeftModel with its adapter disabled.
A random LoRA stands in for a trained adapter; the vendored test slices keep it short."""

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from circuit_peft import load_model, load_tokenizer
from circuit_peft.evaluate.data import load_mmlu, load_text, load_truthfulqa
from circuit_peft.evaluate.generation import continuation_logprobs
from circuit_peft.evaluate.side_effects import mean_kl, mmlu_accuracy, side_effects, text_chunks, truthfulqa_mc1

torch.set_num_threads(2)
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
SUBJECTS = ["elementary_mathematics", "high_school_mathematics"]
model, tok = load_model("smollm2"), load_tokenizer("smollm2")
peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

report = side_effects(peft, tok, data_dir=DATA, mmlu_subjects=SUBJECTS, mmlu_limit=4, truthfulqa_limit=8,
                      kl_chunks=4, progress=False)  # base=None: the adapter disabled
print({k: v for k, v in report.items() if k != "details"})

# the pieces one by one
mmlu = mmlu_accuracy(peft, tok, load_mmlu(DATA, SUBJECTS), n_shots=5, limit_per_subject=2, progress=False)
tqa = truthfulqa_mc1(peft, tok, load_truthfulqa(DATA, limit=4), progress=False)
kl = mean_kl(None, peft, tok, load_text(DATA), chunk_length=64, max_chunks=2, progress=False)
print(f"mmlu {mmlu['accuracy']:.2f}, truthfulqa {tqa['accuracy']:.2f}, kl {kl['kl']:.4f} nats/token "
      f"over {len(text_chunks(tok, load_text(DATA), 64, 2))} chunks")
ctx = tok("The capital of France is", add_special_tokens=False)["input_ids"]
paris, rome = (tok(w, add_special_tokens=False)["input_ids"] for w in (" Paris", " Rome"))
print("log p(Paris), log p(Rome):", continuation_logprobs(peft, tok, [ctx, ctx], [paris, rome], progress=False))
