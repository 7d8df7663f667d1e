"""Device and dtype (issue 35): one LoadSpec resolves ``--device``/``--dtype`` for every command and recipe;
a bfloat16 base keeps the circuit's deltas, their gradients, AdamW's state and the located scores in float32;
the pieces that let ``train`` run under torchrun (the run folder's main process, the per-process batch)."""

import threading
import time

import pytest
import torch
from peft import get_peft_model

from circuit_peft import CircuitConfig, CircuitPeftError, LoadSpec, TrainConfig, load_model, tiny_model
from circuit_peft.cli import build_parser
from circuit_peft.models import resolve_device_dtype

LOADING_COMMANDS = {
    "train": ["train", "--out", "x"],
    "demo": ["demo"],
    "select": ["select", "--data", "d.jsonl", "--out", "o.jsonl"],
    "locate": ["locate", "--model", "m", "--data", "d.jsonl", "--method", "dcm", "--out", "o.json"],
    "amplify": ["amplify", "--problems", "arithmetic", "--out", "x"],
    "mine": ["mine", "--problems", "arithmetic", "--out", "x"],
    "eval": ["eval", "--model", "m"],
}


def test_auto_is_cpu_float32_without_a_gpu_and_names_resolve():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU default")
    assert resolve_device_dtype() == (torch.device("cpu"), torch.float32)
    assert LoadSpec(dtype="bfloat16").resolved() == (torch.device("cpu"), torch.bfloat16)
    assert LoadSpec(dtype=torch.float16).dtype == "float16"  # a torch.dtype is taken by name
    assert LoadSpec().settings() == {}  # float32 records nothing: older run folders keep their settings
    assert LoadSpec(device="cpu", dtype="bfloat16").settings() == {"dtype": "bfloat16"}


def test_bad_device_or_dtype_is_refused_naming_it():
    with pytest.raises(CircuitPeftError, match="device.*'tpu'"):
        LoadSpec(device="tpu")
    with pytest.raises(CircuitPeftError, match="dtype.*'float8'"):
        LoadSpec(dtype="float8")
    with pytest.raises(CircuitPeftError, match="dtype"):
        TrainConfig(load={"dtype": "int8"})
    if not torch.cuda.is_available():
        with pytest.raises(CircuitPeftError, match="--device: cuda asked for"):
            LoadSpec(device="cuda").resolved()


@pytest.mark.parametrize("command", sorted(LOADING_COMMANDS))
def test_every_model_loading_command_takes_device_and_dtype(command):
    parser = build_parser()
    args = parser.parse_args([*LOADING_COMMANDS[command], "--device", "cpu", "--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cpu", "bfloat16")
    defaults = parser.parse_args(LOADING_COMMANDS[command])
    assert (defaults.device, defaults.dtype) == ("auto", "auto")


@pytest.mark.parametrize("flag,value", [("--dtype", "float8"), ("--device", "tpu"), ("--device", "cuda:x")])
def test_a_bad_device_or_dtype_stops_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([*LOADING_COMMANDS["train"], flag, value])
    assert stop.value.code == 2 and flag in capsys.readouterr().err


def test_train_flags_reach_train_config():
    from circuit_peft.commands.train import config_from_args

    args = build_parser().parse_args([*LOADING_COMMANDS["train"], "--device", "cpu", "--dtype", "bfloat16"])
    assert config_from_args(args).load == LoadSpec(device="cpu", dtype="bfloat16")
    assert TrainConfig(load={"dtype": "bfloat16"}).load == LoadSpec(dtype="bfloat16")  # as read back from JSON


def test_load_model_applies_the_spec(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    model = load_model(str(tmp_path), spec=LoadSpec(device="cpu", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    assert {p.dtype for p in load_model(str(tmp_path)).parameters()} == {torch.float32}  # the library default


@pytest.mark.parametrize("length", [8, 300])  # short: slices added by index; long: the fused path's threshold
def test_bf16_base_keeps_float32_deltas_and_trains_them(length):
    """As PEFT's LoRA (autocast_adapter_dtype): the deltas and the LoRA branch are float32 on a bfloat16 base;
    the forward returns bfloat16; gradients reach every delta; AdamW's state is float32."""
    model = get_peft_model(tiny_model("llama").to(torch.bfloat16),
                           CircuitConfig(components={"q": {"1": [0, 1]}, "mlp": {"2": [3, 5]}}, r=2))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    base = [p for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()]
    assert {p.dtype for p in base} == {torch.bfloat16}
    ids = torch.randint(3, 120, (2, length), generator=torch.Generator().manual_seed(0))
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in trainable.items():
        if "lora_A" in name:  # B starts at zero, so A's first gradient is zero
            assert p.grad is not None
            continue
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, name
    opt = torch.optim.AdamW(trainable.values(), lr=1e-3)
    opt.step()
    assert {s["exp_avg_sq"].dtype for s in opt.state.values()} == {torch.float32}


def test_bf16_adapter_output_matches_float32_reference():
    """The bf16 forward adds the float32 deltas' update to the bf16 base output (not the delta rounded into a
    bf16 weight): its change from the base is the float32 model's change, to bf16 precision."""
    config = CircuitConfig(components={"q": {"1": [0]}, "mlp": {"2": [3]}}, init_weights=False)
    ref = get_peft_model(tiny_model("llama"), config)
    low = get_peft_model(tiny_model("llama").to(torch.bfloat16), config)
    low.load_state_dict({k: v for k, v in ref.state_dict().items() if "circuit_" in k}, strict=False)
    ids = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with ref.disable_adapter():
            ref_base = ref(input_ids=ids).logits
        change = ref(input_ids=ids).logits - ref_base
        with low.disable_adapter():
            low_base = low(input_ids=ids).logits.float()
        low_change = low(input_ids=ids).logits.float() - low_base
    assert change.abs().max() > 1e-3
    assert (low_change - change).abs().max() < 0.1 * change.abs().max()


def _sft_rows(n: int, length: int = 40) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 120, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 10 + ids[10:], "token_weights": [1.0] * length})
    return rows


def test_gradient_scan_on_bf16_sums_batches_in_float32_and_ranks_like_float32():
    from circuit_peft.locate import gradient_scan

    rows = _sft_rows(6)
    full = gradient_scan(tiny_model("llama"), rows, keep_fraction=None, batch_size=2, progress=False)
    low_model = tiny_model("llama").to(torch.bfloat16)
    low = gradient_scan(low_model, rows, keep_fraction=None, batch_size=2, progress=False)
    assert all(type(v) is float for v in low.scores.values())
    a = torch.tensor([full.scores[c] for c in full.scores], dtype=torch.float64)
    b = torch.tensor([low.scores[c] for c in full.scores], dtype=torch.float64)
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99
    assert all(p.grad is None for p in low_model.parameters())  # the model is left as it was


def _registered_locators():
    from circuit_peft.locate.registry import locator_names

    return locator_names()


@pytest.mark.parametrize("locator", _registered_locators())
def test_every_locator_runs_on_a_bf16_model_with_float_scores(locator):
    """Every registered locator (circuit_peft.locate.registry) on a bfloat16 model: float scores, the dtype kept."""
    from circuit_peft.locate import general_text_rows
    from circuit_peft.locate.registry import LOCATORS

    g = torch.Generator().manual_seed(0)
    records = [{"context_ids": torch.randint(3, 120, (12,), generator=g).tolist(), "desired_id": 5,
                "undesired_id": 7, "problem_id": str(i)} for i in range(4)]
    probe = [{"prompt_ids": r["context_ids"][:6], "solution_ids": r["context_ids"][6:]} for r in records]
    model = tiny_model("llama").to(torch.bfloat16)
    spec = LOCATORS[locator]
    options = {"dcm": {"epochs": 2}, "gradient_contrast": {"reference": general_text_rows(
        torch.randint(3, 120, (2, 10), generator=g).tolist())}}.get(locator, {})
    keep = None if spec.own_keep else (0.25 if spec.reads == "probe" else 0.1)
    circuit = spec(model, None, records if spec.reads == "records" else probe, keep, progress=False, **options)
    assert circuit.components and all(type(v) is float and v == v for v in circuit.scores.values())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the model is left in its dtype


def test_low_precision_grads_add_up_in_float32():
    from circuit_peft.locate.gradient import add_low_precision_grads

    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    model = torch.nn.Module()
    model.p = p
    sums = {}
    for _ in range(300):  # 300 x (1 + 2**-8): a bfloat16 sum stops growing exactly; float32 does not
        p.grad = torch.full((4,), 1 + 2 ** -8, dtype=torch.bfloat16)
        add_low_precision_grads(model, sums)
    assert p.grad is None and sums[p].dtype == torch.float32
    assert torch.allclose(sums[p], torch.full((4,), 300 * float(torch.tensor(1 + 2 ** -8, dtype=torch.bfloat16))))


def test_batch_splits_over_launcher_processes(monkeypatch):
    from circuit_peft.recipe.sft import per_process_batch_size

    assert per_process_batch_size(8) == 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert per_process_batch_size(8) == 4
    with pytest.raises(CircuitPeftError, match="--batch-size: 3 rows .* 2 processes"):
        per_process_batch_size(3)


def test_run_folder_other_processes_read_what_the_main_one_writes(tmp_path, monkeypatch):
    """A non-main process neither locks nor writes the folder: it waits for the main process's run.json and
    stage files; it runs a stage's function only when every process must (data-parallel training)."""
    from circuit_peft.recipe.pipeline import RunFolder

    main = RunFolder(tmp_path / "run", {"a": 1})
    assert main.is_main
    monkeypatch.setenv("RANK", "1")
    other = RunFolder(tmp_path / "run", {"a": 1})
    assert not other.is_main
    opened = threading.Thread(target=other.open)
    opened.start()
    time.sleep(0.3)
    assert opened.is_alive()  # waits for the main process's run.json
    main.open()
    opened.join(10)
    assert not opened.is_alive()

    def late_main_stage():
        time.sleep(0.3)
        main.stage("locate", lambda: {"components": 3}, print)

    writer = threading.Thread(target=late_main_stage)
    writer.start()
    assert other.stage("locate", lambda: pytest.fail("ran on a non-main process"), print)["components"] == 3
    writer.join()
    ran = []
    main.stage("train", lambda: {"lr": 1.0}, print)
    assert other.stage("train", lambda: ran.append(1) or {}, print)["lr"] == 1.0 and not ran  # done: reused
    threading.Timer(0.3, lambda: main.stage("control_x", lambda: {"accuracy": 0.5}, print)).start()
    assert other.stage("control_x", lambda: ran.append(1) or {}, print, every_process=True)["accuracy"] == 0.5
    assert ran == [1]
    other.close()
    assert (tmp_path / "run" / "lock").exists()  # only the main process holds and releases the lock
    main.close()
    assert not (tmp_path / "run" / "lock").exists()


@pytest.mark.slow
def test_bf16_smollm2_locates_the_same_circuit_and_answers_like_float32(smollm2):
    """SmolLM2 in bfloat16 on the CPU: the gradient locator keeps (nearly) the float32 circuit and held-out
    accuracy is the float32 one within noise (paired over the same problems). The whole train run in both
    dtypes is benchmarks/dtype.py."""
    import copy

    from circuit_peft.cca.problems import ARITHMETIC_SHOTS, make_problems
    from circuit_peft.recipe.controls import paired_gap
    from circuit_peft.recipe.pipeline import measure_accuracy, locate_for_training

    model, tok = smollm2
    low = copy.deepcopy(model).to(torch.bfloat16)
    rows, held = make_problems(8, "train", seed=0), make_problems(12, "test", seed=0)
    cfg = TrainConfig(max_new_tokens=24, shots=[dict(s) for s in ARITHMETIC_SHOTS])
    kept, correct = {}, {}
    for name, m in (("float32", model), ("bfloat16", low)):
        circuit = locate_for_training(m, tok, rows, "chat", cfg, "unused", 0.02, progress=False)
        assert all(type(v) is float for v in circuit.scores.values())
        kept[name], correct[name] = set(circuit.components), measure_accuracy(m, tok, held, "chat", cfg)["correct"]
    both = kept["float32"] & kept["bfloat16"]
    assert len(kept["float32"]) == len(kept["bfloat16"]) and len(both) >= 0.9 * len(kept["float32"])
    gap, se = paired_gap(correct["bfloat16"], correct["float32"])
    assert abs(gap) <= max(2 * (se or 0.0), 2 / len(held))
