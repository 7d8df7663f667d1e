"""CCA as the paper runs it, on tiny models: the preset's settings are the declared ones, the update without
a mask changes every weight, the masked update only the mask's slices, the twin other slices of the same
layers, and validation follows the paper's schedule (step 0 not kept)."""

import pytest
import torch

from circuit_peft.arch import get_arch
from circuit_peft.circuit import Circuit
from circuit_peft.cca.presets import PAPER_LRS, cca_preset
from circuit_peft.cca.problems import TASKS, count_problems, make_problems, problem_split
from circuit_peft.cca.update import UpdateConfig, amplify_update
from circuit_peft.errors import CircuitPeftError
from circuit_peft.locate.controls import random_circuit
from circuit_peft.models import tiny_model

CIRCUIT = [("q", 1, 0), ("k", 1, 1), ("v", 2, 1), ("mlp", 1, 3), ("mlp", 2, 7)]


def _records(n=8, vocab=128):
    g = torch.Generator().manual_seed(0)
    return [{"context_ids": torch.randint(3, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist(),
             "desired_id": 5 + i % 7, "undesired_id": 40 + i % 5, "problem_id": f"p{i}"} for i in range(n)]


def test_paper_preset_holds_the_declared_settings():
    p = cca_preset("paper")
    m, u, a = p.mining, p.update, p.amplify
    assert (m.method, m.pivot, m.n_samples, m.temperature_if_right, m.temperature_if_wrong) == \
        ("branching", "token", 10, 1.2, 0.8)
    assert cca_preset("paper", method="prefix").mining.method == "prefix"
    assert (a.locate, a.circuit_fraction, a.dcm_lambda, a.dcm_epochs, a.dcm_steps, a.dcm_lr) == \
        ("dcm", None, 0.01, 50, None, 5e-3)
    assert (u.optimizer, u.lr, u.loss, u.steps, u.eval_every, u.eval_also) == ("sgd", 1e-4, "logit_diff", 50, 5, (2, 4, 6, 8))
    assert (u.keep_best, u.keep_start, u.patience, u.projections, u.target) == (True, False, None, "paper", "circuit")
    assert PAPER_LRS == (1e-4, 1e-3) and cca_preset("paper", lr=1e-3).update.lr == 1e-3
    assert cca_preset("paper", target="all_weights").update.target == "all_weights"
    with pytest.raises(CircuitPeftError, match="preset must be one of"):
        cca_preset("fast")
    with pytest.raises(CircuitPeftError, match="target must be one of"):
        UpdateConfig.paper(target="everything")


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_no_mask_arm_updates_every_weight_the_mask_arm_only_its_slices():
    model = tiny_model("llama")
    circuit = Circuit(CIRCUIT, fingerprint=get_arch(model).fingerprint())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = amplify_update(model, _records(), circuit, config=UpdateConfig.paper(lr=1e-2, target="all_weights", steps=2),
                       progress=False)
    assert r.model is model and r.config is None and r.size["param_fraction"] == 1.0
    assert _changed(before, model) == set(before)  # every parameter: embeddings, norms, attention, MLP
    assert r.final_margin > r.initial_margin

    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = amplify_update(model, _records(), circuit, config=UpdateConfig.paper(lr=1e-2, steps=2), progress=False)
    merged = r.model.merge_and_unload()
    changed = _changed(before, merged)
    layers = {f"model.layers.{c[1]}." for c in CIRCUIT}
    assert changed and all(any(n.startswith(l) for l in layers) for n in changed)
    assert all(n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "up_proj") for n in changed)  # projections="paper"
    w = merged.model.layers[1].self_attn.q_proj.weight
    d = get_arch(merged).dims.head_dim
    delta = (w - before["model.layers.1.self_attn.q_proj.weight"]).abs().sum(1) > 0
    assert delta[:d].any() and not delta[d:].any()  # query head 0 of layer 1 only


def test_twin_arm_trains_the_layer_matched_random_twin():
    model = tiny_model("llama")
    circuit = Circuit(CIRCUIT, fingerprint=get_arch(model).fingerprint())
    r = amplify_update(model, _records(), circuit, config=UpdateConfig.paper(lr=1e-2, steps=1, target="twin"),
                       progress=False)
    twin = random_circuit(circuit, "layer", seed=0)
    assert sorted(r.config.component_list()) == sorted(twin.components)
    assert sorted((c.kind, c.layer) for c in twin.components) == sorted((k, l) for k, l, _ in CIRCUIT)
    assert r.size["components"] == len(CIRCUIT)
    from circuit_peft.tuner import CircuitConfig
    with pytest.raises(CircuitPeftError, match="random twin of a located Circuit"):
        amplify_update(tiny_model("llama"), _records(), CircuitConfig.from_components(CIRCUIT),
                       config=UpdateConfig.paper(target="twin"), progress=False)


def test_paper_schedule_validates_early_and_never_keeps_step_0():
    model = tiny_model("llama")
    circuit = Circuit(CIRCUIT, fingerprint=get_arch(model).fingerprint())
    seen = []

    def validate(m):  # the unchanged model scores best: the paper's code still keeps a trained step
        seen.append(len(seen))
        return 1.0 if len(seen) == 1 else 0.5 - 0.01 * len(seen)

    r = amplify_update(model, _records(), circuit, validate, UpdateConfig.paper(lr=1e-3, steps=12), progress=False)
    assert [h["step"] for h in r.history if "val" in h] == [0, 2, 4, 5, 6, 8, 10, 12]
    assert r.best_step == 2 and r.best_val == pytest.approx(0.48)
    ours = amplify_update(tiny_model("llama"), _records(), circuit, lambda m: 1.0, steps=4, eval_every=2, lr=1e-3,
                          progress=False)
    assert ours.best_step == 0  # the library's default keeps the unchanged model when nothing beats it


def test_comparison_family_splits_by_unordered_pair_and_keeps_old_problems():
    kinds = TASKS["comparison"]["kinds"] + TASKS["comparison"]["transfer_kinds"]
    assert problem_split("max", 47, 38) == problem_split("min", 38, 47) == problem_split("max", 38, 47)
    test = make_problems(40, "test", seed=3, kinds=kinds)
    train = make_problems(400, "train", seed=3, kinds=kinds)
    pairs = lambda rows: {(min(r["a"], r["b"]), max(r["a"], r["b"])) for r in rows}
    assert not pairs(test) & pairs(train) and all(r["a"] != r["b"] for r in test + train)
    for r in test:
        gold = max(r["a"], r["b"]) if r["op"] == "max" else min(r["a"], r["b"])
        assert r["answer"].endswith(f"#### {gold}")
    assert count_problems("test", TASKS["comparison"]["kinds"]) > 3000
    old = [r["question"] for r in make_problems(4, "train", seed=0)]  # the arithmetic family draws as before
    assert old == ["What is 63 + 55?", "What is 96 - 20?",
                   "A box holds 25 cards. Ivan puts in 67 more cards. How many cards are in the box?",
                   "A box holds 81 pencils. Ali takes out 55 pencils. How many pencils are left in the box?"]


@pytest.mark.parametrize("argv", [["--preset", "paper", "--lr", "1e-3"], ["--lr", "1e-3", "--preset", "paper"]])
def test_amplify_cli_preset_sets_the_paper_flags_and_keeps_the_ones_given(argv):
    from circuit_peft.cca.presets import cca_preset
    from circuit_peft.cli import build_parser
    from circuit_peft.commands.amplify import build_configs, mining_config

    args = build_parser().parse_args(["amplify", "--problems", "arithmetic", "--out", "x", *argv,
                                      "--target", "all_weights", "--side-effect-data", "none"])
    update, config = build_configs(args)
    paper = cca_preset("paper", lr=1e-3, target="all_weights")
    assert update == paper.update
    assert (config.locate, config.circuit_fraction, config.dcm_lambda, config.dcm_epochs, config.dcm_lr) == \
        ("dcm", None, 0.01, 50, 5e-3)
    m = mining_config(args)
    assert (m.method, m.pivot, m.n_samples, m.temperature_if_right, m.temperature_if_wrong) == \
        ("branching", "token", 10, 1.2, 0.8)
    plain, _ = build_configs(build_parser().parse_args(["amplify", "--problems", "arithmetic", "--out", "x"]))
    assert (plain.steps, plain.eval_also, plain.keep_start, plain.target) == (100, (), True, "circuit")


def test_kept_step_rule_is_stated_in_the_result():
    from circuit_peft.cca.update import kept_step_rule

    circuit = [("q", 1, 0), ("mlp", 2, 7)]
    from circuit_peft.tuner import CircuitConfig
    r = amplify_update(tiny_model("llama"), _records(), CircuitConfig.from_components(circuit), steps=2, lr=1e-3,
                       progress=False)
    assert r.kept == "last step (no validation)" and r.best_step == 2  # what train --update cca gets
    assert kept_step_rule(lambda m: 0.0, UpdateConfig.paper()) == "best validated step after step 0"
    assert kept_step_rule(lambda m: 0.0, UpdateConfig()) == "best validated step"


def test_branching_pivot_where_the_greedy_trace_ended_and_the_sample_went_on():
    """The greedy trace stops (EOS) where the flipping sample continues: the alternative token is EOS (this
    raised IndexError in mining and in benchmarks/regime.py before)."""
    from circuit_peft.cca.mining import Miner, MiningConfig, Problem
    from circuit_peft.evaluate.answers import NumberAnswer

    class Tok:
        eos_token_id = 2

    miner = Miner(None, Tok(), MiningConfig(max_new_tokens=8), NumberAnswer())
    miner.greedy = lambda prompts, n: [[9] for _ in prompts]
    miner.correct = lambda trace, gold: 7 in trace
    p = Problem("p", "1", [1, 1], greedy=[5], greedy_correct=False, flip=[5, 7])
    miner.pivot(p, "branching")
    assert [(r["context_ids"], r["desired_id"], r["undesired_id"]) for r in p.records] == [([1, 1, 5], 7, 2)]


def test_amplify_cli_takes_held_out_problems_of_every_generated_task():
    from circuit_peft.cli import build_parser
    from circuit_peft.commands.amplify import heldout_rows

    args = build_parser().parse_args(["amplify", "--problems", "comparison", "--out", "x", "--n-val", "4", "--n-test", "6"])
    val, test = heldout_rows(args)
    assert len(val) == 4 and len(test) == 6 and all(r["id"].startswith("test-") for r in val + test)
    assert {r["op"] for r in val + test} <= {"max", "min"}


@pytest.mark.slow
def test_full_weight_training_is_float32_and_refuses_4bit(tmp_path, capsys):
    """--target all_weights and the compare full arm train float32 weights whatever --dtype says (bf16 weights
    round most 1e-4..1e-5 updates away) and refuse --load-in-4bit before any work."""
    from types import SimpleNamespace

    from circuit_peft.cli import build_parser, main
    from circuit_peft.commands.amplify import build_configs
    from circuit_peft.compare.arms import ARM_KINDS, ArmContext, parse_arms
    from circuit_peft.models import LoadSpec, load_model, load_tokenizer

    assert LoadSpec(dtype="bfloat16").for_full_training("x").dtype == "float32"
    with pytest.raises(CircuitPeftError, match="--load-in-4bit"):
        LoadSpec(load_in_4bit=True).for_full_training("x")
    amp = ["amplify", "--problems", "arithmetic", "--out", str(tmp_path / "a"), "--target", "all_weights"]
    _, config = build_configs(build_parser().parse_args([*amp, "--dtype", "bfloat16"]))
    assert config.load.dtype == "float32"
    with pytest.raises(CircuitPeftError, match="--load-in-4bit"):
        build_configs(build_parser().parse_args([*amp, "--load-in-4bit"]))
    out = tmp_path / "c"
    assert main(["compare", "--arms", "base,lora,full", "--load-in-4bit", "--out", str(out)]) == 2
    assert "--load-in-4bit" in capsys.readouterr().err and not out.exists()

    model = tiny_model("llama").to(torch.bfloat16)  # all_weights on a bf16 model given loaded: cast, then trained
    amplify_update(model, _records(), None, config=UpdateConfig.paper(target="all_weights", steps=1), progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    tok = load_tokenizer("smollm2")
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "m")
    ctx = ArmContext(str(tmp_path / "m"), tok, "plain", [], SimpleNamespace(load=LoadSpec(dtype="bfloat16")),
                     lambda _: None, 1, tmp_path, lambda: load_model(str(tmp_path / "m"), dtype=torch.bfloat16))
    full = parse_arms("full", "gradient", ("gradient",))[0]
    built, _ = ARM_KINDS["full"].build(full, ctx)
    assert {p.dtype for p in built.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.slow
def test_amplify_all_weights_writes_a_float32_model_folder_not_an_adapter(tmp_path):
    """--target all_weights saves the whole updated model as OUT/model (load_model reads it back, in float32)
    and names it so in the report; mining resumes from records already in OUT/mining."""
    import json
    from dataclasses import asdict

    from circuit_peft.cca.mining import MiningConfig
    from circuit_peft.cca.pipeline import AmplifyConfig, amplify
    from circuit_peft.models import LoadSpec, load_model, load_tokenizer

    tok = load_tokenizer("smollm2")
    folder = tmp_path / "base"
    tiny_model("llama", vocab_size=len(tok)).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    mining = MiningConfig(max_new_tokens=2, n_samples=1, batch_size=8)
    out = tmp_path / "out"
    (out / "mining").mkdir(parents=True)
    (out / "mining" / "mining_config.json").write_text(json.dumps(asdict(mining)))
    (out / "mining" / "progress.jsonl").write_text("".join(json.dumps(
        {"problem_id": f"p{i}", "status": "mined", "greedy_correct": False, "n_records": 1}) + "\n" for i in range(8)))
    (out / "mining" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    result = amplify(str(folder), tok, rows, rows[:2], rows[2:4], out, mining,
                     UpdateConfig.paper(target="all_weights", steps=1),
                     AmplifyConfig(eval_max_new_tokens=2, load=LoadSpec(dtype="bfloat16")), progress=False,
                     log=lambda _: None)
    files = result.report["files"]
    assert "adapter" not in files and files["model"] == str(out / "model") and not (out / "adapter").exists()
    assert {p.dtype for p in load_model(files["model"]).parameters()} == {torch.float32}
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "float32"
