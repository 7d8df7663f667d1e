"""Evaluation data and prompts: load GSM8K / MMLU / TruthfulQA / text from a data folder (here the
vendored test slices; pass data_dir=None for the Hugging Face hub) and build chat or few-shot prompts."""

from pathlib import Path

from circuit_peft import load_tokenizer
from circuit_peft.evaluate.data import load_gsm8k, load_mmlu, load_text, load_truthfulqa, read_jsonl
from circuit_peft.taskdata.prompts import build_prompt, build_prompt_ids, encode_prompts, format_gsm8k_solution

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"

problems = load_gsm8k(DATA, "test", limit=3)
train = read_jsonl(DATA / "gsm8k" / "train.jsonl")[:2]
mmlu = load_mmlu(DATA, ["elementary_mathematics"])
truthfulqa = load_truthfulqa(DATA, limit=2)
text = load_text(DATA)
print(f"{len(problems)} GSM8K problems, {len(mmlu['elementary_mathematics']['eval'])} MMLU rows, "
      f"{len(truthfulqa)} TruthfulQA rows, {len(text)} characters of text")
print("gold solution as a shot:\n" + format_gsm8k_solution(train[0]["answer"]))

tok = load_tokenizer("smollm2")
print("--- few-shot prompt (GSM8K train rows as shots) ---")
print(build_prompt(tok, problems[0]["question"], style="fewshot", shots=train))
print("--- chat prompt ---")
chat = build_prompt(tok, problems[0]["question"], style="chat", instruction="End with 'The answer is N.'")
print(chat)
ids = build_prompt_ids(tok, problems[0]["question"], style="chat", instruction="End with 'The answer is N.'")
assert ids == encode_prompts(tok, [chat], "chat")[0]
print(len(ids), "prompt tokens")
