"""CircuitSeer data selection: reasoning heads, attention-variance scores, soft-sampled subsets,
a training sampler, and the baselines (random, length-matched random, max-loss, IFD)."""

from .api import SelectionResult, plot_scores, select_data
from .baselines import (
    METHODS, ResponseLossScorer, ifd_indices, ifd_subset, length_matched_indices, length_matched_subset,
    max_loss_indices, max_loss_subset, prompt_lengths, random_indices, random_subset,
)
from .heads import DEFAULT_HEAD_FRACTION, ReasoningHeads, find_reasoning_heads, top_heads
from .sampler import CircuitSeerSampler, CircuitSeerSamplerMixin, use_sampler
from .sampling import DEFAULT_TAU, gumbel_top_k, select_indices, select_subset, subset_size, zscore
from .scoring import SCORE_COLUMN, CircuitSeerScorer, attention_variance, debias_length, length_spearman

__all__ = [
    "SelectionResult", "plot_scores", "select_data",
    "METHODS", "ResponseLossScorer", "ifd_indices", "ifd_subset", "length_matched_indices", "length_matched_subset",
    "max_loss_indices", "max_loss_subset", "prompt_lengths", "random_indices", "random_subset",
    "DEFAULT_HEAD_FRACTION", "DEFAULT_TAU", "SCORE_COLUMN", "CircuitSeerSampler", "CircuitSeerScorer",
    "ReasoningHeads", "attention_variance", "debias_length", "find_reasoning_heads", "gumbel_top_k", "length_spearman",
    "select_indices", "select_subset", "subset_size", "top_heads", "use_sampler", "zscore", "CircuitSeerSamplerMixin",
]
