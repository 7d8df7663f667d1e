"""Build a CircuitConfig from a list of components and measure it (CircuitConfig.from_components,
component_list, circuit_size)."""

from circuit_peft import CircuitConfig, Component, circuit_size, load_model

model = load_model("smollm2")  # 30 layers x (9 query + 3 key + 3 value heads + 1536 neurons)
components = [Component("q", 20, 4), ("k", 20, 1), ("v", 20, 1)] + [("mlp", 25, i) for i in range(0, 1536, 64)]
config = CircuitConfig.from_components(components, projections="paper")
print("components (kind -> {layer: indices}):", config.components)
print("first three as Component tuples:", config.component_list()[:3])
for key, value in circuit_size(config, model).items():
    print(f"{key:>20}: {value:.6g}" if isinstance(value, float) else f"{key:>20}: {value:,}")
