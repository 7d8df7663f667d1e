"""``circuit-peft eval``: held-out accuracy (GSM8K-style) and side effects (MMLU, TruthfulQA, KL)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ._args import add_model_args, known_names, load_spec, non_negative, positive
from ..files import atomic_write_json, check_adapter_folder

EVAL_TASKS: tuple[str, ...] = ("gsm8k", "mmlu", "truthfulqa", "kl")


def parse_tasks(text: str) -> list[str]:
    """``--tasks`` (read at run time: ``--harness`` takes lm-eval task names instead)."""
    try:
        return known_names(text, EVAL_TASKS)
    except ValueError as e:
        raise ValueError(f"--tasks: {e}; got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    import circuit_peft  # noqa: F401  (registers the CIRCUIT PEFT type before loading adapters)

    if args.adapter:
        check_adapter_folder(args.adapter)  # before any model loads
    if args.harness:
        return run_lm_eval(args)
    tasks = parse_tasks(args.tasks or ",".join(EVAL_TASKS))
    if args.adapter and args.base_model:
        raise ValueError("give either --adapter (base = the model without it) or --base-model, not both")
    if "kl" in tasks and not (args.adapter or args.base_model):
        raise ValueError("the kl task compares against a base: pass --adapter DIR or --base-model M")
    if args.threads:
        torch.set_num_threads(args.threads)
    problems, shots, subjects = _read_data(args, tasks)  # a missing file fails before the model is loaded
    model, tokenizer, base = _load_models(args)
    report: dict[str, Any] = {"model": args.model, "adapter": args.adapter, "base_model": args.base_model,
                              "data_dir": args.data_dir, "tasks": tasks, "limit": args.limit}
    started = time.time()
    if problems is not None:
        report.update(_eval_gsm8k(args, model, base, tokenizer, problems, shots))
    side_tasks = [t for t in tasks if t != "gsm8k"]
    if side_tasks:
        t0 = time.time()
        report.update(_eval_side_effects(args, model, base, tokenizer, side_tasks, subjects))
        report["side_effects_seconds"] = round(time.time() - t0, 1)
    report["seconds"] = round(time.time() - started, 1)
    if args.out:
        atomic_write_json(args.out, report)
        print(f"report written to {args.out}")
    return 0


def _read_data(args: argparse.Namespace, tasks: list[str]):
    """GSM8K problems and shots (None when not asked for) and the MMLU subjects; every other data set is
    read once here so that a missing file fails before a model is loaded."""
    from ..evaluate.data import load_gsm8k, load_mmlu, load_text, load_truthfulqa

    data_dir = args.data_dir
    problems = load_gsm8k(data_dir, args.split, args.limit) if "gsm8k" in tasks else None
    shots = None
    if problems is not None and args.style == "fewshot" and args.shots is not None:
        shots = load_gsm8k(data_dir, "train", args.shots) if args.shots else []
    subjects = [s for s in args.mmlu_subjects.split(",") if s] if args.mmlu_subjects else None
    if "mmlu" in tasks:
        load_mmlu(data_dir, subjects)
    if "truthfulqa" in tasks:
        load_truthfulqa(data_dir, args.limit)
    if "kl" in tasks:
        if data_dir is None and args.text is None:
            raise ValueError("kl needs --text FILE or --data-dir with text/tinyshakespeare.txt")
        load_text(args.text or data_dir)
    return problems, shots, subjects


def _load_models(args: argparse.Namespace):
    """(model, tokenizer, base): the model with ``--adapter`` loaded (its base is the adapter disabled),
    or ``--model`` and a separate ``--base-model`` (None when neither is given)."""
    from ..models import load_model, load_tokenizer

    spec = load_spec(args)
    tokenizer, model, base = load_tokenizer(args.model), load_model(args.model, spec=spec), None
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    elif args.base_model:
        base = load_model(args.base_model, spec=spec)
    return model, tokenizer, base


def _eval_gsm8k(args: argparse.Namespace, model, base, tokenizer, problems, shots) -> dict[str, Any]:
    """``gsm8k`` (and with ``--with-base``, ``gsm8k_base``) report entries; prints one line each."""
    from ..evaluate.accuracy import evaluate_accuracy

    kw = dict(style=args.style, shots=shots, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
              instruction=args.instruction, progress=not args.quiet)
    t0 = time.time()
    res = evaluate_accuracy(model, tokenizer, problems, **kw)
    out = {"gsm8k": {**res.to_dict(with_records=not args.no_records), "seconds": round(time.time() - t0, 1)}}
    print(f"gsm8k       accuracy {res.accuracy:.3f} +- {res.stderr:.3f} ({res.correct}/{res.count}, "
          f"{len(res.skipped)} skipped)")
    if args.with_base and (args.adapter or base is not None):
        if base is not None:
            base_res = evaluate_accuracy(base, tokenizer, problems, **kw)
        else:
            with model.disable_adapter():
                base_res = evaluate_accuracy(model, tokenizer, problems, **kw)
        out["gsm8k_base"] = base_res.to_dict(with_records=not args.no_records)
        print(f"gsm8k base  accuracy {base_res.accuracy:.3f} +- {base_res.stderr:.3f}")
    return out


def _eval_side_effects(args: argparse.Namespace, model, base, tokenizer, side_tasks, subjects) -> dict[str, Any]:
    """Against a base (adapter disabled or ``--base-model``): ``side_effects`` (MMLU/TruthfulQA deltas,
    KL); without one: MMLU and TruthfulQA of the model alone. Prints one line per task."""
    from ..evaluate.data import load_text
    from ..evaluate.side_effects import side_effects

    if not (args.adapter or base is not None):
        return _eval_alone(args, model, tokenizer, side_tasks, subjects)
    se = side_effects(model, tokenizer, data_dir=args.data_dir, base=base, tasks=side_tasks, mmlu_subjects=subjects,
                      mmlu_shots=args.mmlu_shots, mmlu_limit=args.limit, truthfulqa_limit=args.limit,
                      text=load_text(args.text) if args.text else None, kl_chunk_length=args.kl_chunk_length,
                      kl_chunks=args.kl_chunks, batch_size=args.batch_size, progress=not args.quiet)
    for t in ("mmlu", "truthfulqa"):
        if t in se:
            print(f"{t:<11} {se[t]:.3f} (base {se[t + '_base']:.3f}, delta {se[t + '_delta']:+.3f}, "
                  f"n={se[t + '_count']})")
    if "kl" in se:
        print(f"kl          {se['kl']:.5f} nats/token vs base")
    return {"side_effects": se}


def _eval_alone(args: argparse.Namespace, model, tokenizer, side_tasks, subjects) -> dict[str, Any]:
    from ..evaluate.data import load_mmlu, load_truthfulqa
    from ..evaluate.side_effects import mmlu_accuracy, truthfulqa_mc1

    out: dict[str, Any] = {}
    if "mmlu" in side_tasks:
        res = mmlu_accuracy(model, tokenizer, load_mmlu(args.data_dir, subjects), args.mmlu_shots,
                            limit_per_subject=args.limit, batch_size=args.batch_size, progress=not args.quiet)
        out["mmlu"] = {k: v for k, v in res.items() if k != "records"}
        print(f"mmlu        {res['accuracy']:.3f} +- {res['stderr']:.3f} (n={res['count']})")
    if "truthfulqa" in side_tasks:
        res = truthfulqa_mc1(model, tokenizer, load_truthfulqa(args.data_dir, args.limit), args.batch_size,
                             not args.quiet)
        out["truthfulqa"] = {k: v for k, v in res.items() if k != "records"}
        print(f"truthfulqa  {res['accuracy']:.3f} +- {res['stderr']:.3f} (n={res['count']})")
    return out


def run_lm_eval(args: argparse.Namespace) -> int:
    """``eval --harness lm-eval``: lm-evaluation-harness on ``--model`` with ``--adapter`` (``peft=``);
    offline on ``--data-dir`` files (gsm8k, mmlu_<subject>), else any lm-eval task from the hub."""
    import json
    import tempfile

    import circuit_peft  # noqa: F401  (registers the CIRCUIT PEFT type before lm-eval loads the adapter)

    from ..evaluate.harness import harness_table, run_harness
    from ..models import resolve_model_path

    ignored = [f for f, on in (("--base-model", args.base_model), ("--with-base", args.with_base),
                               ("--shots", args.shots is not None), ("--instruction", args.instruction),
                               ("--text", args.text), ("--mmlu-subjects", args.mmlu_subjects)) if on]
    if ignored:
        raise ValueError(f"--harness lm-eval does not use {', '.join(ignored)}: the harness's tasks set the prompts "
                         "(use --harness-shots / --harness-max-gen-toks)")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks: give lm-eval task names, e.g. gsm8k,mmlu_anatomy; got {args.tasks!r}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device, dtype = load_spec(args).resolved()
    with tempfile.TemporaryDirectory(prefix="circuit-peft-harness-") as work:
        results = run_harness(resolve_model_path(args.model), tasks, adapter=args.adapter, data_dir=args.data_dir,
                              work_dir=work, limit=args.limit, batch_size=args.batch_size,
                              num_fewshot=args.harness_shots, max_gen_toks=args.harness_max_gen_toks,
                              device=str(device), dtype=str(dtype).removeprefix("torch."))
    print(harness_table(results))
    if args.out:
        atomic_write_json(args.out, json.loads(json.dumps({"harness": "lm-eval", "model": args.model,
                                                           "adapter": args.adapter, "results": results["results"]},
                                                          default=float)))
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="accuracy on held-out problems and side effects (MMLU, TruthfulQA, KL)",
        description="Greedy accuracy on GSM8K-style problems and the side effects of an adapter: MMLU (5-shot, "
                    "log-likelihood), TruthfulQA (MC1 by log-likelihood), KL(base || model) on general text.",
    )
    p.add_argument("--model", required=True, help="'smollm2', a hub id or a local folder (the base model)")
    p.add_argument("--adapter", help="a PEFT adapter folder (CircuitConfig, LoRA, ...); base = adapter disabled")
    p.add_argument("--base-model", help="compare a fully fine-tuned --model against this base model")
    p.add_argument("--data-dir", help="data folder (gsm8k/, mmlu/test/, truthfulqa/, text/); default: the HF hub")
    p.add_argument("--tasks", default=None, help="comma-separated subset of " + ",".join(EVAL_TASKS)
                   + " (default: all); with --harness: lm-eval task names (required)")
    p.add_argument("--limit", type=positive(int), help="first N problems / MMLU rows per subject / TruthfulQA rows")
    p.add_argument("--out", help="write the JSON report here (atomically)")
    p.add_argument("--split", default="test", help="GSM8K split (default test)")
    p.add_argument("--style", choices=("chat", "fewshot"), default="chat", help="prompt style (default chat)")
    p.add_argument("--shots", type=non_negative(int), help="fewshot: use the first K GSM8K train rows as shots "
                   "(default: two built-in examples)")
    p.add_argument("--instruction", help="text appended to each question, e.g. \"End with 'The answer is N.'\"")
    p.add_argument("--max-new-tokens", type=positive(int), default=256)
    p.add_argument("--batch-size", type=positive(int), default=8)
    p.add_argument("--with-base", action="store_true", help="also score GSM8K accuracy of the base model")
    p.add_argument("--mmlu-subjects", help="comma-separated MMLU subjects (default: a fixed set of 6)")
    p.add_argument("--mmlu-shots", type=non_negative(int), default=5)
    p.add_argument("--text", help="plain-text file for KL (default: <data-dir>/text/tinyshakespeare.txt)")
    p.add_argument("--kl-chunks", type=positive(int), default=32, help="number of text chunks for KL (default 32)")
    p.add_argument("--kl-chunk-length", type=positive(int), default=128, help="tokens per KL chunk (default 128)")
    p.add_argument("--no-records", action="store_true", help="leave per-problem records out of the report")
    p.add_argument("--harness", choices=("lm-eval",), help="run lm-evaluation-harness instead (--tasks are its task "
                   "names; offline with --data-dir: gsm8k, mmlu_<subject>; needs circuit-peft[lm-eval])")
    p.add_argument("--harness-shots", type=non_negative(int), help="lm-eval num_fewshot (default: each task's own)")
    p.add_argument("--harness-max-gen-toks", type=positive(int), help="lm-eval generation cap (default: the task's)")
    p.add_argument("--threads", type=positive(int), help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(p)
    p.set_defaults(func=run)
