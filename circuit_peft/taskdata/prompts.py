"""Prompts: a chat-template prompt or a plain few-shot prompt for a question, or a TRL row's own prompt.

Shared by evaluation (``accuracy``), SFT (``recipe.sft``) and pivotal-token mining (``cca.mining``) so
that a model is trained, mined and measured with the same prompt. :func:`row_prompt` and
:func:`row_completion` turn one row of any format :mod:`~circuit_peft.evaluate.formats` reads into text:
``question``/``answer`` rows through :func:`build_prompt`, TRL ``prompt``/``completion`` rows as TRL does
(conversational ones through :func:`trl.data_utils.maybe_apply_chat_template`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

PromptStyle = Literal["chat", "fewshot", "text"]
# "text": the prompt as written (TRL's prompt/completion strings); the tokenizer adds its special tokens
PROMPT_STYLES: tuple[str, ...] = ("chat", "fewshot", "text")

# Our choice: two short worked problems whose solutions end with "The answer is N." (the phrase
# ``extract_model_answer`` looks for first).
DEFAULT_SHOTS: tuple[dict[str, str], ...] = (
    {
        "question": "Tom has 3 apples and buys 5 more. How many apples does he have now?",
        "answer": "Tom has 3 + 5 = 8 apples. The answer is 8.",
    },
    {
        "question": "A box holds 12 pens. Sara takes out 4 pens. How many pens are left in the box?",
        "answer": "There are 12 - 4 = 8 pens left. The answer is 8.",
    },
)

_CALCULATOR_RE = re.compile(r"<<[^>]*>>")
_GSM8K_FINAL_RE = re.compile(r"\n?####\s*(.+?)\s*$")


def format_gsm8k_solution(answer: str) -> str:
    """A GSM8K answer as a plain solution: calculator notes ``<<3*4=12>>`` removed and the final
    ``#### n`` line written as ``The answer is n.`` (the form ``extract_model_answer`` reads)."""
    text = _CALCULATOR_RE.sub("", answer)
    return _GSM8K_FINAL_RE.sub(lambda m: f"\nThe answer is {m.group(1)}.", text).strip()


def _shot_pair(shot: Any) -> tuple[str, str]:
    if isinstance(shot, Mapping):
        if "question" not in shot or "answer" not in shot:
            raise ValueError(f"a shot needs 'question' and 'answer' fields, got {sorted(shot)}")
        question, answer = shot["question"], shot["answer"]
    elif isinstance(shot, Sequence) and not isinstance(shot, str) and len(shot) == 2:
        question, answer = shot
    else:
        raise ValueError(f"a shot is a {{'question', 'answer'}} dict or a (question, answer) pair, got {shot!r}")
    answer = str(answer)
    return str(question), format_gsm8k_solution(answer) if "####" in answer else answer


def build_prompt(
    tokenizer: PreTrainedTokenizerBase | None,
    question: str,
    style: PromptStyle = "chat",
    shots: Sequence[Any] | None = None,
    system: str | None = None,
    instruction: str | None = None,
) -> str:
    """The prompt text for one ``question``.

    - ``style="chat"``: the tokenizer's chat template with the generation prompt; ``shots`` (default
      none) become earlier user/assistant turns; ``system`` replaces the template's default system
      message if given.
    - ``style="fewshot"``: ``"Question: ...\\nAnswer: ...\\n\\n"`` per shot (default
      :data:`DEFAULT_SHOTS`), then ``"Question: {question}\\nAnswer:"``. ``tokenizer`` may be None.

    - ``style="text"``: the question as written (no template, no shots).

    Shots are ``{"question", "answer"}`` dicts (GSM8K ``#### n`` answers are reformatted) or pairs.
    ``instruction`` (e.g. ``"End with 'The answer is N.'"``) is appended to the question.
    Tokenize the result with :func:`encode_prompts` (chat templates already hold special tokens).
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    text = question.strip() if instruction is None else f"{question.strip()} {instruction.strip()}"
    if style == "text":
        return question if instruction is None else f"{question.rstrip()} {instruction.strip()}"
    if style == "fewshot":
        pairs = [_shot_pair(s) for s in (DEFAULT_SHOTS if shots is None else shots)]
        blocks = [f"Question: {q.strip()}\nAnswer: {a.strip()}\n\n" for q, a in pairs]
        return "".join(blocks) + f"Question: {text}\nAnswer:"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("style='chat' needs a tokenizer with a chat template; use style='fewshot' for base models")
    messages: list[dict[str, str]] = [] if system is None else [{"role": "system", "content": system}]
    for q, a in (_shot_pair(s) for s in (shots or ())):
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def default_prompt_style(tokenizer: PreTrainedTokenizerBase | None, log: Any = None) -> PromptStyle:
    """``"chat"`` when the tokenizer has a chat template, else ``"fewshot"`` (base models); ``log``
    (e.g. ``print``) receives one line when few-shot is chosen."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return "chat"
    if log is not None:
        log("the tokenizer has no chat template: using the few-shot prompt style (Question: ... Answer: ...)")
    return "fewshot"


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], style: PromptStyle) -> list[list[int]]:
    """Token ids of prompts made by :func:`build_prompt` (no padding).

    Chat prompts already carry the template's special tokens, so none are added; few-shot and
    text prompts get the tokenizer's usual ones (e.g. a BOS token), as TRL tokenizes non-chat prompts.
    """
    enc = tokenizer(list(prompts), add_special_tokens=(style != "chat"))
    return [list(ids) for ids in enc["input_ids"]]


def _templated(tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any]) -> dict[str, str]:
    """TRL's text of a conversational prompt/completion row (prompt with the generation prompt)."""
    from trl.data_utils import maybe_apply_chat_template

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational rows need a tokenizer with a chat template; this one has none")
    example = {k: row[k] for k in ("prompt", "completion") if k in row}
    return maybe_apply_chat_template(example, tokenizer)


def _is_trl_row(row: Mapping[str, Any], question_field: str) -> bool:
    return question_field not in row and "prompt" in row


def row_prompt(
    tokenizer: PreTrainedTokenizerBase | None,
    row: Mapping[str, Any],
    style: PromptStyle = "chat",
    shots: Sequence[Any] | None = None,
    question_field: str = "question",
    system: str | None = None,
    instruction: str | None = None,
) -> str:
    """The prompt text of one row: a TRL ``prompt`` (a string as written; turns through TRL's chat
    template, with the generation prompt), else :func:`build_prompt` of ``row[question_field]``."""
    if _is_trl_row(row, question_field):
        prompt = row["prompt"]
        if isinstance(prompt, str):
            return prompt if instruction is None else f"{prompt.rstrip()} {instruction.strip()}"
        return _templated(tokenizer, row)["prompt"]
    if question_field not in row:
        raise ValueError(f"row has no {question_field!r} field and no 'prompt' (fields: {sorted(row)}); "
                         "pass question_field=...")
    return build_prompt(tokenizer, row[question_field], style, shots, system=system, instruction=instruction)


def row_completion(
    tokenizer: PreTrainedTokenizerBase | None,
    row: Mapping[str, Any],
    style: PromptStyle = "chat",
    question_field: str = "question",
    answer_field: str = "answer",
) -> tuple[str, bool]:
    """``(text, add_eos)``: the gold completion of one row as SFT trains on it, and whether EOS follows.

    ``question``/``answer`` rows: the answer as a solution (GSM8K ``#### n`` written ``The answer is n.``;
    a leading space in the few-shot style), then EOS. TRL rows as TRL's ``SFTTrainer`` tokenizes them:
    a completion string, then EOS unless it ends with it; completion turns through the chat template
    (its end-of-turn text ends them; no EOS added)."""
    if _is_trl_row(row, question_field):
        completion = row["completion"]
        if isinstance(completion, str):
            eos = getattr(tokenizer, "eos_token", None)
            return completion, not (eos and completion.endswith(eos))
        return _templated(tokenizer, row)["completion"], False
    text = format_gsm8k_solution(str(row[answer_field]))
    return (" " + text if style == "fewshot" else text), True


def build_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    style: PromptStyle = "chat",
    shots: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[int]:
    """:func:`build_prompt` followed by :func:`encode_prompts` for one question."""
    return encode_prompts(tokenizer, [build_prompt(tokenizer, question, style, shots, **kwargs)], style)[0]
