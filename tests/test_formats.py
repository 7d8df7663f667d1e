"""Datasets as TRL users have them (``messages``, ``prompt``/``completion`` strings or turns,
``question``/``answer``) and the answer checkers ``train --answer`` chooses (number, choice, exact, none)."""

import json
import math

import pytest

from circuit_peft.errors import CircuitPeftError
from circuit_peft.evaluate.answers import (
    ANSWER_CHECKERS, ChoiceAnswer, ExactAnswer, NoAnswer, NumberAnswer, answer_checker, normalize_text,
)
from circuit_peft.evaluate.formats import data_style, row_places, task_rows

USER = {"role": "user", "content": "What is 2 + 3?"}
ASSISTANT = {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}
SYSTEM = {"role": "system", "content": "Be brief."}

ROWS = {  # one tiny conversational dataset in each format
    "messages": [{"messages": [SYSTEM, USER, ASSISTANT]}, {"messages": [{"role": "user", "content": "7 - 4?"},
                                                                       {"role": "assistant", "content": "3"}]}],
    "prompt_completion_text": [{"prompt": "Q: What is 2 + 3?\nA:", "completion": " The answer is 5."},
                               {"prompt": "Q: 7 - 4?\nA:", "completion": " 3"}],
    "prompt_completion_turns": [{"prompt": [SYSTEM, USER], "completion": [ASSISTANT]},
                                {"prompt": [{"role": "user", "content": "7 - 4?"}],
                                 "completion": [{"role": "assistant", "content": "3"}]}],
    "question_answer": [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
                        {"question": "7 - 4?", "answer": "3"}],
}
KINDS = {"messages": "conversational", "prompt_completion_text": "text", "prompt_completion_turns": "conversational",
         "question_answer": "question_answer"}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_format_is_read_and_its_gold_found(name):
    rows, kind = task_rows(ROWS[name], NumberAnswer())
    assert kind == KINDS[name]
    assert [NumberAnswer().gold(r) for r in rows] == ["5", "3"]
    if name == "messages":  # the last assistant turn is the completion, the turns before it the prompt
        assert rows[0]["prompt"] == [SYSTEM, USER] and rows[0]["completion"] == [ASSISTANT]


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("bad,match", [
    ({"messages": [USER]}, r"data.jsonl:3: field 'messages': no assistant turn"),
    ({"messages": [USER, ASSISTANT, USER]}, r"data.jsonl:3: field 'messages': the last turn is 'user'"),
    ({"messages": [USER, {"role": "assistant", "content": "  "}]}, r"data.jsonl:3: .*last assistant turn is empty"),
    ({"prompt": "Q: 1 + 1?", "completion": ""}, r"data.jsonl:3: field 'completion' is empty"),
    ({"prompt": "Q: 1 + 1?"}, r"data.jsonl:3: no 'completion' field"),
    ({"question": "1 + 1?"}, r"data.jsonl:3: no 'answer' field"),
    ({"text": "just text"}, r"data.jsonl:3: none of the fields .*'text' rows are plain language modeling"),
    ({"messages": [USER, {"role": "bot", "content": "2"}]}, r"data.jsonl:3: field 'messages', turn 1: unknown role"),
    ({"question": "1 + 1?", "answer": "two"}, r"data.jsonl:3: field 'answer': no number answer in 'two'"),
])
def test_a_bad_row_is_named_file_line_and_field(tmp_path, bad, match):
    from circuit_peft.files import read_rows

    good = json.dumps({"question": "1 + 1?", "answer": "2"}) if "question" in bad else json.dumps(ROWS["messages"][0])
    if "prompt" in bad:
        good = json.dumps(ROWS["prompt_completion_text"][0])
    path = _write(tmp_path, [good, "", json.dumps(bad)])  # the blank line 2 is skipped; the bad row is line 3
    rows = read_rows(path)
    with pytest.raises(CircuitPeftError, match=match):
        task_rows(rows, NumberAnswer(), places=row_places(path, len(rows)))


def test_one_file_holds_one_format_and_conversational_rows_need_a_chat_template():
    with pytest.raises(CircuitPeftError, match=r"training row 2: a text row among conversational rows"):
        task_rows([ROWS["messages"][0], ROWS["prompt_completion_text"][0]], NumberAnswer())

    class BaseTokenizer:  # a base model's tokenizer: no chat template
        chat_template = None

    with pytest.raises(CircuitPeftError, match="need a chat template"):
        data_style(BaseTokenizer(), "conversational", None)
    assert data_style(BaseTokenizer(), "text", None) == "text"
    assert data_style(BaseTokenizer(), "question_answer", None) == "fewshot"  # today's few-shot behaviour
    with pytest.raises(CircuitPeftError, match="--prompt-style fewshot: applies to question/answer rows"):
        data_style(BaseTokenizer(), "text", "fewshot")


# ----- answer checkers ------------------------------------------------------------------------------


def test_the_registry_names_every_checker_and_refuses_an_unknown_one():
    assert set(ANSWER_CHECKERS) == {"number", "choice", "exact", "none"}
    assert isinstance(answer_checker("choice", "label"), ChoiceAnswer) and answer_checker("choice", "label").answer_field == "label"
    with pytest.raises(CircuitPeftError, match="--answer 'letter': choose one of number, choice, exact, none"):
        answer_checker("letter")


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("B) Paris", "B"), ("(C)", "C"), ("The answer is (D).", "D"), ("Answer: A", "A"),
    ("I would pick (B) here", "B"), ("A dog is an animal.", None), ("Paris", None), ("answer: c", None),
])
def test_choice_reads_an_option_letter(text, expected):
    assert ChoiceAnswer().extract(text) == expected


def test_choice_gold_from_letter_index_or_option_text_and_listed_options():
    c = ChoiceAnswer()
    options = {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"]}
    assert c.gold({**options, "answer": 1}) == "B"  # MMLU's 0-based index
    assert c.gold({**options, "answer": "Paris"}) == "B" and c.gold({**options, "answer": "c"}) == "C"
    assert c.gold({**options, "answer": 3}) is None  # no fourth option
    prepared = c.prepare({**options, "answer": 1})
    assert prepared["question"] == "Capital of France?\n\nA) Rome\nB) Paris\nC) Oslo" and prepared["answer"] == "B"
    assert c.gold({"completion": [{"role": "assistant", "content": "The answer is C."}]}) == "C"
    assert c.spans("A) no. The answer is A", "A") == [[21, 22]]  # the last whole-word letter


def test_exact_normalizes_case_space_and_end_punctuation():
    e = ExactAnswer()
    assert normalize_text('  "New   York!" ') == "new york"
    assert e.extract("New York.\nIt is big.") == "new york" and e.extract("So the answer is: NEW york") == "new york"
    assert e.gold({"answer": " new York "}) == "new york" and e.gold({"completion": "The answer is Paris."}) == "paris"
    assert e.extract("Paris is nice") != e.gold({"answer": "Paris"})  # a whole line, not a substring
    assert e.spans("It is New York, yes", "new york") == [[6, 14]]


def test_number_reads_a_completion_and_none_checks_nothing():
    assert NumberAnswer().gold({"completion": "3 + 4 = 7. The answer is 7."}) == "7"
    assert NumberAnswer("label").gold({"label": "#### 1,200"}) == "1200"
    assert NumberAnswer().spans("The answer is 7.", "7") == [[14, 15]]
    none = NoAnswer()
    assert not none.generates and none.gold({"answer": "1"}) is None and none.extract("1") is None


def test_answer_none_refuses_what_needs_checked_answers():
    from circuit_peft.recipe import TrainConfig

    with pytest.raises(ValueError, match=r"--answer none.*--update cca"):
        TrainConfig(answer="none", update="cca")
    with pytest.raises(ValueError, match=r"--answer none.*--locate attribution"):
        TrainConfig(answer="none", locate="attribution")
    with pytest.raises(ValueError, match="answer must be one of"):
        TrainConfig(answer="letters")
    TrainConfig(answer="none", locate="ablation")  # the loss gradient and the loss-based scan need no checker


def test_the_answer_flag_reaches_the_config_and_the_row_checks():
    from circuit_peft.cli import build_parser
    from circuit_peft.commands.train import config_from_args

    args = build_parser().parse_args(["train", "--answer", "exact", "--out", "x"])
    assert config_from_args(args).answer == "exact"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--answer", "letter", "--out", "x"])


def test_mine_and_amplify_check_answers_with_the_chosen_checker():
    from circuit_peft.cli import build_parser
    from circuit_peft.commands._cca import problem_checker

    rows = [{"question": "Capital of France?", "choices": ["Rome", "Paris"], "answer": 1}]
    for command in ("mine", "amplify"):
        args = build_parser().parse_args([command, "--problems", "x.jsonl", "--answer", "choice", "--out", "o"])
        checker, prepared = problem_checker(args, rows)
        assert isinstance(checker, ChoiceAnswer) and prepared[0]["answer"] == "B" and "B) Paris" in prepared[0]["question"]
    args = build_parser().parse_args(["mine", "--problems", "x.jsonl", "--answer", "exact", "--pivot", "digit", "--out", "o"])
    with pytest.raises(CircuitPeftError, match="--pivot digit .* --answer exact"):
        problem_checker(args, rows)


def test_the_completion_loss_standard_error_is_the_ratio_estimators():
    from circuit_peft.evaluate.accuracy import ratio_mean_se

    sums, counts = [2.0, 6.0, 1.0], [1, 3, 2]
    got = ratio_mean_se(sums, counts)
    mean = 9.0 / 6.0
    resid = [s - mean * n for s, n in zip(sums, counts)]
    assert got["loss"] == pytest.approx(mean)
    assert got["stderr"] == pytest.approx(math.sqrt(sum(r * r for r in resid) / 6) / 2.0)


# ----- tokens, as TRL makes them (SmolLM2's tokenizer: it has a chat template) ------------------------


@pytest.fixture(scope="module")
def tok():
    from circuit_peft.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_format_is_tokenised_as_trl_tokenises_it(tok, name):
    """The SFT rows of each format: TRL's prompt then completion ids (chat template for turns, no EOS
    after its end of turn; EOS after a completion string), the loss on the completion only, the answer
    tokens weighted; question/answer rows as before (chat prompt, solution, EOS)."""
    from circuit_peft.taskdata.prompts import build_prompt
    from circuit_peft.recipe.sft import gold_examples, pivotal_dataset

    rows, kind = task_rows(ROWS[name], NumberAnswer())
    style = data_style(tok, kind, None)
    data = pivotal_dataset(tok, gold_examples(tok, rows, style), 5.0, style)
    row = data[0]
    if kind == "conversational":
        full = tok.apply_chat_template([SYSTEM, USER, ASSISTANT], tokenize=False)
        prompt = tok.apply_chat_template([SYSTEM, USER], tokenize=False, add_generation_prompt=True)
        expected = tok(full, add_special_tokens=False)["input_ids"]
    elif kind == "text":
        prompt = ROWS[name][0]["prompt"]
        expected = tok(prompt)["input_ids"] + tok(ROWS[name][0]["completion"], add_special_tokens=False)["input_ids"] \
            + [tok.eos_token_id]
    else:
        prompt = build_prompt(tok, "What is 2 + 3?", "chat")
        expected = tok(prompt, add_special_tokens=False)["input_ids"] \
            + tok("2 + 3 = 5\nThe answer is 5.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert row["input_ids"] == expected
    n_prompt = len(tok(prompt, add_special_tokens=(kind == "text"))["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt and all(t != -100 for t in row["labels"][n_prompt:])
    weighted = [t for t, w in zip(row["input_ids"], row["token_weights"]) if w == 5.0]
    assert weighted and {tok.decode([t]).strip() for t in weighted} == {"5"}  # the gold's tokens (each time written)


@pytest.mark.slow
def test_sft_rows_equal_the_tokens_trls_sft_trainer_makes(tok, tmp_path):
    """TRL's own SFTTrainer, given the same rows, makes the same input ids and labels as our
    SFT rows, for prompt/completion turns, prompt/completion strings and messages (as prompt/completion)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from circuit_peft.models import tiny_model
    from circuit_peft.recipe.sft import gold_examples, pivotal_dataset

    model = tiny_model("llama", vocab_size=49152)
    for name in ("prompt_completion_turns", "prompt_completion_text", "messages"):
        rows, kind = task_rows(ROWS[name], NumberAnswer())
        style = data_style(tok, kind, None)
        ours = pivotal_dataset(tok, gold_examples(tok, rows, style), 5.0, style)
        trl_rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=Dataset.from_list(trl_rows),
                             args=SFTConfig(output_dir=str(tmp_path / name), report_to=[], use_cpu=True))
        for mine, theirs in zip(ours, trainer.train_dataset):
            assert mine["input_ids"] == theirs["input_ids"], name
            assert mine["labels"] == theirs["labels"], name


# ----- the pipeline: --answer none, and train on a messages file end to end ----------------------------


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, tok):
    """A tiny random Llama with SmolLM2's tokenizer (and its chat template): the pipeline's cost, not a model's."""
    from circuit_peft.models import tiny_model

    folder = tmp_path_factory.mktemp("tiny_chat")
    tiny_model("llama", vocab_size=49152).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _arith_messages(n, seed):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": f"The answer is {a + b}."}]})
    return rows


@pytest.mark.slow
def test_answer_none_reports_held_out_loss_before_and_after(tmp_path, tiny_chat_model):
    from circuit_peft.recipe import SFTSettings, TrainConfig, train
    from circuit_peft.recipe.pipeline import summary_table

    cfg = TrainConfig(answer="none", circuit_fraction=0.5, sft=SFTSettings(epochs=3.0, learning_rate=3e-3, batch_size=4))
    logs: list[str] = []
    result = train(tiny_chat_model, _arith_messages(16, 0), _arith_messages(6, 1), tmp_path / "run", cfg,
                   log=logs.append)
    before, after = result.report["before"], result.report["after"]
    assert before["count"] == after["count"] == 6 and "accuracy" not in before
    assert before["stderr"] > 0 and len(after["losses"]) == 6
    assert after["loss"] < before["loss"]  # the circuit learnt the completions' shape
    assert any(line.startswith("[before] held-out completion loss") for line in logs)
    assert "nats per completion token" in summary_table(result.report)
    assert "completion loss (nats/token)" in (tmp_path / "run" / "adapter" / "README.md").read_text()


@pytest.mark.slow
def test_train_runs_end_to_end_on_a_messages_file(tmp_path, tiny_chat_model, capsys):
    from circuit_peft.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _arith_messages(12, 2)))
    out = tmp_path / "run"
    args = ["train", "--model", tiny_chat_model, "--data", str(data), "--heldout-fraction", "0.34",
            "--epochs", "1", "--max-new-tokens", "8", "--max-cut-share", "1", "--circuit-fraction", "0.1",
            "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["style"] == "chat" and report["before"]["count"] == 4 and report["n_train"] == 8
    assert (out / "adapter" / "adapter_config.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + json.dumps({"messages": [USER]}) + "\n")
    assert main([*args[:4], str(bad), *args[5:-1], str(tmp_path / "run2")]) == 2
    assert f"{bad}:13: field 'messages': no assistant turn" in capsys.readouterr().err


def test_seeds_summarise_the_completion_loss_with_answer_none():
    from circuit_peft.recipe.seeds import summarise_seeds

    reports = {0: {"before": {"loss": 2.0, "stderr": 0.1}, "after": {"loss": 1.5, "stderr": 0.1}},
               1: {"before": {"loss": 2.2, "stderr": 0.1}, "after": {"loss": 1.6, "stderr": 0.1}}}
    summary = summarise_seeds(reports)
    assert summary["gain"] == pytest.approx(-0.55) and summary["gain_se"] == pytest.approx(0.05)
