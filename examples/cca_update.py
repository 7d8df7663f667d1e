"""The amplification update on a tiny model: train only a circuit on contrastive records (bounded
loss, Adam), keep the best validation step, compare with the no-mask ablation, and measure the
speed-up of caching the frozen lower layers."""

import torch

from circuit_peft import tiny_model
from circuit_peft.cca import amplify_update, margin_validator, measure_update_speedup
from circuit_peft.tuner import CircuitConfig

torch.manual_seed(0)
records = [{"context_ids": torch.randint(3, 128, (8,)).tolist(), "desired_id": 5 + i % 3, "undesired_id": 40,
            "problem_id": str(i)} for i in range(16)]
circuit = CircuitConfig.from_components([("q", 2, 0), ("v", 2, 1), ("mlp", 2, 5)], projections="paper")

result = amplify_update(tiny_model("llama"), records[:12], circuit, validate=margin_validator(records[12:]),
                        steps=20, lr=1e-2, optimizer="adam", loss="logsigmoid", eval_every=5, progress=False)
print(f"margin {result.initial_margin:.3f} -> {result.final_margin:.3f}, best step {result.best_step}, "
      f"{result.size['components']} components = {100 * result.size['component_fraction']:.1f} % "
      f"({100 * result.size['param_fraction']:.1f} % of parameters)")
nomask = amplify_update(tiny_model("llama"), records[:12], circuit, mask=False, steps=20, lr=1e-2, optimizer="adam",
                        loss="logsigmoid", progress=False)
print(f"without mask: margin -> {nomask.final_margin:.3f} training {100 * nomask.size['param_fraction']:.1f} % of parameters")
print(measure_update_speedup(tiny_model("llama", n_layers=8), records, circuit, steps=3))
