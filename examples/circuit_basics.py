"""The Circuit object: select, summarise, save/load (checked against the model), plot, and turn into a
CircuitConfig adapter that trains only those heads and neurons."""

from peft import get_peft_model

from circuit_peft import load_model
from circuit_peft.arch import get_arch
from circuit_peft.circuit import Circuit

model = load_model("smollm2")
arch = get_arch(model)
# Any scores work; here a made-up ranking of every query head and a few neurons.
scores = {c: float((c.layer * 7 + c.index * 3) % 11) for c in arch.all_components(("q",))}
scores.update({("mlp", 10, i): 5.0 + i for i in range(4)})
circuit = Circuit.from_scores(model, scores, method="example")

top = circuit.top(fraction=0.05)            # also: top(k=10), top(z=1.5), top(k=3, kinds=["q"])
print(top.summary())
path = top.save("/tmp/example_circuit.json")
again = Circuit.load(path, model=model)      # ValueError if the model differs (names the field)
print("round trip ok:", again.components == top.components)
print("picture:", top.plot("/tmp/example_circuit.png"))

config = top.to_config(projections="paper")  # q/k/v rows and up_proj rows only
peft_model = get_peft_model(model, config)
peft_model.print_trainable_parameters()
