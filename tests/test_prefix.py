"""circuit_peft.prefix: the one rule for running a shared prompt prefix once, asked by every user."""

import types

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, get_peft_model

from circuit_peft.evaluate.generation import generate_with_shared_prefix
from circuit_peft.models import tiny_model
from circuit_peft.prefix import sharable_prefix_ids, sharable_prefix_length, sharing_is_exact


class _Tok:
    """The two ids decoding reads from a tokenizer."""

    pad_token_id = 0
    eos_token_id = 1


PREFIX = [11, 12, 13, 14, 15, 16]
PROMPTS = [PREFIX + [20, 21, 22], PREFIX + [30], PREFIX + [40, 41]]


def test_sharing_is_exact_only_where_the_rows_compute_what_they_would_whole():
    plain = tiny_model("llama")
    assert sharing_is_exact(plain)
    dropped = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    assert not sharing_is_exact(dropped.train()) and sharing_is_exact(dropped.eval())  # dropout acts in training
    assert sharing_is_exact(dropped.train(), in_eval=True)  # rows that will run in eval mode (the ablation scan)
    prefix_tuned = get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not sharing_is_exact(prefix_tuned.eval())  # its own key/value prefix
    checkpointed = tiny_model("llama")
    checkpointed.gradient_checkpointing_enable()
    assert not sharing_is_exact(checkpointed)


def test_sharable_prefix_needs_two_rows_the_length_and_an_exact_model():
    model = tiny_model("llama")
    assert sharable_prefix_ids(model, PROMPTS) == PREFIX
    assert sharable_prefix_ids(model, PROMPTS, min_length=7) == []
    assert sharable_prefix_ids(model, PROMPTS[:1]) == [] and sharable_prefix_ids(None, PROMPTS) == PREFIX
    dropped = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    assert sharable_prefix_ids(dropped.train(), PROMPTS) == []
    ids = torch.tensor([p[:7] for p in PROMPTS])
    assert sharable_prefix_length(model, ids, None, limit=4) == 4  # never past the first scored position
    assert sharable_prefix_length(model, ids, None, limit=10, min_length=7) == 0
    assert sharable_prefix_length(model, ids[:1], None, limit=10) == 0


def test_decoding_a_prefix_tuned_model_runs_every_prompt_whole():
    """Prefix tuning brings its own cache: decoding does not share the prompts' prefix and gives what
    one-prompt-at-a-time model.generate gives."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    got = generate_with_shared_prefix(model, _Tok(), PROMPTS, max_new_tokens=5, batch_size=3, progress=False)
    for prompt, new in zip(PROMPTS, got):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                 do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        stops = {0, 1, model.generation_config.eos_token_id}
        assert new == row[: next((j for j, t in enumerate(row) if t in stops), len(row))]


def test_decoding_shares_the_prefix_of_a_model_left_in_training_mode():
    """Decoding runs in eval mode, where LoRA's dropout does not act: the prefix is still run once (one row of
    its 6 ids first), and the model is back in training mode afterwards."""
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, inp, _o: shapes.append(tuple(inp[0].shape)))
    try:
        got = generate_with_shared_prefix(model.train(), _Tok(), PROMPTS, max_new_tokens=3, progress=False)
    finally:
        hook.remove()
    assert shapes[0] == (1, len(PREFIX)) and model.training
    assert got == generate_with_shared_prefix(model.eval(), _Tok(), PROMPTS, max_new_tokens=3, progress=False)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_no_prefix_is_shared_past_a_sliding_window(family):
    """Rows padded between a shared prefix and their rests see fewer real tokens once the cache outgrows a sliding
    window (found by review): past the window the prefix runs with each row, and greedy decoding equals the
    rows decoded one at a time; inside it the prefix is still shared."""
    from circuit_peft.evaluate.generation import generate_with_shared_prefix
    from circuit_peft.models import tiny_model
    from circuit_peft.prefix import fits_sliding_window, sharable_prefix_ids

    model = tiny_model(family).eval()
    window = model.config.get_text_config().sliding_window
    vocab = model.config.get_text_config().vocab_size
    tok = types.SimpleNamespace(pad_token_id=vocab - 1, eos_token_id=vocab - 2)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, vocab - 3, (window - 8,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, vocab - 3, (k,), generator=g).tolist() for k in (1, 6, 2, 5, 3)]
    assert fits_sliding_window(model, window) and not fits_sliding_window(model, window + 1)
    assert sharable_prefix_ids(model, prompts, slots=window) and not sharable_prefix_ids(model, prompts, slots=window + 1)
    got = generate_with_shared_prefix(model, tok, prompts, 6, 3, progress=False)
    alone = [generate_with_shared_prefix(model, tok, [p], 6, 1, progress=False)[0] for p in prompts]
    assert got == alone
