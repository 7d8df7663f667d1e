"""Baseline selectors with the same API as CircuitSeer: random, length-matched random, max-loss, IFD.

Every selector has an index form (``*_indices`` -> sorted pool indices) and a subset form
(``*_subset`` -> ``datasets.Dataset``), like :func:`select_indices` / :func:`select_subset`.

* random: a uniform draw of ``fraction`` of the pool (seeded).
* length-matched random: a uniform draw inside length bins (pool quantiles) with as many
  examples per bin as a reference subset has, so its length profile matches (e.g. CircuitSeer's).
* max-loss: the examples whose response has the highest mean per-token loss under the
  reference model (``L(answer | question)``).
* IFD (instruction-following difficulty): ``L(answer | question) / L(answer)``; examples with
  IFD > 1 (the question does not help) are dropped and the highest remaining IFD are kept.

Losses come from :class:`ResponseLossScorer` (batched, right-padded, cached and split across
processes like the CircuitSeer scores). ``L(answer)`` is measured after a single start token
(BOS, or EOS when the tokenizer has no BOS; our choice) so every answer token is scored in both
terms of the ratio.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..batching import pad_token_id
from ..taskdata.collate import PivotalCollator
from ..taskdata.examples import answer_example
from ..taskdata.losses import mean_label_losses
from .cache import ScoreCache, model_fingerprint, score_in_chunks
from .data import context_length, row_texts, texts_fingerprint
from .sampling import select_indices, subset_size

logger = logging.getLogger(__name__)

METHODS = ("circuitseer", "random", "length-matched", "max-loss", "ifd")


# ----- index selectors ---------------------------------------------------------------------------------


def random_indices(n: int, fraction: float | None = 0.1, seed: int = 0, k: int | None = None) -> np.ndarray:
    """Sorted indices of a uniform random subset of a pool of ``n``."""
    k = subset_size(n, fraction, k)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def length_matched_indices(
    lengths: Sequence[int], reference: Sequence[int], seed: int = 0, n_bins: int = 10
) -> np.ndarray:
    """A random subset with the length profile of ``reference`` (indices into the same pool).

    The pool is cut into ``n_bins`` length bins at its quantiles; from each bin as many examples
    are drawn uniformly (from the whole bin) as ``reference`` has in it.
    """
    lengths = np.asarray(lengths, dtype=float)
    reference = np.unique(np.asarray(reference, dtype=int))
    if len(reference) == 0:
        raise ValueError("the reference subset is empty")
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, n_bins + 1)[1:-1]))
    bins = np.searchsorted(edges, lengths, side="right")
    rng = np.random.default_rng(seed)
    out = []
    for b in np.unique(bins[reference]):
        members = np.flatnonzero(bins == b)
        need = int((bins[reference] == b).sum())
        out.append(rng.choice(members, size=need, replace=False))
    return np.sort(np.concatenate(out))


def max_loss_indices(losses: Sequence[float], fraction: float | None = 0.1, k: int | None = None) -> np.ndarray:
    """Sorted indices of the examples with the highest response loss (hard top-k)."""
    return select_indices(losses, fraction=fraction, tau=0.0, k=k)


def ifd_indices(ifd: Sequence[float], fraction: float | None = 0.1, k: int | None = None) -> np.ndarray:
    """Sorted indices of the highest IFD scores among those <= 1 (IFD > 1 is dropped).

    If fewer than ``k`` examples have IFD <= 1, all of them are returned (with a warning).
    """
    ifd = np.asarray(ifd, dtype=float)
    k = subset_size(len(ifd), fraction, k)
    valid = np.flatnonzero(np.isfinite(ifd) & (ifd <= 1))
    if len(valid) < k:
        logger.warning("only %d of %d examples have IFD <= 1; returning those instead of %d", len(valid), len(ifd), k)
    order = valid[np.lexsort((valid, -ifd[valid]))]
    return np.sort(order[:k])


# ----- subset forms -------------------------------------------------------------------------------------


def _as_dataset(dataset: Any) -> Any:
    import datasets

    return dataset if isinstance(dataset, datasets.Dataset) else datasets.Dataset.from_list(list(dataset))


def random_subset(dataset: Any, fraction: float | None = 0.1, seed: int = 0, k: int | None = None) -> Any:
    dataset = _as_dataset(dataset)
    return dataset.select(random_indices(len(dataset), fraction, seed, k).tolist())


def length_matched_subset(dataset: Any, lengths: Sequence[int], reference: Sequence[int], seed: int = 0,
                          n_bins: int = 10) -> Any:
    dataset = _as_dataset(dataset)
    return dataset.select(length_matched_indices(lengths, reference, seed, n_bins).tolist())


def max_loss_subset(dataset: Any, losses: Sequence[float], fraction: float | None = 0.1, k: int | None = None) -> Any:
    dataset = _as_dataset(dataset)
    return dataset.select(max_loss_indices(losses, fraction, k).tolist())


def ifd_subset(dataset: Any, ifd: Sequence[float], fraction: float | None = 0.1, k: int | None = None) -> Any:
    dataset = _as_dataset(dataset)
    return dataset.select(ifd_indices(ifd, fraction, k).tolist())


# ----- response losses ------------------------------------------------------------------------------------


class ResponseLossScorer:
    """Mean per-token loss (nats) of each row's answer under the reference model.

    ``conditional(rows)``: ``L(answer | question)``; ``unconditional(rows)``: ``L(answer)``;
    ``ifd(rows)``: their ratio. Prompts are ``prompt_template.format(**row)`` (default: the
    question field) and answers ``answer_template.format(**row)`` (default ``"\\n{answer}"``),
    tokenized separately and concatenated so the answer tokens are exactly the same in both.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        question_field: str = "question",
        answer_field: str = "answer",
        prompt_template: str | None = None,
        answer_template: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        on_long: str = "truncate",
        cache_dir: str | None = None,
        chunk_size: int = 512,
        progress: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.question_field, self.answer_field = question_field, answer_field
        self.prompt_template = prompt_template
        self.answer_template = answer_template or "\n{" + answer_field + "}"
        self.batch_size, self.on_long = batch_size, on_long
        self.max_length = max_length or context_length(model, tokenizer)
        self.cache_dir, self.chunk_size, self.progress = cache_dir, chunk_size, progress
        self.pad_id = pad_token_id(model, tokenizer)  # masked positions: any id works, this one is consistent
        start = getattr(tokenizer, "bos_token_id", None)
        self.start_id = start if start is not None else getattr(tokenizer, "eos_token_id", None)
        if self.start_id is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to start the answer-only pass of IFD")

    def _encode(self, rows: Any, with_question: bool) -> tuple[list[dict[str, list[int]]], list[str]]:
        """Each row as a tokenized example (loss on the answer, :func:`~circuit_peft.taskdata.examples.answer_example`:
        a row longer than ``max_length`` keeps its answer's start), and the texts that key the cache."""
        answers = row_texts(rows, self.answer_field, self.answer_template, what="answer")
        ans = self.tokenizer(answers, add_special_tokens=False)["input_ids"]
        if with_question:
            prompts = row_texts(rows, self.question_field, self.prompt_template, what="question")
            pre = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        else:
            prompts = [""] * len(answers)
            pre = [[self.start_id]] * len(answers)
        long_rows = []
        for i, (p, a) in enumerate(zip(pre, ans)):
            if not a:
                raise ValueError(f"row {i}: the answer field {self.answer_field!r} tokenizes to nothing")
            if len(p) + len(a) > self.max_length:
                long_rows.append(i)
                if self.on_long == "error":
                    raise ValueError(
                        f"row {i}: question + answer are {len(p) + len(a)} tokens, longer than the model's context "
                        f"of {self.max_length}; shorten them or pass on_long='truncate' (--on-long truncate)")
        if long_rows:
            logger.warning("%d rows are longer than the context of %d tokens (first: row %d); truncated",
                           len(long_rows), self.max_length, long_rows[0])
        examples = [answer_example(p, a, self.max_length) for p, a in zip(pre, ans)]
        return examples, [p + "\x01" + a for p, a in zip(prompts, answers)]

    @torch.no_grad()
    def _loss_batch(self, examples: Sequence[dict[str, list[int]]]) -> np.ndarray:
        """Mean loss (nats per answer token) of each example, right-padded into one batch: (B,)."""
        device = next(self.model.parameters()).device
        batch = PivotalCollator(pad_token_id=self.pad_id)(list(examples))
        logits = self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            use_cache=False).logits
        return mean_label_losses(logits, batch["labels"].to(device)).cpu().numpy()

    def _losses(self, rows: Any, with_question: bool) -> np.ndarray:
        examples, texts = self._encode(rows, with_question)
        seqs = [ex["input_ids"] for ex in examples]
        order_all = np.arange(len(seqs))

        def score(s: int, e: int, advance: Any) -> np.ndarray:
            idx = sorted(order_all[s:e], key=lambda i: len(seqs[i]))
            out = np.empty(e - s)
            for j in range(0, len(idx), self.batch_size):
                part = idx[j : j + self.batch_size]
                out[np.asarray(part) - s] = self._loss_batch([examples[i] for i in part])
                advance(len(part))
            return out

        cache = None
        if self.cache_dir is not None:
            key = {"model": model_fingerprint(self.model), "data": texts_fingerprint(texts), "n": len(seqs),
                   "with_question": with_question, "max_length": self.max_length, "chunk_size": self.chunk_size}
            cache = ScoreCache(self.cache_dir, "response-loss", key)
        what = "L(answer|question)" if with_question else "L(answer)"
        return score_in_chunks(len(seqs), score, self.chunk_size, cache, desc=what, progress=self.progress,
                               tokens=[len(s) for s in seqs])

    def conditional(self, rows: Any) -> np.ndarray:
        """``L(answer | question)`` per row (the max-loss score). Returns (N,)."""
        return self._losses(rows, with_question=True)

    def unconditional(self, rows: Any) -> np.ndarray:
        """``L(answer)`` per row, after one start token. Returns (N,)."""
        return self._losses(rows, with_question=False)

    def ifd(self, rows: Any, conditional: Sequence[float] | None = None) -> np.ndarray:
        """``L(answer | question) / L(answer)`` per row (reuses ``conditional`` if given)."""
        cond = np.asarray(conditional if conditional is not None else self.conditional(rows), dtype=float)
        return cond / self.unconditional(rows)


def prompt_lengths(tokenizer: Any, rows: Any, question_field: str = "question",
                   prompt_template: str | None = None) -> np.ndarray:
    """Prompt token counts (for length-matched draws and length correlations)."""
    texts = row_texts(rows, question_field, prompt_template, what="question")
    return np.array([len(x) for x in tokenizer(texts, add_special_tokens=True)["input_ids"]])


__all__ = [
    "METHODS", "ResponseLossScorer", "ifd_indices", "ifd_subset", "length_matched_indices", "length_matched_subset",
    "max_loss_indices", "max_loss_subset", "prompt_lengths", "random_indices", "random_subset",
]
