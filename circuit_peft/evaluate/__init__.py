"""Evaluation: answer checking, prompts, held-out accuracy and side effects (MMLU, TruthfulQA, KL)."""

from .accuracy import AccuracyResult, completion_loss, evaluate_accuracy  # noqa: F401
from .answers import (  # noqa: F401
    ANSWER_CHECKERS, ChoiceAnswer, ExactAnswer, NoAnswer, NumberAnswer, answer_checker, extract_gsm8k_gold,
    extract_model_answer, is_correct,
)
from .formats import task_rows  # noqa: F401
from .data import load_gsm8k, load_mmlu, load_text, load_truthfulqa  # noqa: F401
from ..taskdata.prompts import build_prompt, build_prompt_ids, row_completion, row_prompt  # noqa: F401
from .side_effects import mean_kl, mmlu_accuracy, side_effects, truthfulqa_mc1  # noqa: F401
