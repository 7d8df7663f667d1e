"""Greedy, batched accuracy of SmolLM2 on a few held-out problems (chat prompt), with per-item records;
``generate_batched`` is the generation loop underneath (also used by CCA mining)."""

import torch

from circuit_peft import load_model, load_tokenizer
from circuit_peft.evaluate.accuracy import evaluate_accuracy
from circuit_peft.evaluate.generation import generate_batched
from circuit_peft.taskdata.prompts import build_prompt_ids

torch.set_num_threads(2)
model, tok = load_model("smollm2"), load_tokenizer("smollm2")
problems = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 3), (14, 25), (37, 48), (5, 6)]]

result = evaluate_accuracy(model, tok, problems, style="chat", instruction="End with 'The answer is N.'",
                           max_new_tokens=32, batch_size=4)
print(f"accuracy {result.accuracy:.2f} +- {result.stderr:.2f} ({result.correct}/{result.count})")
for rec in result.records:
    print(f"  gold {rec['gold']:>3}  predicted {rec['prediction']!s:>4}  {rec['completion']!r}")

ids = [build_prompt_ids(tok, p["question"]) for p in problems[:2]]
completions = generate_batched(model, tok, ids, max_new_tokens=8, batch_size=2, progress=False)
print("raw completions:", [tok.decode(c) for c in completions])
