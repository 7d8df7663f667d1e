"""DCM (CCA stage 2) on SmolLM2: learn one mask per query/key/value head and MLP neuron so that the
model prefers the desired token at the last context position, with an L1 penalty; kept = mask >= 0.5.

A few hand-made records and 6 steps keep this quick, so the learning rate is raised from the default
5e-3 (Adam moves a mask by about lr per step; from m = 1 to below 0.5 takes ~100 steps at 5e-3).
Real records come from pivotal-token mining (`circuit_peft.cca`); the defaults run up to 50 epochs."""

import torch

from circuit_peft import load_model, load_tokenizer
from circuit_peft.taskdata.prompts import build_prompt_ids
from circuit_peft.locate import learn_masks

torch.set_num_threads(2)
model, tok = load_model("smollm2"), load_tokenizer("smollm2")


def record(a: int, b: int, wrong: int) -> dict:
    ctx = build_prompt_ids(tok, f"What is {a} + {b}?") + tok(f"{a} + {b} = ", add_special_tokens=False)["input_ids"]
    first = lambda s: tok(s, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    return {"context_ids": ctx, "desired_id": first(str(a + b)[0]), "undesired_id": first(str(wrong)),
            "problem_id": f"{a}+{b}"}


records = [record(23, 45, 5), record(31, 27, 4), record(52, 16, 5), record(14, 73, 9)]
circuit = learn_masks(model, records, epochs=6, lr=0.1, batch_size=4)
print(circuit.summary().splitlines()[0])
print("history:", [(h["epoch"], round(h["loss"], 2), h["kept"]) for h in circuit.meta["history"]])
circuit.save("/tmp/smollm2_dcm_circuit.json")
