"""The built-in arithmetic problem family: seeded, GSM8K-style gold answers, train/held-out disjoint."""

from circuit_peft.cca import demo_problems, make_problems, problem_split

train = make_problems(200, "train", seed=0)
test = make_problems(200, "test", seed=0)
print(train[0])
print(test[2]["question"], "->", test[2]["answer"].split("#### ")[-1])
overlap = {(r["op"], r["a"], r["b"]) for r in train} & {(r["op"], r["a"], r["b"]) for r in test}
print("shared (op, a, b) between splits:", len(overlap), "| split of 47 + 38:", problem_split("+", 47, 38))
print("shipped demo set:", {s: len(demo_problems(s)) for s in ("train", "val", "test")})
