"""Batched generation and batched log-likelihood scoring (shared by accuracy, side effects and mining)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..batching import continue_after_prefix, left_pad, model_device, pad_token_id, to_device
from ..prefix import prefix_kv_cache, repeat_cache, sharable_prefix_ids, sharing_is_exact


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode (no dropout) for the block; restore its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pad_id: int) -> set[int]:
    """Token ids that end a completion: pad, the tokenizer's EOS and the generation config's EOS ids."""
    stops = {pad_id} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None and gen_cfg.eos_token_id is not None:
        extra = gen_cfg.eos_token_id
        stops |= set(extra if isinstance(extra, list) else [extra])
    return stops


@torch.no_grad()
def generate_batched(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    stop_strings: Sequence[str] | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[int]]:
    """New token ids for each prompt (greedy unless ``do_sample``), in the input order.

    Prompts are sorted by length and left-padded in batches of ``batch_size``; the returned
    completions stop at (and exclude) EOS/pad, and at the end of any ``stop_strings`` match.
    The prompts' shared prefix (e.g. system message and few-shot examples) runs once and its KV
    cache is reused for every batch (:func:`generate_with_shared_prefix`). Sampling (``do_sample``)
    draws from ``softmax(logits / temperature)`` with torch's global generator (no top-k/top-p).
    """
    return generate_with_shared_prefix(model, tokenizer, prompt_ids, max_new_tokens, batch_size,
                                       temperature if do_sample else None, stop_strings, progress, desc)


# model.generate's processing knobs at their no-op values, so that a checkpoint's generation_config.json
# (Qwen's top_k=20, repetition_penalty=1.05, ...) does not change what the evaluation decodes: greedy
# argmax, or sampling from softmax(logits / temperature) with nothing cut
_PLAIN_PROCESSING = {"num_beams": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
                     "no_repeat_ngram_size": 0, "min_length": 0, "guidance_scale": 1.0}
_PLAIN_SAMPLING = {"top_k": 0, "top_p": 1.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


@torch.no_grad()
def generate_with_shared_prefix(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    temperature: float | None = None,
    stop_strings: Sequence[str] | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[int]]:
    """Completions (new ids, cut like :func:`generate_batched`; greedy when ``temperature`` is None,
    else sampled at ``temperature``) with the shared prefix run once.

    The prefix every prompt starts with (:func:`~circuit_peft.prefix.sharable_prefix_ids`) goes through the
    model once; each batch copies its KV cache and ``model.generate`` continues it with the rest of its prompts,
    padded between prefix and rest (the attention mask gives every row its own positions, so padding changes
    nothing; past a sliding attention window the prefix is not shared). Decoding stops when every row has stopped.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    pad_id = pad_token_id(None, tokenizer)
    stops = _stop_ids(model, tokenizer, pad_id)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    out: list[list[int]] = [[] for _ in prompt_ids]
    device = model_device(model)
    decoding = {**_PLAIN_PROCESSING, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id,
                "eos_token_id": sorted(stops), "do_sample": temperature is not None}
    if temperature is not None:
        decoding.update(_PLAIN_SAMPLING, temperature=temperature)
    if stop_strings:
        decoding.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    with eval_mode(model):
        longest = max(len(p) for p in prompt_ids) + max_new_tokens  # judged as decoding runs: in eval mode
        prefix = sharable_prefix_ids(model, prompt_ids, slots=longest)
        prefix_cache = prefix_kv_cache(model, torch.tensor([prefix], device=device)) if prefix else None
        bar = tqdm(total=len(order), desc=desc, disable=not progress, leave=False)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = _generate_batch(model, [list(prompt_ids[i][len(prefix):]) for i in idx], prefix, prefix_cache,
                                   pad_id, decoding)
            for i, row in zip(idx, rows):
                out[i] = row[: next((j for j, t in enumerate(row) if t in stops), len(row))]
            bar.update(len(idx))
        bar.close()
    return out


def _generate_batch(model, rests: list[list[int]], prefix: list[int], prefix_cache, pad_id: int,
                    decoding: dict) -> list[list[int]]:
    """``model.generate``'s new ids for one batch of prompt rests after the cached ``prefix`` (uncut)."""
    device = model_device(model)
    batch = to_device(continue_after_prefix(left_pad(rests, pad_id), len(prefix)), device)
    ids = batch["input_ids"]
    if prefix_cache is not None:  # generate skips the ids its cache already holds
        ids = torch.cat([torch.tensor([prefix], device=device).expand(len(rests), -1), ids], 1)
        decoding = {**decoding, "past_key_values": repeat_cache(prefix_cache, len(rests))}
    new = model.generate(input_ids=ids, attention_mask=batch["attention_mask"], **decoding)
    return new[:, ids.shape[1]:].tolist()


@torch.no_grad()
def continuation_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "score",
    shared_prefix: Sequence[int] | None = None,
) -> list[float]:
    """Sum of ``log p(continuation | context)`` (nats) for each pair of token-id lists.

    Pairs that share a context and whose continuations are all one token are scored with one
    forward of the context (its next-token distribution); other pairs run context+continuation.
    Batches are left-padded with explicit position ids (so padding changes nothing) and only the
    needed last positions go through the LM head. ``shared_prefix``: ids that every context starts
    with (e.g. few-shot examples); they run once and their KV cache is reused for every batch.
    """
    if len(contexts) != len(continuations):
        raise ValueError("contexts and continuations must have the same length")
    # scoring runs in eval mode; where sharing would not be exact the contexts run whole
    longest = max((len(c) + len(t) for c, t in zip(contexts, continuations)), default=0)
    prefix = list(shared_prefix or []) if sharing_is_exact(model, in_eval=True, slots=longest) else []
    pad_id = pad_token_id(None, tokenizer)
    device = model_device(model)
    scores = [0.0] * len(contexts)
    single: dict[tuple[int, ...], list[int]] = {}
    jobs: list[tuple[list[int], list[int]]] = []  # (sequence after the prefix, pair indices scored from it)
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        if not cont or len(ctx) <= len(prefix):
            raise ValueError(f"pair {i}: the continuation and the context after the shared prefix must be non-empty")
        if prefix and list(ctx[: len(prefix)]) != prefix:
            raise ValueError(f"pair {i}: context does not start with shared_prefix")
        if len(cont) == 1:
            single.setdefault(tuple(ctx[len(prefix) :]), []).append(i)
        else:
            jobs.append((list(ctx[len(prefix) :]) + list(cont), [i]))
    jobs += [(list(ctx), idx) for ctx, idx in single.items()]
    jobs.sort(key=lambda j: -len(j[0]))
    with eval_mode(model):
        prefix_cache = None
        if prefix:
            prefix_cache = prefix_kv_cache(model, torch.tensor([prefix], device=device))
        bar = tqdm(total=len(contexts), desc=desc, disable=not progress, leave=False)
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            batch = to_device(continue_after_prefix(left_pad([seq for seq, _ in chunk], pad_id), len(prefix)), device)
            kwargs: dict = {"use_cache": False}
            if prefix_cache is not None:
                kwargs = {"past_key_values": repeat_cache(prefix_cache, len(chunk)), "use_cache": True}
            keep = max(len(continuations[idx[0]]) + 1 if len(seq) > len(contexts[idx[0]]) - len(prefix) else 1
                       for seq, idx in chunk)
            logits = model(**batch, logits_to_keep=keep, **kwargs).logits
            logp = torch.log_softmax(logits[:, -keep:].float(), dim=-1)  # position -1 = last real token
            for row, (seq, idx) in enumerate(chunk):
                for i in idx:
                    cont = list(continuations[i])
                    if len(cont) == 1 and len(seq) == len(contexts[i]) - len(prefix):
                        scores[i] = float(logp[row, -1, cont[0]])
                    else:  # logits at -len(cont)-1 .. -2 predict the continuation tokens
                        pos = torch.arange(keep - len(cont) - 1, keep - 1, device=logp.device)
                        scores[i] = float(logp[row, pos, torch.tensor(cont, device=logp.device)].sum())
                bar.update(len(idx))
        bar.close()
    return scores


@torch.no_grad()
def last_token_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[Sequence[int]],
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Next-token logits after each context, shape ``(len(contexts), vocab)`` (float32, CPU).

    Left-padded batches with explicit position ids; only the last position goes through the LM head.
    """
    if not contexts:
        raise ValueError("no contexts to score")
    pad_id = pad_token_id(None, tokenizer)
    device = model_device(model)
    rows: list[torch.Tensor] = []
    with eval_mode(model):
        for start in tqdm(range(0, len(contexts), batch_size), desc="logits", disable=not progress, leave=False):
            batch = to_device(left_pad(contexts[start : start + batch_size], pad_id), device)
            out = model(**batch, logits_to_keep=1, use_cache=False)
            rows.append(out.logits[:, -1].float().cpu())
    return torch.cat(rows)
