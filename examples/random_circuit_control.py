"""The control every circuit claim needs: a random circuit with the same kinds and counts, in the same
layers (match="layer") or anywhere (match="anywhere"). Train both the same way and compare
(benchmarks/recipes.py does this over seeds, with standard errors)."""

from circuit_peft import Circuit, tiny_model
from circuit_peft.research import random_circuit
from circuit_peft.arch import get_arch

model = tiny_model("llama")
located = Circuit([("q", 1, 2), ("v", 0, 1), ("mlp", 2, 7), ("mlp", 2, 9)], fingerprint=get_arch(model).fingerprint())
for match in ("layer", "anywhere"):
    control = random_circuit(located, match, seed=0)
    print(match, control.components)
config = random_circuit(located, "layer", seed=0).to_config(projections="paper")  # train it like the located one
