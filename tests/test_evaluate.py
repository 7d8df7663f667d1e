"""Evaluation: data loaders, batched scoring vs hand loops, accuracy vs a hand count, KL, bad input."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from circuit_peft.evaluate.accuracy import binomial_stderr, evaluate_accuracy
from circuit_peft.evaluate.answers import is_correct
from circuit_peft.evaluate.data import load_gsm8k, load_mmlu, load_text, load_truthfulqa, read_jsonl
from circuit_peft.evaluate.generation import continuation_logprobs, generate_batched, last_token_logits
from circuit_peft.taskdata.prompts import build_prompt, build_prompt_ids, encode_prompts, format_gsm8k_solution
from circuit_peft.evaluate.side_effects import (
    mean_kl,
    mmlu_accuracy,
    mmlu_context_ids,
    side_effects,
    truthfulqa_mc1,
    truthfulqa_prompt,
)
from circuit_peft.models import load_tokenizer, tiny_model

DATA = Path(__file__).parent / "data"
SUBJECTS = ["elementary_mathematics", "high_school_mathematics"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def tiny_llama(tok):
    return tiny_model("llama", vocab_size=len(tok))


def _hand_logprob(model, ctx, cont):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


# ----- data ---------------------------------------------------------------------------------


def test_loaders_on_vendored_data():
    test = load_gsm8k(DATA, "test")
    assert len(test) == 32 and {"question", "answer"} <= set(test[0])
    assert len(load_gsm8k(DATA / "gsm8k" / "train.jsonl", limit=5)) == 5
    mmlu = load_mmlu(DATA, SUBJECTS)
    assert set(mmlu) == set(SUBJECTS) and len(mmlu[SUBJECTS[0]]["eval"]) == 20 and mmlu[SUBJECTS[0]]["dev"] == []
    row = mmlu[SUBJECTS[0]]["eval"][0]
    assert row["question"] == "What is the value of p in 24 = 2p?" and row["answer"] == 2 and len(row["choices"]) == 4
    tqa = load_truthfulqa(DATA)
    assert len(tqa) == 20 and tqa[0]["best"].startswith("The watermelon seeds pass") and len(tqa[0]["incorrect"]) == 7
    assert load_text(DATA).startswith("First Citizen")


def test_loader_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(bad)
    noans = tmp_path / "noans.jsonl"
    noans.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="answer"):
        load_gsm8k(noans)
    with pytest.raises(FileNotFoundError):
        load_gsm8k(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        load_mmlu(DATA, ["astronomy"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty.txt")
    csvdir = tmp_path / "mmlu" / "test"
    csvdir.mkdir(parents=True)
    (csvdir / "x_test.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="answer"):
        load_mmlu(tmp_path, ["x"])


# ----- prompts ------------------------------------------------------------------------------


def test_prompts(tok):
    row = load_gsm8k(DATA, "train", limit=1)[0]
    sol = format_gsm8k_solution(row["answer"])
    assert "<<" not in sol and sol.endswith("The answer is 72.")
    few = build_prompt(None, "What is 2+3?", "fewshot", shots=[row])
    assert few.startswith("Question: Natalia") and few.endswith("Question: What is 2+3?\nAnswer:")
    chat = build_prompt(tok, "What is 2+3?", "chat")
    assert chat.endswith("<|im_start|>assistant\n") and "What is 2+3?" in chat
    ids = build_prompt_ids(tok, "What is 2+3?", "chat")
    assert ids == encode_prompts(tok, [chat], "chat")[0] and ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    with pytest.raises(ValueError, match="style"):
        build_prompt(tok, "q", "zeroshot")
    with pytest.raises(ValueError, match="chat template"):
        build_prompt(None, "q", "chat")
    with pytest.raises(ValueError, match="shot"):
        build_prompt(None, "q", "fewshot", shots=[{"question": "only"}])


# ----- batched scoring vs hand loops ---------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_continuation_logprobs_match_hand_loop(tok, family):
    model = tiny_model(family, vocab_size=len(tok))
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 1000, (7,), generator=g).tolist()
    ctxs = [prefix + torch.randint(3, 1000, (n,), generator=g).tolist() for n in (3, 5, 9, 2)]
    conts = [[11], [12, 13], [15, 16, 17], [18]]
    ctxs.append(ctxs[1])
    conts.append([19])  # shares a context with a multi-token continuation
    hand = [_hand_logprob(model, c, x) for c, x in zip(ctxs, conts)]
    assert continuation_logprobs(model, tok, ctxs, conts, batch_size=3, progress=False) == pytest.approx(hand, abs=1e-4)
    shared = continuation_logprobs(model, tok, ctxs, conts, batch_size=2, progress=False, shared_prefix=prefix)
    assert shared == pytest.approx(hand, abs=1e-4)
    with torch.no_grad():
        last = [model(input_ids=torch.tensor([c])).logits[0, -1] for c in ctxs]
    assert torch.allclose(last_token_logits(model, tok, ctxs, batch_size=2), torch.stack(last), atol=1e-4)
    with pytest.raises(ValueError, match="shared_prefix"):
        continuation_logprobs(model, tok, [[5, 6, 7]], [[1]], shared_prefix=[9])


def test_mmlu_picks_match_hand_loop(tok, tiny_llama):
    data = load_mmlu(DATA, SUBJECTS)
    res = mmlu_accuracy(tiny_llama, tok, data, n_shots=2, limit_per_subject=2, batch_size=3, progress=False)
    assert res["count"] == 4 and set(res["per_subject"]) == set(SUBJECTS)
    letters = [tok(f" {L}", add_special_tokens=False)["input_ids"] for L in "ABCD"]
    assert all(len(ids) == 1 for ids in letters)
    hand_correct = 0
    for rec in res["records"]:
        rows = data[rec["subject"]]["eval"]
        shots, row = rows[:2], rows[2 + rec["row"]]  # no dev split: the first rows are the shots
        _, ctx = mmlu_context_ids(tok, rec["subject"], shots, row)
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llama(input_ids=torch.tensor([ctx])).logits[0, -1], -1)
        scores = [float(logp[ids[0]]) for ids in letters]
        assert rec["scores"] == pytest.approx(scores, abs=1e-4)
        pick = max(range(4), key=lambda j: scores[j])
        assert rec["pick"] == pick and rec["answer"] == row["answer"]
        hand_correct += pick == row["answer"]
    assert res["accuracy"] == hand_correct / 4
    text = mmlu_accuracy(tiny_llama, tok, {SUBJECTS[0]: data[SUBJECTS[0]]}, n_shots=1, choice="text",
                         limit_per_subject=1, progress=False)
    rec = text["records"][0]
    rows = data[rec["subject"]]["eval"]
    _, ctx = mmlu_context_ids(tok, rec["subject"], rows[:1], rows[1])
    hand = [_hand_logprob(tiny_llama, ctx, tok(f" {c}", add_special_tokens=False)["input_ids"])
            for c in rows[1]["choices"]]
    assert rec["scores"] == pytest.approx(hand, abs=1e-4)


def test_truthfulqa_mc1_matches_hand_loop(tok, tiny_llama):
    rows = load_truthfulqa(DATA, limit=4)
    res = truthfulqa_mc1(tiny_llama, tok, rows, batch_size=5, progress=False)
    correct = 0
    for row, rec in zip(rows, res["records"]):
        ctx = tok(truthfulqa_prompt(row["question"]))["input_ids"]
        scores = [_hand_logprob(tiny_llama, ctx, tok(" " + a, add_special_tokens=False)["input_ids"])
                  for a in [row["best"], *row["incorrect"]]]
        assert rec["scores"] == pytest.approx(scores, abs=1e-4)
        correct += scores[0] > max(scores[1:])
    assert res["accuracy"] == correct / 4 and res["count"] == 4
    assert res["stderr"] == pytest.approx(binomial_stderr(correct / 4, 4))


# ----- KL -----------------------------------------------------------------------------------


def test_kl_zero_for_same_model_and_positive_after_change(tok):
    text = load_text(DATA)
    base = tiny_model("llama", vocab_size=len(tok))
    same = mean_kl(base, base, tok, text, chunk_length=32, max_chunks=3, progress=False)
    assert abs(same["kl"]) < 1e-6 and same["tokens"] == 96
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(tiny_model("llama", vocab_size=len(tok)), lora)
    assert abs(mean_kl(None, peft, tok, text, chunk_length=32, max_chunks=3, progress=False)["kl"]) < 1e-6
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    kl = mean_kl(None, peft, tok, text, chunk_length=32, max_chunks=3, progress=False)["kl"]
    # the same number with a separate base model and a hand computation on one chunk
    ids = tok(text, add_special_tokens=False)["input_ids"][:32]
    with torch.no_grad():
        p_base = torch.log_softmax(base(input_ids=torch.tensor([ids])).logits[0], -1)
        p_tuned = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0], -1)
    hand = float((p_base.exp() * (p_base - p_tuned)).sum(-1).mean())
    one = mean_kl(base, peft, tok, text[:400], chunk_length=32, max_chunks=1, progress=False)["kl"]
    assert kl > 1e-3 and one == pytest.approx(hand, rel=1e-4)
    with pytest.raises(ValueError, match="chunk"):
        mean_kl(base, base, tok, "too short", chunk_length=64, progress=False)


def test_side_effects_report(tok):
    peft = get_peft_model(tiny_model("llama", vocab_size=len(tok)), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rep = side_effects(peft, tok, data_dir=DATA, mmlu_subjects=SUBJECTS, mmlu_limit=2, truthfulqa_limit=3,
                       kl_chunk_length=32, kl_chunks=2, progress=False)
    for key in ("mmlu", "mmlu_base", "mmlu_delta", "truthfulqa", "truthfulqa_base", "truthfulqa_delta", "kl"):
        assert key in rep
    assert rep["mmlu_count"] == 4 and rep["truthfulqa_count"] == 3 and rep["kl"] > 0
    assert rep["mmlu_delta"] == pytest.approx(rep["mmlu"] - rep["mmlu_base"])
    with peft.disable_adapter():
        base_mmlu = mmlu_accuracy(peft, tok, load_mmlu(DATA, SUBJECTS), limit_per_subject=2, progress=False)
    assert rep["mmlu_base"] == base_mmlu["accuracy"]
    again = side_effects(peft, tok, data_dir=DATA, tasks=["truthfulqa"], truthfulqa_limit=3,
                         baseline={"truthfulqa_base": 0.5}, progress=False)
    assert again["truthfulqa_base"] == 0.5 and "mmlu" not in again and "kl" not in again
    with pytest.raises(ValueError, match="PeftModel"):
        side_effects(tiny_model("llama", vocab_size=len(tok)), tok, data_dir=DATA)
    with pytest.raises(ValueError, match="unknown"):
        side_effects(peft, tok, data_dir=DATA, tasks=["trivia"])
    with pytest.raises(TypeError, match="old order was side_effects"):
        side_effects(None, peft, tok)


# ----- accuracy -----------------------------------------------------------------------------


@pytest.mark.slow
def test_accuracy_matches_hand_count(smollm2):
    model, tok = smollm2
    problems = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 3), (14, 25)]]
    problems.append({"question": "What is 1 + 1?", "answer": "no number here"})  # unparsable gold: skipped
    res = evaluate_accuracy(model, tok, problems, max_new_tokens=16, batch_size=3,
                            instruction="End with 'The answer is N.'", progress=False)
    assert res.count == 2 and [s["index"] for s in res.skipped] == [2]
    hand = 0
    for p, rec in zip(problems, res.records):  # one prompt at a time, no padding
        prompt = build_prompt(tok, p["question"], "chat", instruction="End with 'The answer is N.'")
        ids = torch.tensor([encode_prompts(tok, [prompt], "chat")[0]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert rec["completion"] == text.strip() or rec["completion"] == text
        hand += is_correct(text, p["answer"])
    assert res.correct == hand and res.accuracy == hand / 2
    assert res.stderr == pytest.approx(binomial_stderr(hand / 2, 2))
    assert json.dumps(res.to_dict())  # JSON-serialisable report


def test_accuracy_bad_input(tok, tiny_llama):
    with pytest.raises(ValueError, match="empty"):
        evaluate_accuracy(tiny_llama, tok, [])
    with pytest.raises(ValueError, match="answer"):
        evaluate_accuracy(tiny_llama, tok, [{"question": "q"}])
    with pytest.raises(ValueError, match="question"):  # neither a question nor a TRL prompt
        evaluate_accuracy(tiny_llama, tok, [{"text": "q", "answer": "1"}])
    with pytest.raises(ValueError, match="parsable"):
        evaluate_accuracy(tiny_llama, tok, [{"question": "q", "answer": "none"}])
    out = generate_batched(tiny_llama, tok, [[5, 6, 7], [8]], max_new_tokens=3, progress=False)
    assert len(out) == 2 and all(len(o) <= 3 for o in out)


def test_kl_with_circuit_adapter(tok):
    """The base view of a CircuitConfig adapter is its disabled adapter: KL 0 at init, > 0 once it moves."""
    from circuit_peft import CircuitConfig
    from circuit_peft.arch import Component

    model = tiny_model("llama", vocab_size=len(tok))
    config = CircuitConfig.from_components([Component("q", 1, 0), Component("mlp", 2, 5)])
    peft = get_peft_model(model, config)
    text = load_text(DATA)
    assert abs(mean_kl(None, peft, tok, text, chunk_length=32, max_chunks=2, progress=False)["kl"]) < 1e-6
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    assert mean_kl(None, peft, tok, text, chunk_length=32, max_chunks=2, progress=False)["kl"] > 1e-4


# ----- greedy generation with a shared prefix -------------------------------------------------------


def _hand_greedy(model, prompt, n, stops):
    """One prompt at a time, no padding, no cache reuse: model.generate's greedy tokens cut at a stop id."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, temperature=None, top_k=None, top_p=None)
    row = out[0, len(prompt):].tolist()
    return row[: next((j for j, t in enumerate(row) if t in stops), len(row))]


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
def test_shared_prefix_greedy_equals_generate_per_prompt(tok, family):
    """Prefix run once + padded rests + explicit positions give the tokens of one-by-one generate."""
    from circuit_peft.prefix import shared_prefix_length
    from circuit_peft.evaluate.generation import generate_with_shared_prefix

    torch.manual_seed(0)
    model = tiny_model(family, vocab_size=len(tok)).eval()
    prefix = [11, 12, 13, 14, 15, 16]
    prompts = [prefix + [20, 21, 22], prefix + [30], prefix + [40, 41], prefix + [50, 51, 52, 53, 54]]
    assert shared_prefix_length(prompts) == 6 and shared_prefix_length([[1, 2], [1, 2]]) == 1
    stops = {tok.pad_token_id, tok.eos_token_id, model.generation_config.eos_token_id}
    got = generate_with_shared_prefix(model, tok, prompts, max_new_tokens=7, batch_size=3, progress=False)
    assert got == [_hand_greedy(model, p, 7, stops) for p in prompts]
    assert generate_batched(model, tok, prompts, max_new_tokens=7, batch_size=3, progress=False) == got


def test_shared_prefix_decoding_ignores_a_checkpoints_generation_knobs(tok):
    """A generation_config.json's repetition penalty, n-gram ban or top-k (Qwen ships such) does not change
    what evaluation decodes: greedy stays argmax, sampling stays softmax(logits / T) over the whole vocabulary."""
    from circuit_peft.evaluate.generation import generate_with_shared_prefix

    model = tiny_model("llama", vocab_size=len(tok)).eval()
    prompts = [[11, 12, 13, 14, 20], [11, 12, 13, 14, 30, 31], [11, 12, 13, 14, 40]]
    greedy = generate_with_shared_prefix(model, tok, prompts, 12, progress=False)
    torch.manual_seed(3)
    sampled = generate_with_shared_prefix(model, tok, prompts, 12, temperature=3.0, progress=False)
    model.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=1, top_k=1, min_length=40)
    assert generate_with_shared_prefix(model, tok, prompts, 12, progress=False) == greedy
    torch.manual_seed(3)
    assert generate_with_shared_prefix(model, tok, prompts, 12, temperature=3.0, progress=False) == sampled
    assert any(len(set(g)) < len(g) for g in greedy)  # some completion repeats a token: the knobs would matter


@pytest.mark.slow
def test_shared_prefix_greedy_stop_strings(smollm2):
    """Decoding stops right after the token that completes a stop string, like model.generate's."""
    model, tok = smollm2
    prompts = [tok(f"Question: What is {a} + {b}?\nAnswer: {a} + {b} = {a + b}.\n\n").input_ids for a, b in
               [(2, 3), (14, 25)]]
    got = generate_batched(model, tok, prompts, max_new_tokens=24, stop_strings=["\nQuestion:"], progress=False)
    for new in got:  # where the stop string appears, decoding stopped right after it
        text = tok.decode(new)
        assert "\nQuestion:" not in text or text.endswith("\nQuestion:")
    for p, new in zip(prompts, got):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                 do_sample=False, stop_strings=["\nQuestion:"], tokenizer=tok,
                                 pad_token_id=tok.pad_token_id)
        row = out[0, len(p):].tolist()
        assert new == row[: next((j for j, t in enumerate(row) if t in (tok.pad_token_id, tok.eos_token_id)),
                                 len(row))]


def test_shared_prefix_sampling_is_seeded_and_tends_to_greedy_at_low_temperature(tok):
    from circuit_peft.evaluate.generation import generate_with_shared_prefix

    model = tiny_model("llama", vocab_size=len(tok)).eval()
    prompts = [[11, 12, 13, 20], [11, 12, 13, 30, 31]] * 3
    greedy = generate_with_shared_prefix(model, tok, prompts, 6, progress=False)

    def sample(t, seed):
        torch.manual_seed(seed)
        return generate_with_shared_prefix(model, tok, prompts, 6, temperature=t, progress=False)

    assert sample(1e-4, 0) == greedy
    assert sample(5.0, 1) == sample(5.0, 1) != greedy
