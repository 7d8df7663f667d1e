"""Locating circuits: exact ablation scan, attribution, DCM on tiny models (incl. GQA), a planted
circuit, and the real SmolLM2."""

import json

import pytest
import torch

from circuit_peft.arch import Component, get_arch
from circuit_peft.circuit import Circuit
from contextlib import ExitStack

from circuit_peft.interventions import edit_components, head_output_means
from circuit_peft.locate import attribution_scan, circuit_margin, head_ablation_scan, learn_masks, solution_losses
from circuit_peft.locate.ablation import probe_batches
from circuit_peft.taskdata.collate import model_inputs
from circuit_peft.locate.dcm import NaNLossError
from circuit_peft.models import tiny_model

DES, UND, BOS = 5, 7, 1
PLANTED_LAYER, PLANTED_HEAD = 1, 2


def planted_model():
    """Tiny GQA llama where query head 2 of layer 1 alone carries the answer.

    Every token has a constant feature (dim 0), the first token (BOS) a marker (dim 2). The
    planted head's query reads the constant and its key the marker in a slowly rotating RoPE
    dimension, so it attends to BOS; its value reads the marker and its output writes dim 1,
    which the LM head turns into logit[DES] - logit[UND]. Ablating it (uniform, zero) or
    shrinking its query at the last position lowers the margin.
    """
    m = tiny_model("llama")
    arch = get_arch(m)
    hd = arch.dims.head_dim
    kv = arch.kv_head_of(PLANTED_HEAD)
    with torch.no_grad():
        emb = m.get_input_embeddings().weight
        emb[:, 0], emb[:, 2] = 1.0, 0.0
        emb[BOS, 2] = 1.0
        q, k, v, o = (arch.projection_module(m, PLANTED_LAYER, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        for mod, row in ((q, PLANTED_HEAD * hd), (k, kv * hd), (v, kv * hd)):
            mod.weight[row : row + hd] = 0
        q.weight[PLANTED_HEAD * hd + 7, 0] = 0.4
        k.weight[kv * hd + 7, 2] = 0.4
        v.weight[kv * hd, 2] = 1.0
        o.weight[:, PLANTED_HEAD * hd : (PLANTED_HEAD + 1) * hd] = 0
        for other in range(arch.dims.n_heads):  # GQA: the other query head of this kv group ignores the marker
            if other != PLANTED_HEAD and arch.kv_head_of(other) == kv:
                o.weight[:, other * hd] = 0
        o.weight[1, PLANTED_HEAD * hd] = 1.0
        unemb = m.get_output_embeddings().weight
        unemb[:, 1] = 0
        unemb[DES, 1], unemb[UND, 1] = 0.5, -0.5
    return m


def _records(n=32, seed=0, vocab=120):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 8, (n,), generator=g).tolist()
    return [{"context_ids": [BOS] + torch.randint(10, vocab, (L,), generator=g).tolist(), "desired_id": DES,
             "undesired_id": UND, "problem_id": f"p{i}"} for i, L in enumerate(lengths)]


def _prompt_prefixed_records(n, vocab=120):
    """``_records`` whose contexts all start with BOS and the same 20 ids (a prompt prefix of 21 ids)."""
    prefix = torch.randint(10, vocab, (20,), generator=torch.Generator().manual_seed(7)).tolist()
    return [{**r, "context_ids": [BOS] + prefix + r["context_ids"][1:]} for r in _records(n, vocab=vocab)]


def _probe(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": [BOS] + torch.randint(10, 120, (int(L),), generator=g).tolist(),
             "solution_ids": [DES] + torch.randint(10, 120, (int(S),), generator=g).tolist()}
            for L, S in zip(torch.randint(3, 9, (n,), generator=g), torch.randint(1, 6, (n,), generator=g))]


def _planted_probe(n=8):
    """Probe rows whose solutions are the answer token the planted head pushes."""
    return [{"prompt_ids": r["context_ids"], "solution_ids": [DES, DES]} for r in _records(n, seed=2)]


@pytest.fixture(scope="module")
def planted():
    return planted_model()


# ----- ablation scan ---------------------------------------------------------------------------


def test_cached_batched_scan_equals_naive_scan(tiny):
    family, model = tiny
    probe = _probe()
    fast = head_ablation_scan(model, None, probe, batch_size=4, heads_per_pass=3, progress=False)
    slow = head_ablation_scan(model, None, probe, batch_size=4, naive=True, progress=False)
    assert set(fast.scores) == {Component("q", l, h) for l in range(3) for h in range(4)}
    assert max(abs(fast.scores[c] - slow.scores[c]) for c in fast.scores) < 1e-5
    assert max(abs(v) for v in fast.scores.values()) > 1e-5  # ablation did something
    assert fast.meta["base_loss"] == pytest.approx(slow.meta["base_loss"], abs=1e-6)


def _probe_with_shared_prefix(prefix_length=7, n=6, seed=3):
    """Probe rows whose prompts all start with the same ``prefix_length`` ids (a system message, say)."""
    g = torch.Generator().manual_seed(seed)
    shared = [BOS] + torch.randint(10, 120, (prefix_length - 1,), generator=g).tolist()
    return [dict(r, prompt_ids=shared + r["prompt_ids"][1:]) for r in _probe(n, seed)]


def test_scan_runs_the_shared_prompt_prefix_once_and_matches_naive(tiny):
    family, model = tiny
    probe = _probe_with_shared_prefix()
    shared = head_ablation_scan(model, None, probe, batch_size=4, heads_per_pass=3, min_shared_prefix=4,
                                keep_fraction=None, progress=False)
    slow = head_ablation_scan(model, None, probe, batch_size=4, naive=True, keep_fraction=None, progress=False)
    assert shared.meta["shared_prefix"] == 7 and slow.meta["shared_prefix"] == 0
    assert max(abs(shared.scores[c] - slow.scores[c]) for c in slow.scores) < 1e-5
    assert max(abs(v) for v in shared.scores.values()) > 1e-5
    assert shared.meta["base_loss"] == pytest.approx(slow.meta["base_loss"], abs=1e-6)
    short = head_ablation_scan(model, None, probe, heads=[(0, 0)], keep_fraction=None, progress=False)
    assert short.meta["shared_prefix"] == 0  # 7 shared ids are below the default 16: rows run whole


@pytest.mark.parametrize("method", ["uniform", "zero", "mean"])
def test_shared_prefix_scan_every_method_matches_whole_rows(method):
    model = tiny_model("gemma3")
    probe = _probe_with_shared_prefix(prefix_length=9)
    kw = dict(method=method, batch_size=3, keep_fraction=None, progress=False)
    shared = head_ablation_scan(model, None, probe, min_shared_prefix=8, **kw)
    whole = head_ablation_scan(model, None, probe, share_prompt_prefix=False, **kw)
    assert shared.meta["shared_prefix"] == 9 and whole.meta["shared_prefix"] == 0
    assert max(abs(shared.scores[c] - whole.scores[c]) for c in whole.scores) < 1e-5


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_scan_methods_match_naive_and_direct_loss(method):
    model = tiny_model("qwen2")
    probe = _probe()
    fast = head_ablation_scan(model, None, probe, method=method, batch_size=2, progress=False, keep_fraction=None)
    slow = head_ablation_scan(model, None, probe, method=method, batch_size=2, naive=True, progress=False)
    assert max(abs(fast.scores[c] - slow.scores[c]) for c in fast.scores) < 1e-5
    # independent check of one score: loss with the head ablated minus plain loss
    batches = probe_batches(model, None, probe, batch_size=3)
    means = None
    if method == "mean":
        from circuit_peft.interventions import head_output_means
        from circuit_peft.taskdata.collate import model_inputs
        means = head_output_means(model, [model_inputs(b) for b in batches])
    direct = solution_losses(model, batches, [(2, 1)], method, means) - solution_losses(model, batches)
    assert fast.scores[Component("q", 2, 1)] == pytest.approx(direct, abs=1e-5)


def test_scan_keeps_top_fraction_and_subsets(planted):
    c = head_ablation_scan(planted, None, _planted_probe(), layers=[1, 2], progress=False)
    assert {x.layer for x in c.scores} == {1, 2} and len(c.components) == 1
    assert c.components == [Component("q", PLANTED_LAYER, PLANTED_HEAD)]  # uniform ablation finds the planted head
    only = head_ablation_scan(planted, None, _probe(), heads=[(0, 1), (1, 2)], keep_fraction=None, progress=False)
    assert set(only.scores) == {Component("q", 0, 1), Component("q", 1, 2)}


def test_scan_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="empty"):
        head_ablation_scan(model, None, [], progress=False)
    with pytest.raises(ValueError, match="no solution text in field 'solution'"):
        head_ablation_scan(model, _FakeTok(), [{"prompt": "a b", "answer": "c"}], progress=False)
    with pytest.raises(ValueError, match="pass the model's tokenizer"):
        head_ablation_scan(model, None, [{"prompt": "a b", "solution": "c"}], progress=False)
    with pytest.raises(ValueError, match="unknown ablation method"):
        head_ablation_scan(model, None, _probe(), method="resample", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        head_ablation_scan(model, None, _probe(), heads=[(0, 9)], progress=False)


class _FakeTok:
    """Whitespace tokenizer over a tiny vocabulary (for the tiny models)."""

    eos_token_id = 2
    pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + (sum(map(ord, w)) % 100) for w in text.split()]
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids}


def test_text_probe_rows_with_custom_fields():
    model = tiny_model("gpt2")
    rows = [{"question": "one two three", "answer": "four five #### 9"}, {"question": "six", "answer": "seven"}]
    c = head_ablation_scan(model, _FakeTok(), rows, prompt_field="question", solution_field="answer",
                           progress=False)
    assert c.meta["solution_tokens"] == (4 + 1) + (1 + 1)  # words + EOS


# ----- attribution -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attribution_is_the_first_order_term_of_partial_ablation(family):
    """(L(a + eps (a' - a)) - L(a - eps (a' - a))) / 2 eps is the attribution score (zero ablation).

    float64; GPT-2 is float64 throughout, Llama's RMSNorm computes in float32 (looser tolerance).
    """
    model = tiny_model(family).double()
    probe = _probe()
    c = attribution_scan(model, None, probe, method="zero", keep_fraction=None, progress=False)
    batches = probe_batches(model, None, probe, batch_size=4)
    eps, rel, abs_ = (1e-5, 1e-4, 1e-8) if family == "gpt2" else (1e-2, 2e-2, 5e-5)
    for kind, layer, idx in (("q", 1, 3), ("q", 0, 0), ("mlp", 2, 10), ("mlp", 0, 50)):
        site = "o" if kind == "q" else "mlp"
        losses = []
        for sign in (1, -1):
            def shrink(block, idx=idx, f=1 - sign * eps):
                block = block.clone()
                block[:, :, idx] *= f
                return block

            with edit_components(model, site, layer, shrink):
                losses.append(solution_losses(model, batches))
        assert c.scores[Component(kind, layer, idx)] == pytest.approx((losses[0] - losses[1]) / (2 * eps),
                                                                      rel=rel, abs=abs_)


@pytest.mark.parametrize("family,kinds,method", [("llama", ("q",), "uniform"), ("qwen3", ("q", "mlp"), "zero"),
                                                 ("gpt2", ("q",), "mean")])
def test_integrated_attribution_sums_to_the_loss_of_ablating_everything(family, kinds, method):
    """Completeness: integrated-gradient scores add up to L(all scored components ablated) - L(clean);
    first-order scores do not. (Not Gemma-2/3 with zero ablation: their post-attention/post-MLP norms
    undo a joint scaling, so the loss stays flat until the path's very end.)"""
    model = tiny_model(family).double()
    with torch.no_grad():  # larger weights: ablating everything is far from the linear regime
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4)
    probe = _probe()
    batches = probe_batches(model, None, probe, batch_size=4)
    heads = [(c.layer, c.index) for c in get_arch(model).all_components(["q"])]
    means = head_output_means(model, [model_inputs(b) for b in batches]) if method == "mean" else None
    with ExitStack() as stack:
        if "mlp" in kinds:
            for layer in range(get_arch(model).dims.n_layers):
                stack.enter_context(edit_components(model, "mlp", layer, torch.zeros_like))
        ablated = solution_losses(model, batches, heads, method, means)
    change = ablated - solution_losses(model, batches)
    ig = attribution_scan(model, None, probe, method=method, kinds=kinds, keep_fraction=None, ig_steps=24,
                          progress=False)
    first = attribution_scan(model, None, probe, method=method, kinds=kinds, keep_fraction=None, progress=False)
    assert abs(change) > 2e-3
    assert sum(ig.scores.values()) == pytest.approx(change, rel=0.02)
    assert sum(first.scores.values()) != pytest.approx(change, rel=0.1)
    assert ig.meta["ig_steps"] == 24 and "base_loss" not in ig.meta
    with pytest.raises(ValueError, match="ig_steps"):
        attribution_scan(model, None, _records(2), target="logit_diff", ig_steps=2, progress=False)


def test_attribution_bound_is_the_norm_product_of_each_row_and_bounds_the_first_order_term():
    """estimate="bound": sum over rows of ||a' - a|| ||dL/da|| (here zero ablation, so ||a||), checked against
    one row at a time (no padding) for a head and a neuron; it is never below |first-order score|."""
    from circuit_peft.taskdata.losses import last_logits, solution_loss_sums

    model = tiny_model("llama").double()
    probe = _probe()
    bound = attribution_scan(model, None, probe, method="zero", keep_fraction=None, estimate="bound", progress=False)
    first = attribution_scan(model, None, probe, method="zero", keep_fraction=None, progress=False)
    n_tokens = sum(len(r["solution_ids"]) for r in probe)
    for kind, layer, idx in (("q", 1, 3), ("mlp", 0, 50)):
        expected = 0.0
        for row in probe:
            b = probe_batches(model, None, [row], batch_size=1)[0]
            seen = {}

            def keep(block):
                seen["a"] = block.view_as(block)
                return seen["a"]

            with edit_components(model, "o" if kind == "q" else "mlp", layer, keep):
                logits = last_logits(model, model_inputs(b), int(b["n_keep"]))
            (g,) = torch.autograd.grad(solution_loss_sums(logits, b["labels"])[0] / n_tokens, seen["a"])
            expected += float(g[0, :, idx].norm() * seen["a"][0, :, idx].detach().norm())
        assert bound.scores[Component(kind, layer, idx)] == pytest.approx(expected, rel=1e-6)
    assert all(bound.scores[c] >= abs(first.scores[c]) - 1e-12 for c in first.scores)
    assert bound.meta["estimate"] == "bound" and first.meta["estimate"] == "first_order"
    assert sorted(bound.scores.values()) != sorted(abs(v) for v in first.scores.values())  # not |first order|
    with pytest.raises(ValueError, match="'bound' works with target='ablation' and ig_steps=0"):
        attribution_scan(model, None, probe, estimate="bound", ig_steps=2, progress=False)


def test_attribution_runs_on_every_family(tiny):
    family, model = tiny
    c = attribution_scan(model, None, _probe(), progress=False)
    arch = get_arch(model)
    assert len(c.scores) == arch.dims.n_layers * (arch.dims.n_heads + arch.dims.n_neurons)
    d = attribution_scan(model, None, _records(8, vocab=arch.dims.vocab_size), target="logit_diff", progress=False)
    assert {x.kind for x in d.scores} == {"q", "k", "v", "mlp"}
    assert all(v == v for v in d.scores.values())


def test_attribution_ranks_the_planted_head_first(planted):
    # (mean ablation would barely touch it: the planted head's output is nearly constant)
    for method in ("uniform", "zero"):
        c = attribution_scan(planted, None, _planted_probe(), method=method, progress=False)
        exact = head_ablation_scan(planted, None, _planted_probe(), method=method, progress=False)
        assert exact.components == [Component("q", PLANTED_LAYER, PLANTED_HEAD)], method
        assert c.ranked(["q"])[0][0] == Component("q", PLANTED_LAYER, PLANTED_HEAD), method
        assert Component("q", PLANTED_LAYER, PLANTED_HEAD) in c.components
    d = attribution_scan(planted, None, _records(), target="logit_diff", progress=False)
    assert d.ranked()[0][0] == Component("q", PLANTED_LAYER, PLANTED_HEAD)


def test_attribution_bad_input(planted):
    with pytest.raises(ValueError, match="unknown attribution target"):
        attribution_scan(planted, None, _probe(), target="kl", progress=False)
    with pytest.raises(ValueError, match="scores kinds"):
        attribution_scan(planted, None, _probe(), kinds=["k"], progress=False)
    with pytest.raises(ValueError, match="both 5"):
        attribution_scan(planted, None, [dict(_records(1)[0], undesired_id=DES)], target="logit_diff", progress=False)


def test_attribution_leaves_requires_grad_alone(planted):
    flags = [p.requires_grad for p in planted.parameters()]
    attribution_scan(planted, None, _records(4), target="logit_diff", progress=False)
    assert [p.requires_grad for p in planted.parameters()] == flags
    assert all(p.grad is None for p in planted.parameters())


# ----- DCM -------------------------------------------------------------------------------------


def test_dcm_defaults_keep_the_planted_head_and_drop_the_rest(planted):
    c = learn_masks(planted, _records(), progress=False)  # lambda 0.01, Adam 5e-3, StepLR, batch 8
    arch = get_arch(planted)
    total = len(arch.all_components())
    assert Component("q", PLANTED_LAYER, PLANTED_HEAD) in c.components
    assert len(c.components) <= 0.02 * total
    assert len(c.scores) == total and c.method == "dcm"
    assert c.meta["stopped_early"] and c.meta["epochs_run"] < 50
    assert c.meta["history"][-1]["lr"] < 5e-3  # StepLR decayed


def test_dcm_is_deterministic_and_seeded(planted):
    kw = dict(lr=0.05, epochs=3, progress=False)
    a = learn_masks(planted, _records(16), **kw)
    b = learn_masks(planted, _records(16), **kw)
    assert a.scores == b.scores
    c = learn_masks(planted, _records(16), seed=1, **kw)
    assert c.scores != a.scores  # other shuffling order


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_dcm_shared_prompt_prefix_learns_the_masks_of_whole_records(family):
    """Records that share a 20-token prompt prefix: running it once (its KV cache continued by every batch) learns
    the masks and margins of running each record whole, up to float rounding; circuit_margin agrees too."""
    model = tiny_model(family)
    records = _prompt_prefixed_records(12, get_arch(model).dims.vocab_size)
    kw = dict(lr=0.05, epochs=3, batch_size=4, progress=False)
    shared, whole = (learn_masks(model, records, share_prompt_prefix=s, **kw) for s in (True, False))
    assert shared.meta["settings"]["shared_prefix"] == 21 and whole.meta["settings"]["shared_prefix"] == 0
    keys = list(whole.scores)
    assert torch.allclose(torch.tensor([shared.scores[k] for k in keys]), torch.tensor([whole.scores[k] for k in keys]),
                          atol=1e-5)
    assert min(whole.scores.values()) < 0.99  # the masks moved (> 1000 x atol) in both runs
    margins = [h["margin"] for h in whole.meta["history"]]
    assert [h["margin"] for h in shared.meta["history"]] == pytest.approx(margins, rel=1e-4, abs=1e-5)
    assert circuit_margin(model, records, shared) == pytest.approx(
        circuit_margin(model, records, shared, share_prompt_prefix=False), rel=1e-4, abs=1e-5)


def test_dcm_prefix_is_shared_only_where_exact():
    """learn_masks runs in eval mode, so it shares even for a model left in training mode with attention dropout;
    circuit_margin runs the model as it is and then does not share (dropout would draw one mask for all rows)."""
    from circuit_peft.locate.dcm import _PromptPrefix

    model = tiny_model("llama")
    model.config.attention_dropout = 0.1
    model.train()
    records = _prompt_prefixed_records(8)
    assert _PromptPrefix(model, records, True, 16).length == 0
    c = learn_masks(model, records, lr=0.05, epochs=1, progress=False)
    assert c.meta["settings"]["shared_prefix"] == 21 and model.training
    model.eval()
    assert _PromptPrefix(model, records, True, 16).length == 21 and _PromptPrefix(model, records, False, 16).length == 0


def test_dcm_does_not_change_the_model(planted):
    before = {n: p.detach().clone() for n, p in planted.named_parameters()}
    learn_masks(planted, _records(8), lr=0.05, epochs=2, progress=False)
    assert all(torch.equal(before[n], p) for n, p in planted.named_parameters())


def test_dcm_bad_records(planted):
    good = _records(3)
    with pytest.raises(ValueError, match="desired_id and undesired_id are both 5"):
        learn_masks(planted, [good[0], dict(good[1], undesired_id=DES)], progress=False)
    with pytest.raises(ValueError, match="token id 500 is outside the model's vocabulary"):
        learn_masks(planted, [dict(good[0], desired_id=500)], progress=False)
    with pytest.raises(ValueError, match="token id -1"):
        learn_masks(planted, [dict(good[0], context_ids=[1, -1, 3])], progress=False)
    with pytest.raises(ValueError, match="empty"):
        learn_masks(planted, [], progress=False)
    with pytest.raises(ValueError, match="lacks"):
        learn_masks(planted, [{"context_ids": [1, 2]}], progress=False)


def test_dcm_nan_loss_names_step_and_batch():
    model = tiny_model("llama")
    with torch.no_grad():
        get_arch(model).projection_module(model, 2, "down_proj").weight[0, 0] = float("nan")
    with pytest.raises(NaNLossError, match=r"epoch 0, step 0 \(batch 0 of the epoch.*problem ids \['p"):
        learn_masks(model, _records(10), progress=False)


def test_dcm_accepts_a_datasets_dataset(planted):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(_records(8))
    c = learn_masks(planted, ds, lr=0.05, epochs=1, kinds=("q", "v"), progress=False)
    assert {x.kind for x in c.scores} == {"q", "v"}


# ----- the real SmolLM2 ------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_scan_matches_naive_and_attribution_agrees(smollm2):
    model, tok = smollm2
    rows = [json.loads(line) for line in open("tests/data/gsm8k/train.jsonl")][:1]
    heads = [(0, 0), (29, 8)]
    kw = dict(prompt_field="question", solution_field="answer", heads=heads, keep_fraction=None, progress=False,
              max_length=120)
    fast = head_ablation_scan(model, tok, rows, heads_per_pass=2, **kw)
    slow = head_ablation_scan(model, tok, rows, naive=True, **kw)
    assert max(abs(fast.scores[c] - slow.scores[c]) for c in fast.scores) < 1e-4
    assert 0.2 < fast.meta["base_loss"] < 3.0  # the model knows GSM8K-style solutions
    att = attribution_scan(model, tok, rows, prompt_field="question", solution_field="answer",
                           keep_fraction=None, progress=False, max_length=120)
    assert len(att.scores) == 30 * (9 + 1536)
    assert att.meta["base_loss"] == pytest.approx(fast.meta["base_loss"], abs=1e-4)


@pytest.mark.slow
def test_smollm2_dcm_runs_a_few_steps(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 35?"}], add_generation_prompt=True)
    if not isinstance(prompt, list):
        prompt = prompt["input_ids"]
    ctx = list(prompt)[-12:] + tok("12 + 35 = ", add_special_tokens=False)["input_ids"]
    four, three = tok("4", add_special_tokens=False)["input_ids"][0], tok("3", add_special_tokens=False)["input_ids"][0]
    recs = [{"context_ids": ctx, "desired_id": four, "undesired_id": three, "problem_id": "add"}] * 2
    c = learn_masks(model, recs, epochs=1, batch_size=2, progress=False)
    assert c.meta["steps"] == 1 and len(c.scores) == 30 * (9 + 3 + 3 + 1536)
    assert all(0 <= v <= 1 for v in c.scores.values()) and min(c.scores.values()) < 1  # masks moved


def test_solution_loss_matches_transformers_labels_loss():
    """The scan's base loss is the usual causal-LM loss restricted to solution tokens."""
    model = tiny_model("gemma2")
    row = {"prompt_ids": [1, 40, 41, 42, 43], "solution_ids": [50, 51, 52]}
    ids = torch.tensor([row["prompt_ids"] + row["solution_ids"]])
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss.item()
    batches = probe_batches(model, None, [row, {"prompt_ids": [1, 9], "solution_ids": [8]}][:1], batch_size=2)
    assert solution_losses(model, batches) == pytest.approx(expected, abs=1e-5)
    # left padding next to a longer row changes nothing
    padded = probe_batches(model, None, [row, {"prompt_ids": [1, 9] * 6, "solution_ids": [8]}], batch_size=2)
    per_row = head_ablation_scan(model, None, [row], heads=[(1, 1)], keep_fraction=None, progress=False)
    both = head_ablation_scan(model, None, [row, {"prompt_ids": [1, 9] * 6, "solution_ids": [8]}], heads=[(1, 1)],
                              keep_fraction=None, progress=False)
    assert padded[0]["attention_mask"][0].sum() < padded[0]["attention_mask"].shape[1]
    other = head_ablation_scan(model, None, [{"prompt_ids": [1, 9] * 6, "solution_ids": [8]}], heads=[(1, 1)],
                               keep_fraction=None, progress=False)
    assert per_row.meta["base_loss"] == pytest.approx(expected, abs=1e-5)
    assert both.meta["solution_tokens"] == 4
    assert both.meta["base_loss"] * 4 == pytest.approx(per_row.meta["base_loss"] * 3 + other.meta["base_loss"], abs=1e-4)
    c = Component("q", 1, 1)
    assert (both.meta["base_loss"] + both.scores[c]) * 4 == pytest.approx(
        (per_row.meta["base_loss"] + per_row.scores[c]) * 3 + other.meta["base_loss"] + other.scores[c], abs=1e-4)


def test_probe_spec_is_one_object_for_the_probe_settings():
    from circuit_peft.locate import ProbeSpec, head_ablation_scan

    model = tiny_model("llama")
    rows = [{"question": "a b", "answer": "c d e"}, {"question": "f", "answer": "g h"}]
    tok = _FakeTok()
    loose = head_ablation_scan(model, tok, rows, prompt_field="question", solution_field="answer", keep_fraction=None,
                               progress=False)
    spec = ProbeSpec("question", "answer")
    assert head_ablation_scan(model, tok, rows, spec=spec, keep_fraction=None, progress=False).scores == loose.scores
    with pytest.raises(ValueError, match="either spec= or prompt_field="):
        head_ablation_scan(model, tok, rows, spec=spec, prompt_field="q", progress=False)
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        ProbeSpec(max_length=1)


def test_dcm_step_schedule_prunes_where_the_paper_schedule_cannot(planted):
    """16 records = 2 steps an epoch: 10 paper epochs (20 steps at 5e-3) keep everything; 60 steps at
    lr 0.05 (cosine) keep the planted head and little else, and that circuit alone keeps the margin."""
    records, held_out = _records(16), _records(16, seed=1)
    paper = learn_masks(planted, records, epochs=10, progress=False)
    assert len(paper.components) == len(paper.scores)
    c = learn_masks(planted, records, lr=0.05, steps=60, check_every=5, progress=False)
    assert Component("q", PLANTED_LAYER, PLANTED_HEAD) in c.components
    assert len(c.components) <= 0.02 * len(c.scores)
    assert c.meta["settings"]["schedule"] == "steps" and c.meta["steps"] <= 60
    assert c.meta["history"][-1]["step"] == c.meta["steps"] and c.meta["history"][-1]["lr"] < 0.05
    full = circuit_margin(planted, held_out)
    assert full > 0 and circuit_margin(planted, held_out, c) >= 0.9 * full
    empty = Circuit([], c.scores, c.fingerprint, method="dcm")
    # at the last position only (as DCM masks): a zero query still attends uniformly, so not all is lost
    assert circuit_margin(planted, held_out, empty) < 0.8 * full


def test_dcm_step_schedule_stops_when_the_kept_set_is_stable(planted):
    c = learn_masks(planted, _records(16), lr=0.05, steps=400, check_every=5, patience=3, progress=False)
    assert c.meta["stopped_early"] and c.meta["steps"] < 400
    with pytest.raises(ValueError, match="steps and check_every"):
        learn_masks(planted, _records(4), steps=0, progress=False)


def test_amplify_config_passes_the_dcm_step_schedule(planted):
    from circuit_peft.cca.pipeline import AmplifyConfig, locate_circuit

    config = AmplifyConfig(locate="dcm", dcm_steps=40, dcm_lr=0.05, circuit_fraction=None)
    c = locate_circuit(planted, _records(16), config, progress=False)
    assert c.meta["settings"]["steps"] == 40 and c.meta["settings"]["lr"] == 0.05
    assert Component("q", PLANTED_LAYER, PLANTED_HEAD) in c.components


# ----- attribution, then the exact scan of its candidates ----------------------------------------


def test_refined_scan_keeps_the_exact_top_heads_of_its_candidates():
    from circuit_peft.locate import refined_head_scan

    model = tiny_model("llama")
    n_heads = len(get_arch(model).all_components(["q"]))
    exact = head_ablation_scan(model, None, _probe(), keep_fraction=None, progress=False)
    att = attribution_scan(model, None, _probe(), kinds=["q"], keep_fraction=None, progress=False)
    every = refined_head_scan(model, None, _probe(), keep_fraction=0.25, candidates=n_heads, progress=False)
    k = len(every.components)
    assert every.components == sorted(c for c, _ in exact.ranked()[:k])  # all heads re-scanned = the exact top k
    some = refined_head_scan(model, None, _probe(), keep_fraction=0.25, candidates=2, bound_candidates=0,
                             progress=False)
    assert some.meta["candidates"] == 2 * k and len(some.scores) == 2 * k
    assert set(some.scores) == {c for c, _ in att.ranked()[: 2 * k]}  # attribution chose what to re-scan
    assert all(some.scores[c] == pytest.approx(exact.scores[c], abs=1e-6) for c in some.scores)
    assert len(refined_head_scan(model, None, _probe(), keep_fraction=None, k=3, progress=False).components) == 3
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        refined_head_scan(model, None, _probe(), candidates=0.5, progress=False)
    with pytest.raises(ValueError, match="one of keep_fraction= or k="):
        refined_head_scan(model, None, _probe(), k=3, progress=False)


@pytest.mark.parametrize("second,ranking,extra,bad", [
    ("ig_candidates", dict(ig_steps=3), dict(ig_steps=3, ig_candidates=2, bound_candidates=0),
     (dict(ig_steps=2, ig_candidates=0), "ig_candidates > 0")),
    ("bound_candidates", dict(estimate="bound"), dict(bound_candidates=2),
     (dict(bound_candidates=-1), "bound_candidates >= 0")),
])
def test_refined_scan_adds_a_second_ranking_top_heads_to_its_candidates(second, ranking, extra, bad):
    """First-order attribution's top k plus the second ranking's (integrated gradients or the bound) top 2k."""
    from circuit_peft.locate import refined_head_scan

    model = tiny_model("llama")
    k = 2
    first = [c for c, _ in attribution_scan(model, None, _probe(), kinds=["q"], keep_fraction=None,
                                             progress=False).ranked()]
    other = [c for c, _ in attribution_scan(model, None, _probe(), kinds=["q"], keep_fraction=None, progress=False,
                                             **ranking).ranked()]
    both = refined_head_scan(model, None, _probe(), keep_fraction=None, k=k, candidates=1, progress=False, **extra)
    expected = set(first[:k]) | set(other[: 2 * k])
    assert len(expected) > k  # the two rankings differ on this model, so the test can fail
    assert set(both.scores) == expected and both.meta["candidates"] == len(expected)
    assert set(both.meta[second]) == {f"{c.layer}.{c.index}" for c in expected - set(first[:k])}
    exact = head_ablation_scan(model, None, _probe(), keep_fraction=None, progress=False)
    assert both.components == sorted(sorted(expected, key=lambda c: -exact.scores[c])[:k])
    with pytest.raises(ValueError, match=bad[1]):
        refined_head_scan(model, None, _probe(), k=k, keep_fraction=None, progress=False, **bad[0])
    with pytest.raises(ValueError, match="unknown ablation method"):
        refined_head_scan(model, None, _probe(), k=k, keep_fraction=None, method="resample", progress=False)


def test_refined_scan_finds_the_planted_head(planted):
    from circuit_peft.locate import refined_head_scan

    c = refined_head_scan(planted, None, _planted_probe(), keep_fraction=0.05, progress=False)
    assert c.ranked()[0][0] == Component("q", PLANTED_LAYER, PLANTED_HEAD) and c.method == "refined_ablation"
