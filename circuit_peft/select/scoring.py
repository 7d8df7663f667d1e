"""CircuitSeer stage 2: how strongly an example engages the reasoning heads.

For each example the score is the variance of each reasoning head's attention distribution over
the input (problem) tokens, averaged over the heads.

* ``query="last"`` (default): the attention row of the last prompt token;
  ``query="mean"``: the mean of the variances of every prompt row (rows with >= 2 keys).
* ``exclude_sink=True`` (default, our choice): the first position and every BOS token are left
  out and the row is renormalised over the remaining input tokens. ``False`` gives the paper's
  raw variance, which on small models mostly measures 1 / length (the sink takes the mass).
* ``length_normalized=True``: ``Var(n * a)`` (= ``n**2 Var(a)``, n = keys covered), which
  removes the 1/n^2 scale of a uniform-ish row.
* ``length_debias=True`` (default, our choice; pool-level, in :meth:`CircuitSeerScorer.score`):
  the score becomes the residual of ``log(score)`` after a least-squares fit on ``log(length)``
  over the pool (:func:`debias_length`), so examples compete with others of similar length.
  Measured on SmolLM2 the per-example score, even without the sink, still had Spearman about
  -0.9 with question length.

The attention of only the reasoning heads, only at the rows needed, is recomputed from their
own query and key states after rotary embedding (:func:`circuit_peft.interventions.capture_qk`),
with the model's scaling, grouped-query mapping, Gemma-2 logit soft-capping, sliding window, the
causal mask and the padding mask. The model keeps its attention implementation (sdpa, flash,
...), and the forward pass stops after the deepest reasoning head's layer
(:func:`circuit_peft.interventions.forward_until`): no later layers, no LM head.

Batches are right-padded, so real tokens never see padding and keep positions ``0..n-1``
exactly as when scored one by one.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..arch import get_arch
from ..interventions import capture_qk, forward_until
from ..batching import pad_batch, pad_token_id
from .cache import ScoreCache, model_fingerprint, score_in_chunks
from .data import context_length, row_texts, texts_fingerprint, tokenize_texts
from .heads import ReasoningHeads

logger = logging.getLogger(__name__)

QUERY_MODES = ("last", "mean")
SCORE_COLUMN = "circuitseer_score"


def attention_variance(
    probs: torch.Tensor, keep: torch.Tensor, renormalize: bool = True, length_normalized: bool = False
) -> torch.Tensor:
    """Variance of attention rows over the kept keys.

    ``probs`` (..., T): attention rows (softmax over all keys the model uses). ``keep`` (..., T)
    bool, broadcastable: the keys the score covers. With ``renormalize`` the kept mass is rescaled
    to sum to 1 first. Population variance over the ``n`` kept keys; ``length_normalized`` returns
    ``Var(n * a)``. Rows with no kept key give NaN. Returns (...).
    """
    keep = keep.to(probs.dtype).expand_as(probs)
    a = probs * keep
    if renormalize:
        a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    n = keep.sum(-1)
    mean = a.sum(-1) / n
    var = (((a - mean.unsqueeze(-1)) ** 2) * keep).sum(-1) / n
    if length_normalized:
        var = var * n**2
    return var


def length_spearman(scores: Sequence[float], lengths: Sequence[int]) -> float:
    """Spearman rank correlation of scores with prompt length (|rho| near 1: a length proxy)."""
    from scipy.stats import spearmanr

    s, n = np.asarray(scores, dtype=float), np.asarray(lengths, dtype=float)
    ok = np.isfinite(s)
    if ok.sum() < 3 or np.ptp(n[ok]) == 0 or np.ptp(s[ok]) == 0:
        return float("nan")
    return float(spearmanr(s[ok], n[ok]).statistic)


def debias_length(scores: Sequence[float], lengths: Sequence[int]) -> np.ndarray:
    """Residual of ``log(score)`` after a least-squares line on ``log(length)`` over the pool.

    Attention variance over n keys falls roughly like 1/n^2 whatever the head does, so raw scores
    rank short prompts first. The residual compares each example with examples of its length.
    Non-positive or NaN scores become NaN (ranked last by the samplers).
    """
    s, n = np.asarray(scores, dtype=float), np.asarray(lengths, dtype=float)
    ok = np.isfinite(s) & (s > 0) & (n > 0)
    out = np.full(s.shape, np.nan)
    y = np.log(s[ok])
    x = np.log(n[ok])
    if ok.sum() >= 3 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        y = y - (intercept + slope * x)
    out[ok] = y
    return out


def _attention_params(model: nn.Module, module: nn.Module) -> tuple[float, float | None, int | None]:
    """(scaling, logit soft-cap, sliding window) the attention module applies."""
    scaling = getattr(module, "scaling", None)
    if scaling is None:
        scaling = getattr(module, "head_dim", get_arch(model).dims.head_dim) ** -0.5
    softcap = getattr(module, "attn_logit_softcapping", None)
    if hasattr(module, "sliding_window"):
        window = module.sliding_window
    else:  # Mistral / Phi-3 keep it on the config only
        config = getattr(module, "config", None) or model.config
        window = getattr(config, "sliding_window", None)
    return float(scaling), softcap, window


class CircuitSeerScorer:
    """Score examples by the attention variance of the reasoning heads.

    Args:
        model, tokenizer: the reference model (eval mode, any attention implementation).
        heads: :class:`ReasoningHeads`, a list of ``(layer, head)``, or a heads/circuit file path.
        query: ``"last"`` (default) or ``"mean"`` (see module doc).
        exclude_sink: leave out position 0 and BOS tokens and renormalise (default True).
        length_normalized: return ``Var(n * a)`` instead of ``Var(a)``.
        length_debias: :meth:`score` returns the length-debiased pool scores (default True).
        question_field / prompt_template: what text is scored (default: the ``question`` field;
            a template like ``"Problem: {question}"`` formats the whole row).
        batch_size: examples per forward pass (sorted by length within a chunk).
        max_length: token limit (default: the model's context); ``on_long`` "truncate" or "error".
        cache_dir: folder for the resumable score cache (None: no cache); ``chunk_size`` examples
            per cache file.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        heads: ReasoningHeads | Iterable[tuple[int, int]] | str,
        query: str = "last",
        exclude_sink: bool = True,
        length_normalized: bool = False,
        length_debias: bool = True,
        question_field: str = "question",
        prompt_template: str | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        on_long: str = "truncate",
        cache_dir: str | None = None,
        chunk_size: int = 1024,
        progress: bool = True,
    ):
        if query not in QUERY_MODES:
            raise ValueError(f"query must be one of {QUERY_MODES}, got {query!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(heads, (str, bytes)) or hasattr(heads, "__fspath__"):
            heads = ReasoningHeads.load(heads, model=model)
        elif not isinstance(heads, ReasoningHeads):
            heads = ReasoningHeads.from_list(heads)
        heads.check_model(model)
        self.model, self.tokenizer, self.heads = model, tokenizer, heads
        self.arch = get_arch(model)
        self.query, self.exclude_sink, self.length_normalized = query, exclude_sink, length_normalized
        self.length_debias = length_debias
        self.question_field, self.prompt_template = question_field, prompt_template
        self.batch_size, self.on_long = batch_size, on_long
        self.max_length = max_length or context_length(model, tokenizer)
        self.cache_dir, self.chunk_size, self.progress = cache_dir, chunk_size, progress
        self.pad_id = pad_token_id(model, tokenizer)  # masked positions: any id works, this one is consistent
        self.sink_ids = {i for i in (getattr(tokenizer, "bos_token_id", None),) if i is not None}
        attn = self.arch.spec.attention_module
        layers = self.arch.layers(model)
        self._params = {l: _attention_params(model, layers[l].get_submodule(attn)) for l in heads.by_layer()}
        self.lengths: np.ndarray | None = None  # prompt token counts of the last score() call
        self.length_spearman: float | None = None  # of the returned scores
        self.per_example_length_spearman: float | None = None  # before length debiasing

    # ----- settings that change scores (cache key) --------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"heads": self.heads.heads, "query": self.query, "exclude_sink": self.exclude_sink,
                "length_normalized": self.length_normalized, "max_length": self.max_length,
                "template": self.prompt_template, "field": self.question_field}

    # ----- the core: one padded batch -----------------------------------------------------------------
    @torch.no_grad()
    def score_ids(self, ids: Sequence[Sequence[int]], advance: Any = None) -> np.ndarray:
        """Scores of tokenized prompts, batched by length (``batch_size`` per forward). Returns (N,).

        ``advance(n)``, if given, is called after each batch of ``n`` examples (progress bars)."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.full(len(ids), np.nan)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            out[idx] = self._score_batch([ids[i] for i in idx]).numpy()
            if advance is not None:
                advance(len(idx))
        return out

    def _score_batch(self, ids: list[Sequence[int]]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        B, T = len(ids), max(len(x) for x in ids)
        if min(len(x) for x in ids) == 0:
            raise ValueError("an example tokenized to zero tokens; every prompt needs at least one token")
        input_ids, mask = pad_batch(ids, self.pad_id, side="right")
        lens, pos = mask.sum(1), torch.arange(T)
        valid = mask.bool()  # (B, T) real tokens (right padding)
        sink = torch.zeros(B, T, dtype=torch.bool)
        sink[:, 0] = True
        for sid in self.sink_ids:
            sink |= input_ids == sid
        input_ids = input_ids.to(device)
        by_layer = self.heads.by_layer()
        with capture_qk(self.model, list(by_layer), self.arch) as store:
            forward_until(self.model, self.heads.deepest_layer, self.arch, input_ids=input_ids,
                          attention_mask=valid.long().to(device))
        total = torch.zeros(B)
        for layer, heads in by_layer.items():
            q, k = store[layer]
            scaling, softcap, window = self._params[layer]
            hs = torch.tensor(heads, device=q.device)
            kvs = hs // self.arch.dims.group_size
            k = k[:, kvs].float()  # (B, h, T, d)
            if self.query == "last":
                last = (lens - 1).to(q.device)
                qs = q[torch.arange(B, device=q.device)[:, None], hs[None, :], last[:, None]].float()  # (B, h, d)
                logits = torch.einsum("bhd,bhtd->bht", qs, k).cpu() * scaling
                allowed = valid.clone()
                if window is not None:
                    allowed &= pos[None, :] > (lens - 1)[:, None] - window
                keep = allowed & ~sink if self.exclude_sink else allowed
                var = self._variance(logits, allowed[:, None], keep[:, None], softcap)  # (B, h)
            else:
                logits = (q[:, hs].float() @ k.transpose(-1, -2)).cpu() * scaling  # (B, h, T, T)
                allowed = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :]  # (B, Tq, Tk)
                if window is not None:
                    allowed &= pos[None, :] > pos[:, None] - window
                keep = allowed & ~sink[:, None, :] if self.exclude_sink else allowed
                rows = valid & (keep.sum(-1) >= 2)  # (B, Tq)
                var = self._variance(logits, allowed[:, None], keep[:, None], softcap)  # (B, h, Tq)
                var = torch.where(rows[:, None], var, 0.0).sum(-1) / rows.sum(-1, keepdim=True).clamp_min(1)
                var = torch.where(rows.any(-1, keepdim=True), var, torch.nan)
            total += var.sum(-1)
        return total / len(self.heads)

    def _variance(self, logits: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor,
                  softcap: float | None) -> torch.Tensor:
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        return attention_variance(probs, keep, renormalize=self.exclude_sink,
                                  length_normalized=self.length_normalized)

    # ----- texts, datasets ------------------------------------------------------------------------------
    def prompts(self, rows: Any) -> list[str]:
        """The text scored for each row (checks the question field / template)."""
        return row_texts(rows, self.question_field, self.prompt_template, what="question")

    def tokenize(self, texts: Sequence[str], offset: int = 0) -> list[list[int]]:
        return tokenize_texts(self.tokenizer, texts, self.max_length, self.on_long, "prompt", offset=offset)

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Scores of raw prompt texts (no cache). Returns (N,)."""
        return self.score_ids(self.tokenize(texts))

    def score(self, rows: Any) -> np.ndarray:
        """Scores of every row of a ``datasets.Dataset`` / list of dicts, using the cache and all processes.

        Also sets ``self.lengths`` (prompt tokens), ``self.length_spearman`` (of the returned
        scores) and ``self.per_example_length_spearman`` (before length debiasing).
        """
        texts = self.prompts(rows)
        ids = self.tokenize(texts)  # tokenizes everything up front: bad rows fail before any scoring
        cache = None
        if self.cache_dir is not None:
            key = {"model": model_fingerprint(self.model), "data": texts_fingerprint(texts), "n": len(texts),
                   "chunk_size": self.chunk_size, **self.settings()}
            cache = ScoreCache(self.cache_dir, "circuitseer", key)
        self.lengths = np.array([len(x) for x in ids])
        scores = score_in_chunks(len(ids), lambda s, e, advance: self.score_ids(ids[s:e], advance), self.chunk_size, cache,
                                 desc="CircuitSeer scores", progress=self.progress, tokens=self.lengths)
        self.per_example_length_spearman = length_spearman(scores, self.lengths)
        if self.length_debias:
            scores = debias_length(scores, self.lengths)
        self.length_spearman = length_spearman(scores, self.lengths)
        if not math.isnan(self.length_spearman) and abs(self.length_spearman) >= 0.5:
            logger.warning("CircuitSeer scores track prompt length (Spearman %.2f): the selection is close to a "
                           "length filter on this model", self.length_spearman)
        return scores

    def score_dataset(self, dataset: Any, column: str = SCORE_COLUMN) -> Any:
        """``dataset`` with a float ``column`` of scores added (a ``datasets.Dataset``)."""
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            dataset = datasets.Dataset.from_list(list(dataset))
        scores = self.score(dataset)
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        return dataset.add_column(column, scores.tolist())
