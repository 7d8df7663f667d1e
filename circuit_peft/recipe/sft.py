"""Supervised fine-tuning on gold solutions, with the final answer's tokens weighted (pivotal SFT).

The one SFT recipe of the library: ``circuit-peft train``, the benchmarks and the examples all
call :func:`train_sft`, so a circuit, a LoRA and full fine-tuning are trained the same way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..evaluate.answers import AnswerFormat, NumberAnswer
from ..taskdata.prompts import PromptStyle, row_completion, row_prompt


@dataclass
class SFTSettings:
    """How :func:`train_sft` trains. ``pivotal_weight``: loss weight of the final answer's tokens
    (1 = plain SFT). ``learning_rate`` per optimizer step (AdamW, cosine schedule)."""

    learning_rate: float = 1e-3
    epochs: float = 3.0
    batch_size: int = 8
    pivotal_weight: float = 5.0
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("learning_rate", "epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SFTSettings.{name} must be > 0, got {getattr(self, name)!r}")
        if isinstance(self.batch_size, bool) or int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"SFTSettings.batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.pivotal_weight < 0:
            raise ValueError(f"SFTSettings.pivotal_weight must be >= 0, got {self.pivotal_weight!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_spans(completion: str, answer: str) -> list[list[int]]:
    """Char spans ``[start, stop)`` of every occurrence of ``answer`` in ``completion`` as a whole number."""
    pattern = r"(?<![\d.])" + re.escape(answer) + r"(?!\d|\.\d)"
    return [[m.start(), m.end()] for m in re.finditer(pattern, completion)]


def gold_examples(
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[dict[str, Any]],
    style: PromptStyle = "chat",
    shots: Sequence[Any] | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    answer_format: AnswerFormat | None = None,
) -> list[dict[str, Any]]:
    """``{prompt, completion, pivotal_spans, add_eos}`` per problem: the evaluation prompt, the gold
    completion (:func:`~circuit_peft.taskdata.prompts.row_completion`: a GSM8K ``#### n`` written as
    ``The answer is n.``; a TRL completion as TRL trains on it), the spans of the gold answer in it (read
    by ``answer_format``, default :class:`NumberAnswer`; none when it reads no gold) and whether EOS follows.
    Rows are ``question``/``answer`` rows or TRL prompt/completion rows
    (:func:`~circuit_peft.evaluate.formats.task_rows`)."""
    fmt = answer_format or NumberAnswer(answer_field)
    out = []
    for i, row in enumerate(problems):
        fields = (question_field, answer_field) if question_field in row or "prompt" not in row else ("completion",)
        for field in fields:
            if field not in row:
                raise ValueError(f"problem {i} has no {field!r} field (fields: {sorted(row)})")
        completion, add_eos = row_completion(tokenizer, row, style, question_field, answer_field)
        gold = fmt.gold(row)
        spans_of = getattr(fmt, "spans", None) or answer_spans
        spans = spans_of(completion, gold) if gold is not None else []
        out.append({"prompt": row_prompt(tokenizer, row, style, shots, question_field), "completion": completion,
                    "pivotal_spans": spans, "add_eos": add_eos})
    return out


def pivotal_dataset(tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict[str, Any]], pivotal_weight: float,
                    style: PromptStyle = "chat"):
    """The tokenised training set of :func:`train_sft` (chat prompts carry their special tokens)."""
    from ..taskdata.examples import build_pivotal_dataset

    data = build_pivotal_dataset(examples, tokenizer, pivotal_weight=pivotal_weight,
                                 add_special_tokens=(style != "chat"))
    return data.remove_columns([c for c in data.column_names if c == "completion_mask"])


def train_sft(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, Any]],
    settings: SFTSettings,
    output_dir: str,
    style: PromptStyle = "chat",
    use_cpu: bool | None = None,
    progress: bool = False,
    callbacks: Sequence[Any] = (),
) -> nn.Module:
    """Train ``model`` (a PEFT model or a plain one for full fine-tuning) on ``examples`` from
    :func:`gold_examples` with ``transformers.Trainer`` and pivotal weights; returns it in eval mode.
    ``progress``: the Trainer's progress bar (steps, time left). ``callbacks``: ``TrainerCallback`` objects
    (e.g. measurements at checkpoints, :mod:`circuit_peft.compare.grid`). ``use_cpu`` (None: whether the model
    is on the CPU) keeps the Trainer from moving a CPU model to a GPU.

    Under ``torchrun`` / ``accelerate launch`` the Trainer trains data-parallel; ``settings.batch_size`` stays
    the batch of one optimizer step (each of the N processes takes ``batch_size / N`` rows of it), so the
    steps and the result are those of one process. The model's dtype is kept (bfloat16: no autocast; the
    adapter's weights, their gradients and AdamW's state are float32); a float16 model on a GPU trains with
    ``fp16=True`` (autocast and loss scaling, as PEFT's LoRA recipes do)."""
    import torch
    from transformers import TrainingArguments

    from ..batching import model_device
    from ..cca.trainers import PivotalTrainer

    data = pivotal_dataset(tokenizer, examples, settings.pivotal_weight, style)
    on_cpu = model_device(model).type == "cpu" if use_cpu is None else use_cpu
    trainable = [p for p in model.parameters() if p.requires_grad]
    half = any(p.dtype == torch.float16 for p in model.parameters()) and all(p.dtype == torch.float32 for p in trainable)
    args = TrainingArguments(
        output_dir=output_dir, num_train_epochs=settings.epochs,
        per_device_train_batch_size=per_process_batch_size(settings.batch_size),
        learning_rate=settings.learning_rate, lr_scheduler_type="cosine", weight_decay=settings.weight_decay,
        logging_steps=10**6, save_strategy="no", report_to=[], seed=settings.seed, disable_tqdm=not progress,
        use_cpu=on_cpu, fp16=half and not on_cpu,
    )
    PivotalTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                   callbacks=list(callbacks) or None).train()
    return model.eval()


def per_process_batch_size(batch_size: int) -> int:
    """The rows each of the launcher's processes takes of a ``batch_size`` optimizer step; refuses a batch
    that does not split evenly (the step would differ from one process's)."""
    from ..distributed import world_size
    from ..errors import located

    world = world_size()
    if batch_size % world:
        raise located("--batch-size", f"{batch_size} rows per optimizer step do not split over {world} processes: "
                                      f"give a multiple of {world}")
    return batch_size // world


__all__ = ["SFTSettings", "answer_spans", "gold_examples", "pivotal_dataset", "per_process_batch_size", "train_sft"]
