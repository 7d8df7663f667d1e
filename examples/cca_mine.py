"""Pivotal-token mining on SmolLM2: branching (the default), prefix and first-wrong-digit pivots, a
resumable output folder, and the records as a datasets.Dataset."""

import torch

from circuit_peft import load_model, load_tokenizer
from circuit_peft.cca import ARITHMETIC_SHOTS, load_records, make_problems, mine_pivotal_tokens

torch.set_num_threads(2)
model, tok = load_model("smollm2"), load_tokenizer("smollm2")
problems = [{"id": "p1", "question": "What is 72 + 37?", "answer": "72 + 37 = 109\n#### 109"}] + make_problems(3)
kw = dict(shots=list(ARITHMETIC_SHOTS), max_new_tokens=14, n_samples=4)

for settings in (dict(method="branching"), dict(method="prefix"), dict(pivot="digit")):
    result = mine_pivotal_tokens(model, tok, problems, f"/tmp/cca_mine_{'_'.join(settings.values())}",
                                 **settings, **kw)
    print(settings, result.stats)
    for rec in result.records.select(range(min(2, len(result.records)))):
        print("   ...", repr(tok.decode(rec["context_ids"][-8:])), "| desired", repr(tok.decode([rec["desired_id"]])),
              "| undesired", repr(tok.decode([rec["undesired_id"]])))

# Re-running with the same folder resumes (nothing is recomputed here: every problem is done).
print(load_records("/tmp/cca_mine_digit"))
