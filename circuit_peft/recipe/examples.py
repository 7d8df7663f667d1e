"""The task rows as the stages of :func:`~circuit_peft.recipe.pipeline.train` consume them: gold solutions as
SFT examples, tokenised SFT rows (what SFT trains on and the locators scan: task data, never converted back into
probe rows), their probe batches, and the gold-solution loss that breaks rate ties."""

from __future__ import annotations

from typing import Any

from .config import TrainConfig, checker
from .sft import gold_examples, pivotal_dataset


def training_examples(tokenizer, rows, style: str, cfg: TrainConfig) -> list[dict[str, Any]]:
    """``rows``' gold solutions as SFT examples in ``style``, with ``cfg``'s shots, fields and checker."""
    return gold_examples(tokenizer, rows, style, cfg.shots, cfg.question_field, cfg.answer_field, checker(cfg))


def _gold_sft_rows(tokenizer, rows, style: str, cfg: TrainConfig) -> list[dict[str, Any]]:
    """``rows``' gold solutions tokenised as pivotal SFT trains on them (``input_ids``, ``labels``, weights)."""
    return pivotal_dataset(tokenizer, training_examples(tokenizer, rows, style, cfg), cfg.sft.pivotal_weight, style)


def _gold_solution_batches(model, tokenizer, rows, style: str, cfg: TrainConfig) -> list[dict]:
    """``rows``' gold solutions as probe batches (prompt, then solution), tokenised as SFT trains on them (the
    tokenised SFT rows themselves: :func:`~circuit_peft.taskdata.examples.encode_probe` reads their labels)."""
    from ..locate.ablation import probe_batches

    return probe_batches(model, tokenizer, _gold_sft_rows(tokenizer, rows, style, cfg), cfg.eval_batch_size)


def _gold_solution_loss(model, batches: list[dict]) -> float:
    """Mean loss of the gold solutions' tokens in ``batches`` (nats per token, unweighted), in eval mode:
    what breaks a tie between learning rates of equal validation accuracy."""
    from ..evaluate.generation import eval_mode
    from ..locate.ablation import solution_losses

    with eval_mode(model):
        return solution_losses(model, batches)


# public names: the stages and the benchmarks read them
gold_sft_rows = _gold_sft_rows
gold_solution_batches, gold_solution_loss = _gold_solution_batches, _gold_solution_loss

__all__ = ["gold_sft_rows", "gold_solution_batches", "gold_solution_loss", "training_examples"]
