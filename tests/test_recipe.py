"""The training recipe (issue 9/10): random-circuit controls, the gradient locator (checked against a
direct per-slice gradient), answer spans, settings validation and the resumable run folder."""

import json
from collections import Counter

import pytest
import torch

from circuit_peft.arch import get_arch
from circuit_peft.circuit import Circuit
from circuit_peft.locate import gradient_scan, random_circuit
from circuit_peft.models import tiny_model
from circuit_peft.recipe import RunFolder, SFTSettings, TrainConfig, answer_spans
from circuit_peft.recipe.sft import pivotal_dataset


def _located(model):
    arch = get_arch(model)
    comps = [("q", 0, 1), ("q", 2, 3), ("k", 1, 0), ("v", 2, 1)] + [("mlp", 1, i) for i in (3, 7, 9)]
    return Circuit(comps, fingerprint=arch.fingerprint(), method="test")


def test_layer_matched_random_circuit_keeps_kinds_and_layers():
    located = _located(tiny_model("llama"))
    rand = random_circuit(located, "layer", seed=3)
    assert Counter((c.kind, c.layer) for c in rand) == Counter((c.kind, c.layer) for c in located)
    assert rand.components == random_circuit(located, "layer", seed=3).components
    assert rand.components != random_circuit(located, "layer", seed=4).components


def test_random_anywhere_circuit_keeps_kind_counts_only():
    located = _located(tiny_model("llama"))
    rand = random_circuit(located, "anywhere", seed=0)
    assert Counter(c.kind for c in rand) == Counter(c.kind for c in located)
    arch_counts = {"q": 4, "k": 2, "v": 2, "mlp": 96}
    assert all(0 <= c.index < arch_counts[c.kind] and 0 <= c.layer < 3 for c in rand)
    with pytest.raises(ValueError, match="match must be one of"):
        random_circuit(located, "nearby")


def _dataset(vocab=128):
    torch.manual_seed(0)
    rows = []
    for n in (7, 9, 6):
        ids = torch.randint(3, vocab - 1, (n,)).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * 3 + [1] * (n - 3),
                     "token_weights": [1.0] * (n - 1) + [5.0], "undesired_ids": [-100] * n,
                     "labels": [-100] * 3 + ids[3:]})
    return rows


def test_gradient_scan_matches_direct_slice_gradients_and_restores_the_model():
    from circuit_peft.taskdata import PivotalCollator, pivotal_weighted_loss

    model = tiny_model("llama")
    rows = _dataset()
    circuit = gradient_scan(model, rows, keep_fraction=None, batch_size=8, progress=False)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    # reference: one backward of the same loss, then the norm of each component's rows
    batch = PivotalCollator(None, 0)(rows)
    loss = pivotal_weighted_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 batch["labels"], batch["token_weights"])
    loss.backward()
    layer = model.model.layers[1]
    q_ref = layer.self_attn.q_proj.weight.grad[16:32].norm().item()  # query head 1 (head_dim 16)
    mlp_ref = layer.mlp.up_proj.weight.grad[5].norm().item()  # neuron 5 ("paper": up_proj rows)
    assert circuit.scores[("q", 1, 1)] == pytest.approx(q_ref, rel=1e-5)
    assert circuit.scores[("mlp", 1, 5)] == pytest.approx(mlp_ref, rel=1e-5)
    kept = gradient_scan(model, rows, keep_fraction=0.25, progress=False)
    assert Counter(c.kind for c in kept)["q"] == 3  # 25 % of 12 query heads, kinds ranked separately


def test_gradient_contrast_divides_the_task_norm_by_the_general_text_norm():
    from circuit_peft.locate import general_text_rows

    model = tiny_model("llama")
    rows = _dataset()
    torch.manual_seed(1)
    reference = general_text_rows(torch.randint(3, 127, (4, 10)).tolist())
    task = gradient_scan(model, rows, keep_fraction=None, progress=False)
    general = gradient_scan(model, reference, keep_fraction=None, progress=False)
    contrast = gradient_scan(model, rows, keep_fraction=None, progress=False, reference=reference)
    assert contrast.method == "gradient_contrast" and task.method == "gradient"
    for c in [("q", 1, 1), ("k", 0, 1), ("mlp", 2, 40)]:
        assert contrast.scores[c] == pytest.approx(task.scores[c] / general.scores[c], rel=1e-5)
    # the ranking changes: the contrast keeps what the task moves more than general text does
    assert contrast.top_each_kind(0.25).components != task.top_each_kind(0.25).components
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="reference is empty"):
        gradient_scan(model, rows, reference=[], progress=False)


@pytest.mark.slow
def test_ablation_locator_scans_the_sft_rows_query_heads_only():
    """locate='ablation': the exact head-ablation scan of the prompt + gold-solution tokens SFT trains on
    (checked against the naive one-forward-per-head scan of the same rows)."""
    from circuit_peft.cca.problems import make_problems
    from circuit_peft.locate import head_ablation_scan
    from circuit_peft.models import load_tokenizer
    from circuit_peft.recipe.pipeline import locate_for_training
    from circuit_peft.recipe.sft import gold_examples

    tok = load_tokenizer("smollm2")
    model = tiny_model("llama", vocab_size=len(tok))
    rows = make_problems(3, "train", seed=0)
    cfg = TrainConfig(locate="ablation")
    circuit = locate_for_training(model, tok, rows, "fewshot", cfg, "unused", keep_fraction=None, progress=False)
    assert circuit.method == "ablation" and {c.kind for c in circuit.scores} == {"q"} and len(circuit.scores) == 12
    data = pivotal_dataset(tok, gold_examples(tok, rows, "fewshot", cfg.shots), 5.0, "fewshot")
    starts = [r["labels"].count(-100) for r in data]  # the prompt's tokens carry no label
    probe = [{"prompt_ids": r["input_ids"][:n], "solution_ids": r["input_ids"][n:]} for r, n in zip(data, starts)]
    naive = head_ablation_scan(model, None, probe, naive=True, keep_fraction=None, progress=False)
    assert max(abs(s) for s in naive.scores.values()) > 5e-5  # heads matter, so a wrong probe would show
    assert circuit.scores == pytest.approx(naive.scores, abs=1e-6)
    kept = locate_for_training(model, tok, rows, "fewshot", cfg, "unused", keep_fraction=0.25, progress=False)
    assert len(kept.components) == 3


def test_answer_spans_find_whole_numbers_only():
    text = "47 + 38 = 85\nThe answer is 85."
    assert answer_spans(text, "85") == [[10, 12], [27, 29]]
    assert answer_spans("185 and 85.5", "85") == []


@pytest.mark.slow
def test_pivotal_dataset_weights_the_answer_tokens():
    from circuit_peft.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    ex = {"prompt": "What is 2 + 3?\n", "completion": "2 + 3 = 5\nThe answer is 5.", "pivotal_spans": [[8, 9], [24, 25]]}
    row = pivotal_dataset(tok, [ex], 5.0, "fewshot")[0]
    heavy = [tok.decode([t]) for t, w in zip(row["input_ids"], row["token_weights"]) if w == 5.0]
    assert heavy == ["5", "5"]


@pytest.mark.parametrize("bad, match", [
    (dict(locate="dcm"), "locate must be one of"), (dict(circuit_fraction=0.0), "circuit_fraction"),
    (dict(select="best"), "select must be one of"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(lora_rank=-1), "lora_rank"), (dict(locate="gradient_contrast"), "--side-effects-data"),
    (dict(controls=("random_layer", "lora32")), r"controls: unknown \['lora32'\]"),
    (dict(controls=("lora",), update="cca"), "update='sft'"),
    (dict(learning_rates=(1e-3, 0.0)), "learning_rates"), (dict(learning_rates=(1e-3, 1e-3)), "learning_rates"),
    (dict(learning_rates=(1e-3,), update="cca"), "--lrs"), (dict(validation_fraction=1.0), "validation_fraction"),
])
def test_train_config_refuses_bad_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_paired_gap_is_the_mean_and_standard_error_of_per_problem_differences():
    from circuit_peft.recipe import paired_gap

    gap, se = paired_gap([1, 1, 0, 1], [0, 1, 0, 0])  # differences 1, 0, 0, 1
    assert gap == pytest.approx(0.5) and se == pytest.approx((1 / 3) ** 0.5 / 2)
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_gap([1, 0], [1])


def test_matched_lora_rank_matches_the_parameters_of_a_real_lora():
    from peft import LoraConfig, get_peft_model

    from circuit_peft.recipe import matched_lora_rank

    model = tiny_model("llama")
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=3, target_modules="all-linear"))
    params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert matched_lora_rank(model, params) == 3 and matched_lora_rank(model, params * 1.1) == 3
    assert matched_lora_rank(model, 1) == 1


def test_control_models_train_what_they_say():
    from peft import get_peft_model

    from circuit_peft.recipe import control_model
    from circuit_peft.tuner import circuit_size

    located = _located(tiny_model("llama"))
    to_config = lambda c: c.to_config(projections="paper")  # noqa: E731
    twin, size = control_model("random_layer", tiny_model("llama"), located, to_config, seed=0)
    assert size["trainable_params"] == sum(p.numel() for p in twin.parameters() if p.requires_grad)
    own = get_peft_model(tiny_model("llama"), to_config(located))
    assert size["trainable_params"] == circuit_size(to_config(located), own)["trainable_params"]
    assert twin.peft_config["default"].components != to_config(located).components
    lora, lora_size = control_model("lora", tiny_model("llama"), located, to_config, seed=0)
    assert lora_size["lora_rank"] == 16 and lora.peft_config["default"].peft_type.value == "LORA"
    from circuit_peft.prefix import has_active_dropout as _has_active_dropout  # no dropout: the pivotal trainer shares the prefix

    assert lora_size["lora_dropout"] == 0.0 and not _has_active_dropout(lora.train())
    dropped, _ = control_model("lora", tiny_model("llama"), located, to_config, seed=0, lora_dropout=0.1)
    assert dropped.peft_config["default"].lora_dropout == 0.1 and _has_active_dropout(dropped.train())
    with pytest.raises(ValueError, match="unknown control"):
        control_model("full", tiny_model("llama"), located, to_config, seed=0)


def test_lora_control_initialisation_follows_its_seed_not_the_process_history():
    from circuit_peft.recipe import control_model

    located = _located(tiny_model("llama"))
    to_config = lambda c: c.to_config(projections="paper")  # noqa: E731

    def lora_a(seed: int) -> tuple[torch.Tensor, bool]:
        base = tiny_model("llama")
        before = torch.random.get_rng_state()
        model, _ = control_model("lora", base, located, to_config, seed=seed)
        untouched = torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is left alone
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n]), untouched

    first, untouched = lora_a(0)
    torch.rand(1000)  # other work in the same process between two arms
    again, _ = lora_a(0)
    assert untouched and torch.equal(again, first)
    assert not torch.equal(lora_a(1)[0], first)


@pytest.mark.parametrize("bad, match", [(dict(learning_rate=0), "learning_rate"), (dict(batch_size=1.5), "batch_size"),
                                        (dict(pivotal_weight=-1), "pivotal_weight")])
def test_sft_settings_refuse_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        SFTSettings(**bad)


def test_validation_split_is_seeded_disjoint_and_refuses_an_empty_side():
    from circuit_peft.recipe import validation_split

    rows = [{"question": str(i), "answer": str(i)} for i in range(10)]
    fit, val = validation_split(rows, 0.2, seed=3)
    assert len(val) == 2 and len(fit) == 8
    assert sorted(r["question"] for r in fit + val) == sorted(r["question"] for r in rows)
    assert validation_split(rows, 0.2, seed=3) == (fit, val) and validation_split(rows, 0.2, seed=4)[1] != val
    with pytest.raises(ValueError, match="--validation-fraction"):
        validation_split(rows[:2], 0.2, seed=0)


def test_choose_rate_breaks_accuracy_ties_by_validation_loss_then_grid_order():
    from circuit_peft.recipe.rates import choose_rate

    rates = [3e-4, 1e-3, 3e-3]
    acc = {3e-4: 0.5, 1e-3: 0.5, 3e-3: 0.4}
    assert choose_rate(rates, acc) == 3e-4  # no losses: the first of the tied rates
    assert choose_rate(rates, acc, {3e-4: 0.9, 1e-3: 0.7, 3e-3: 0.1}) == 1e-3  # the tie goes to the lower loss
    assert choose_rate(rates, acc, {1e-3: 0.7}) == 1e-3  # a rate without a loss loses the tie
    assert choose_rate(rates, {3e-4: 0.4, 1e-3: 0.5, 3e-3: 0.6}, {3e-3: 9.0}) == 3e-3  # accuracy decides first
    assert choose_rate(rates, acc, {3e-4: 0.7, 1e-3: 0.7}) == 3e-4  # equal losses too: grid order


def test_fit_on_grid_keeps_the_best_rate_each_trained_from_the_same_start(tmp_path):
    """Each rate starts from the initial adapter (not from the previous rate's weights), the best
    validation score wins (ties: the lower validation loss), and the model ends holding that rate's
    weights."""
    from peft import get_peft_model, get_peft_model_state_dict

    from circuit_peft.recipe import fit_on_grid

    def build():
        torch.manual_seed(0)
        return get_peft_model(tiny_model("llama"), _located(tiny_model("llama")).to_config(projections="paper"))

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))

    def train_at(model, lr):  # three plain SGD steps on the LM loss
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        for _ in range(3):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()

    def state(model):
        return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}

    scores = {0.1: 0.2, 0.3: 0.5, 1.0: 0.5}  # a tie: the lower validation loss (1.0's) breaks it
    losses = {0.1: 0.1, 0.3: 2.0, 1.0: 1.0}
    run = RunFolder(tmp_path / "run", {"model": "tiny"})
    run.open()
    model = build()
    measured = []

    def measure(m):
        measured.append(state(m))
        return scores[list(scores)[len(measured) - 1]]

    def loss(m):
        return losses[list(losses)[len(measured) - 1]]

    choice = fit_on_grid(run, "train", model, train_at, measure, list(scores), print, tie_break=loss)
    assert choice.lr == 1.0 and choice.validation_accuracy == {"0.1": 0.2, "0.3": 0.5, "1": 0.5}
    assert choice.validation_loss == {"0.1": 0.1, "0.3": 2.0, "1": 1.0}
    alone = build()
    train_at(alone, 1.0)  # the same rate trained from a fresh start
    for k, v in state(alone).items():
        assert torch.equal(state(model)[k], v) and torch.equal(measured[2][k], v)
    assert any(not torch.equal(measured[0][k], measured[1][k]) for k in measured[0])
    assert sorted(p.name for p in (tmp_path / "run" / "stages").glob("train_lr*.safetensors")) == [
        "train_lr0.1.safetensors", "train_lr0.3.safetensors", "train_lr1.safetensors"]
    again = build()  # a re-run reuses every finished rate and loads the chosen weights
    rerun = fit_on_grid(run, "train", again, lambda m, lr: pytest.fail("retrained"), lambda m: 0.0, list(scores), print,
                        tie_break=lambda m: pytest.fail("re-measured"))
    assert rerun.lr == 1.0 and all(torch.equal(state(again)[k], v) for k, v in state(alone).items())


def test_run_folder_refuses_other_settings_and_foreign_folders(tmp_path):
    run = RunFolder(tmp_path / "run", {"model": "m", "config": {"lr": 1}})
    run.open()
    calls = []
    assert run.stage("locate", lambda: calls.append(1) or {"n": 3}, print)["n"] == 3
    assert run.stage("locate", lambda: calls.append(1) or {"n": 4}, print)["n"] == 3  # reused, not rerun
    assert calls == [1]
    RunFolder(tmp_path / "run", {"model": "m", "config": {"lr": 1}}).open()  # same settings: fine
    with pytest.raises(ValueError, match="config.lr"):
        RunFolder(tmp_path / "run", {"model": "m", "config": {"lr": 2}}).open()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        RunFolder(tmp_path / "other", {"model": "m"}).open()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        RunFolder(tmp_path / "file", {"model": "m"}).open()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["config"] == {"lr": 1}


@pytest.mark.parametrize("components, match", [
    ({"q": {"1": [1.7]}}, "non-integer indices"), ({"q": {"1": "12"}}, "list of integer indices"),
    ({"q": {"1": [True]}}, "non-integer indices"), ({"q": {1.5: [0]}}, "non-integer layer key"),
])
def test_circuit_config_refuses_non_integer_components(components, match):
    from circuit_peft import CircuitConfig

    with pytest.raises(ValueError, match=match):
        CircuitConfig(components=components)


def test_cli_turns_a_missing_model_into_one_line(tmp_path, capsys):
    from circuit_peft.cli import main

    assert main(["info", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuit-peft info: error:") and len(err.strip().splitlines()) == 1


def test_outputs_are_checked_before_any_work(tmp_path, capsys):
    from circuit_peft.cli import main

    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n' * 4)
    assert main(["select", "--data", str(pool), "--out", str(pool), "--fraction", "0.5", "--method", "random"]) == 2
    assert "also an input" in capsys.readouterr().err
    assert pool.read_text().count("\n") == 4  # the pool is untouched
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["locate", "--model", "tiny-llama", "--data", str(pool), "--method", "ablation",
                 "--prompt-field", "question", "--solution-field", "answer", "--out", str(blocker / "c.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_run_folder_lock_refuses_a_live_writer_and_takes_over_a_dead_one(tmp_path):
    import os

    run = RunFolder(tmp_path / "run", {"model": "m"})
    run.open()
    (tmp_path / "run" / "lock").write_text(str(os.getppid()))  # a live process that is not us
    with pytest.raises(ValueError, match="in use by process"):
        RunFolder(tmp_path / "run", {"model": "m"}).open()
    (tmp_path / "run" / "lock").write_text("999999999")  # no such process: a killed run's lock
    again = RunFolder(tmp_path / "run", {"model": "m"})
    again.open()
    assert (tmp_path / "run" / "lock").read_text() == str(os.getpid())
    again.close()
    assert not (tmp_path / "run" / "lock").exists()


def test_one_rule_keeps_a_fraction_everywhere():
    from circuit_peft.fractions import keep_count
    from circuit_peft.select.heads import top_heads
    from circuit_peft.select.sampling import subset_size

    assert keep_count(270, 0.05) == 13 and keep_count(10, 0.01) == 1 and keep_count(4, 1.0) == 4
    scores = {(layer, h): float(layer * 9 + h) for layer in range(30) for h in range(9)}
    assert len(top_heads(scores, fraction=0.05)) == 13  # was 14 (ceil) while Circuit.top kept 13
    circuit = Circuit([], {("q", layer, h): s for (layer, h), s in scores.items()})
    assert len(circuit.top(fraction=0.05)) == 13
    assert subset_size(1000, 0.1) == 100 and subset_size(7, 0.5) == 3
    with pytest.raises(ValueError, match="fraction must be in"):
        keep_count(10, 0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "ifd", "circuitseer"])
def test_select_stage_keeps_the_fraction_of_the_pool(method):
    """train's selection stage returns row numbers of the pool (a quarter of it, each once)."""
    from circuit_peft.cca.problems import make_problems
    from circuit_peft.models import load_tokenizer, tiny_model
    from circuit_peft.recipe.stages.select import select_rows as _select

    tok = load_tokenizer("smollm2")
    model = tiny_model("llama", vocab_size=len(tok))
    rows = make_problems(16, "train", seed=0)
    out = _select(model, tok, rows, TrainConfig(select=method, select_fraction=0.25))
    kept = len(out["rows"])  # IFD keeps only rows with IFD <= 1 (few on a random model)
    assert out["method"] == method and kept == len(set(out["rows"])) and (kept == 4 or method == "ifd" and kept >= 1)
    assert all(0 <= i < 16 for i in out["rows"])


@pytest.mark.slow
def test_train_with_the_cca_update_changes_the_circuit_and_resumes(tmp_path):
    """update='cca': digit pivots mined from the base, the CCA update of the located circuit, a saved
    adapter whose weights moved; a re-run reuses every stage. locate='attribution' mines into the same
    folder at the run's cap before the base's cap is raised (chosen on the training rows: no validation
    rows here, never the held-out ones): CCA reads those records with the same settings, also on a re-run."""
    from safetensors.torch import load_file

    from circuit_peft.cca.problems import ARITHMETIC_SHOTS, make_problems
    from circuit_peft.recipe import train

    folder = "smollm2"  # a real model: a random one writes no digits to mine
    cfg = TrainConfig(update="cca", update_steps=3, locate="attribution", max_new_tokens=16, max_cut_share=0.0,
                      max_new_tokens_limit=64, shots=[dict(s) for s in ARITHMETIC_SHOTS])
    rows = make_problems(6, "train", seed=0, kinds=("add",), low=100, high=999)
    held = make_problems(4, "test", seed=0, kinds=("add",), low=100, high=999)
    logs: list[str] = []
    result = train(folder, rows, held, tmp_path / "run", cfg, log=logs.append)
    assert result.report["settings"]["config"]["update"] == "cca"
    before = result.report["before"]
    assert before["max_new_tokens"] > 16 and before["cap_rows"] == 6 and before["count"] == 4  # raised on training rows
    assert json.loads((tmp_path / "run" / "mining" / "mining_config.json").read_text())["max_new_tokens"] == 16
    stage = json.loads((tmp_path / "run" / "stages" / "train.json").read_text())
    assert stage["records"] > 0 and stage["final_margin"] != stage["initial_margin"]
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert any(float(w.abs().max()) > 0 for w in weights.values())
    logs.clear()
    train(folder, rows, held, tmp_path / "run", cfg, log=logs.append)
    assert sum("done earlier" in line for line in logs) >= 4


def test_generated_tasks_draw_what_the_split_holds_and_keep_the_arithmetic_draws():
    from circuit_peft.cca.problems import TASKS, count_problems, make_problems

    # the arithmetic draws every saved benchmark result was made with (same ids as before multiplication existed)
    assert [r["id"] for r in make_problems(4, "train", seed=0)] == [
        "train-add-63-55", "train-sub-96-20", "train-word_add-25-67", "train-word_sub-81-55"]
    mul = make_problems(148, "test", seed=1, kinds=TASKS["multiplication"]["kinds"])
    assert count_problems("test", ("mul",)) == 148 == len({r["id"] for r in mul})
    assert all(2 <= r["a"] <= 9 and r["answer"].endswith(f"#### {r['a'] * r['b']}") for r in mul)
    with pytest.raises(ValueError, match="give only 148 in that split"):
        make_problems(149, "test", kinds=("mul",))
    word = make_problems(2, "test", seed=1, kinds=("mul", "word_mul"))
    assert [r["id"] for r in word] == ["test-mul-5-76", "test-word_mul-9-94"] and "94" in word[1]["question"]


def test_every_command_reads_the_generated_tasks_by_name():
    from circuit_peft.cca.problems import MULTIPLICATION_SHOTS
    from circuit_peft.commands._cca import load_problem_rows, resolve_shots
    from circuit_peft.commands.train import config_from_args, load_examples

    train = load_examples("multiplication", "train", 4, 0)
    assert [r["kind"] for r in train] == ["mul"] * 4  # train: the bare form (word problems are held out)
    mined = load_problem_rows("multiplication", 4, "train")
    assert [r["kind"] for r in mined] == ["mul", "word_mul", "mul", "word_mul"]  # mine/amplify: both forms
    assert resolve_shots(None, "multiplication") == [dict(s) for s in MULTIPLICATION_SHOTS]
    assert resolve_shots(None, "mine.jsonl") is None and resolve_shots("none", "arithmetic") is None
    from circuit_peft.cli import build_parser

    args = build_parser().parse_args(["train", "--data", "multiplication", "--out", "x"])
    assert config_from_args(args).shots == [dict(s) for s in MULTIPLICATION_SHOTS]


@pytest.mark.slow
def test_train_stopped_by_ctrl_c_resumes_without_redoing_finished_stages(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) during the training stage: the same call again reuses locate and
    before, trains, and finishes; the interrupted run's lock does not block it."""
    from circuit_peft.cca.problems import ARITHMETIC_SHOTS, make_problems
    from circuit_peft.models import load_tokenizer
    from circuit_peft.recipe import train
    from circuit_peft.recipe.stages import fit as fit_module

    model_dir = tmp_path / "model"  # a tiny model with SmolLM2's tokenizer: the pipeline's cost, not the model's
    tiny_model("llama", vocab_size=49152).save_pretrained(model_dir)
    load_tokenizer("smollm2").save_pretrained(model_dir)
    cfg = TrainConfig(max_new_tokens=8, max_cut_share=1.0, shots=[dict(s) for s in ARITHMETIC_SHOTS],
                      sft=SFTSettings(epochs=1.0))
    rows, held = make_problems(8, "train", seed=0), make_problems(4, "test", seed=0)
    fit = fit_module.fit_stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "fit_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(str(model_dir), rows, held, tmp_path / "run", cfg, log=lambda _: None)
    assert not (tmp_path / "run" / "report.json").exists()
    monkeypatch.setattr(fit_module, "fit_stage", fit)
    logs: list[str] = []
    result = train(str(model_dir), rows, held, tmp_path / "run", cfg, log=logs.append)
    assert any("[locate] done earlier" in line for line in logs) and any("[before] done earlier" in line for line in logs)
    assert not any("[train] done earlier" in line for line in logs)
    assert (tmp_path / "run" / "report.json").exists() and result.report["after"]["count"] == 4
