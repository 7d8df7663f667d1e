"""The circuit adapter on a bitsandbytes 4-bit (NF4) base, on this CPU: a tiny Llama saved to a folder and loaded
back with transformers' ``BitsAndBytesConfig(load_in_4bit=True)``, as a QLoRA user loads theirs."""

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from circuit_peft.models import tiny_config  # noqa: E402
from circuit_peft.tuner import CircuitConfig  # noqa: E402
from circuit_peft.tuner.bnb import CircuitLinear4bit, _dequantized  # noqa: E402

COMPONENTS = {"q": {"1": [0, 3]}, "k": {"1": [1]}, "o": {"2": [2]}, "mlp": {"1": [5], "2": [0, 127]}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama whose MLP width (128) is a multiple of 64: bitsandbytes' CPU inference repacking
    (AVX512-BF16 CPUs, eval mode) needs every input width to be one."""
    path = tmp_path_factory.mktemp("tiny_llama")
    config = tiny_config("llama")
    config.intermediate_size = 128
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _load_4bit(folder):
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map={"": "cpu"}).eval()


def _dequantized_twin(folder, model4):
    """The float model whose every linear weight is ``model4``'s 4-bit weight dequantized (the reference)."""
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name, module in model4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            ref.get_submodule(name).weight.data.copy_(_dequantized(module))
    return ref


def _ids(seed=0, batch=2, length=24):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _circuit(model, seed=0):
    torch.manual_seed(seed)
    return get_peft_model(model, CircuitConfig(components=COMPONENTS, init_weights=False))


def test_4bit_layers_get_the_4bit_circuit_layer_and_forward_equals_the_dequantized_reference(folder):
    """Training forwards (gradients on) equal the float model carrying the dequantized weights; eval forwards
    (which bitsandbytes may run through its repacked CPU kernel, block scales in bfloat16) stay close to it."""
    model4 = _load_4bit(folder)
    ref = _dequantized_twin(folder, model4)
    peft4, peft_ref = _circuit(model4), _circuit(ref)
    layers = [m for m in peft4.modules() if isinstance(m, CircuitLinear4bit)]
    assert layers and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in layers)
    assert all(p.dtype == torch.float32 for n, p in peft4.named_parameters() if "circuit_" in n)
    peft_ref.load_state_dict({k: v for k, v in peft4.state_dict().items() if "circuit_" in k}, strict=False)
    ids = _ids()
    want = peft_ref(input_ids=ids).logits.detach()
    # train mode: bitsandbytes runs its standard dequantize-then-matmul path
    torch.testing.assert_close(peft4.train()(input_ids=ids).logits.detach(), want, rtol=1e-4, atol=1e-5)
    peft4.eval()
    with torch.no_grad():
        got_eval = peft4(input_ids=ids).logits
        with peft4.disable_adapter():
            base_eval = peft4(input_ids=ids).logits
    assert (got_eval - want).abs().max() < 0.02 * want.abs().max()
    assert (base_eval - got_eval).abs().max() > 10 * (got_eval - want).abs().max()  # the deltas do change it


def test_4bit_training_moves_only_the_slices(folder):
    model = _circuit(_load_4bit(folder)).train()
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert packed and trainable and all("circuit_rows" in n or "circuit_cols" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = _ids(length=70)  # 140 rows: above the 2-D layer's MIN_FUSED_TOKENS (a plain layer would fuse)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        assert all(model.get_parameter(n).grad is not None for n in trainable)
        opt.step()
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())  # 4-bit bytes and every other frozen tensor
    assert set(packed) <= set(frozen)


def test_4bit_adapter_saves_and_loads_back_onto_a_4bit_base(folder, tmp_path):
    """Saving after an eval forward (which may repack the weights for the CPU kernel) leaves the base as it
    was (bitsandbytes 0.50's own inverse of that repacking, run on save, scrambles the block scales), and
    the adapter loads back onto a fresh 4-bit base with the same outputs."""
    model = _circuit(_load_4bit(folder))
    ids = _ids(1)
    with torch.no_grad():
        want = model.train()(input_ids=ids).logits  # train mode: the standard 4-bit layout
        model.eval()(input_ids=ids)  # may repack
    model.save_pretrained(tmp_path)
    with torch.no_grad():  # the repacked forward rounded the block scales to bfloat16: that much changes
        assert (model.train()(input_ids=ids).logits - want).abs().max() < 0.01 * want.abs().max()
    loaded = PeftModel.from_pretrained(_load_4bit(folder), tmp_path)
    assert any(isinstance(m, CircuitLinear4bit) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded.train()(input_ids=ids).logits, want, rtol=0, atol=0)
    # the same adapter also loads onto the float base (the deltas do not depend on the quantization)
    float_loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder).eval(), tmp_path)
    with torch.no_grad():
        assert float_loaded(input_ids=ids).logits.shape == want.shape


def test_4bit_merge_and_unmerge_stay_within_quantization_error_and_warn(folder):
    model = _circuit(_load_4bit(folder))
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    ids = _ids(2)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits  # eval: may repack (CPU kernel); merge reads either layout
    before = _dequantized(layer.get_base_layer())
    target = before + layer.get_delta_weight("default")
    with pytest.warns(UserWarning, match="4-bit linear may get different generations due to rounding errors"):
        model.merge_adapter()
    merged_w = _dequantized(layer.get_base_layer())
    # NF4: an entry rounds to the nearest of 16 levels times its block's absmax; the widest gap is 0.304 absmax
    bound = 0.16 * target.abs().max()
    assert (merged_w - target).abs().max() <= bound
    rows = layer.circuit_row_index["default"]
    untouched = torch.ones(layer.out_features, dtype=torch.bool)
    untouched[rows] = False
    torch.testing.assert_close(merged_w[untouched], before[untouched], rtol=0, atol=0)  # blocks without a delta
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    assert (merged - unmerged).abs().max() < 0.1 * unmerged.abs().max()
    with pytest.warns(UserWarning, match="Unmerge circuit module to 4-bit"):
        model.unmerge_adapter()
    assert (_dequantized(layer.get_base_layer()) - before).abs().max() <= 2 * bound
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left merged: no second unmerge warning from a forward
        with torch.no_grad():
            model(input_ids=ids)


def test_gradient_scan_on_a_4bit_base_scores_as_on_the_dequantized_float_model(folder):
    """The default locator reads weight gradients; a 4-bit weight holds none, so hooks sum them instead
    (interventions.accumulate_weight_grads): the scores equal the float model carrying the same weights."""
    from circuit_peft.locate import gradient_scan
    from circuit_peft.locate.gradient import general_text_rows

    model4 = _load_4bit(folder)
    ref = _dequantized_twin(folder, model4)
    flags = [p.requires_grad for p in model4.parameters()]
    rows = general_text_rows(_ids(3, batch=4, length=16).tolist())
    got = gradient_scan(model4, rows, keep_fraction=None, batch_size=2, progress=False)
    want = gradient_scan(ref, rows, keep_fraction=None, batch_size=2, progress=False)
    assert got.scores.keys() == want.scores.keys() and len(got.scores) > 0
    for c, v in want.scores.items():
        assert got.scores[c] == pytest.approx(v, rel=1e-3, abs=1e-7), c
    assert [p.requires_grad for p in model4.parameters()] == flags  # left as it was
    assert all(p.grad is None for p in model4.parameters())


def test_load_in_4bit_flag_loads_the_base_quantized(folder):
    from circuit_peft.cli import build_parser
    from circuit_peft.commands._args import load_spec
    from circuit_peft.models import LoadSpec, load_model

    for argv in (["train", "--out", "x"], ["locate", "--model", "m", "--data", "d", "--method", "attribution", "--out", "x"],
                 ["amplify", "--problems", "p", "--out", "x"]):
        args = build_parser().parse_args([*argv, "--load-in-4bit", "--device", "cpu"])
        assert load_spec(args).load_in_4bit, argv
    spec = LoadSpec(device="cpu", dtype="float32", load_in_4bit=True)
    assert spec.settings() == {"load_in_4bit": True} and LoadSpec(device="cpu", dtype="float32").settings() == {}
    q = spec.from_pretrained_kwargs()["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.float32
    model = load_model(str(folder), spec=spec)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)


@pytest.mark.slow
def test_4bit_smollm2_circuit_trains_and_round_trips(tmp_path):
    """A circuit on the real SmolLM2 in 4 bits: a few AdamW steps lower the loss on their batch, and the saved
    adapter gives the same logits on the 4-bit base once unloaded from it."""
    from circuit_peft.models import LoadSpec, load_model

    spec = LoadSpec(device="cpu", dtype="float32", load_in_4bit=True)
    torch.manual_seed(0)
    model = get_peft_model(load_model("smollm2", spec=spec),
                           CircuitConfig(components={"q": {"20": [0, 5]}, "mlp": {"24": [3, 14, 100]}})).train()
    ids = torch.randint(100, 5000, (2, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    base = model.unload()  # the 4-bit base without the adapter (one load of SmolLM2 in this test, not two)
    assert isinstance(base.model.layers[20].self_attn.q_proj, bnb.nn.Linear4bit)
    loaded = PeftModel.from_pretrained(base, tmp_path).train()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=0)


def test_an_8bit_base_is_refused_naming_the_module(folder):
    q = BitsAndBytesConfig(load_in_8bit=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map={"": "cpu"})
    except Exception as err:  # 8-bit loading needs what this machine may lack
        pytest.skip(f"bitsandbytes 8-bit does not load here: {err}")
    with pytest.raises(TypeError, match=r"model\.layers\.1\.self_attn\.q_proj.*8-bit"):
        get_peft_model(model, CircuitConfig(components=COMPONENTS))


def test_training_after_an_eval_forward_gets_the_same_gradients(folder):
    """An eval forward repacks the 4-bit weights for bitsandbytes' CPU inference kernel (on AVX512-BF16 CPUs),
    whose input gradient is wrong; model.train() restores the standard layout, so the slices' gradients equal
    those of a model that never ran in eval."""
    ids = _ids(4, length=20)

    def grads(eval_first):
        model = _circuit(_load_4bit(folder))
        if eval_first:
            with torch.no_grad():
                model.eval()(input_ids=ids)
        model.train()(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    fresh, after_eval = grads(False), grads(True)
    assert fresh.keys() == after_eval.keys() and fresh
    for name in fresh:
        err = (after_eval[name] - fresh[name]).abs().max() / fresh[name].abs().max()
        assert err < 0.05, (name, err.item())  # the block scales come back bfloat16-rounded: that much differs
