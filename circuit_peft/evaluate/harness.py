"""lm-evaluation-harness on a base model with a PEFT adapter (CIRCUIT, LoRA, ...), online or offline.

``run_harness`` builds lm-eval's ``HFLM`` the way a user would on the command line
(``--model hf --model_args pretrained=...,peft=ADAPTER,dtype=float32``) and runs ``simple_evaluate``. With a data
folder it runs offline: each task is lm-eval's own task file, included unchanged, with only the data
source replaced by local files (GSM8K ``gsm8k/{train,test}.jsonl``; MMLU ``mmlu/test/<subject>_test.csv``
converted to the hub's ``question/subject/choices/answer`` rows), so the numbers are the ones the
harness prints online on the same rows. Needs the optional extra: ``pip install circuit-peft[lm-eval]``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

LOCAL_TASKS = "gsm8k, mmlu_<subject>"


def _lm_eval_task_file(*parts: str) -> Path:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / Path(*parts)
    if not path.exists():
        raise FileNotFoundError(f"lm-eval {lm_eval.__version__} has no task file {path}; this bridge was written "
                                "against lm-eval 0.4.x")
    return path


def _gsm8k_config(data_dir: Path) -> dict[str, Any]:
    folder = data_dir / "gsm8k"
    files = {split: str(folder / f"{split}.jsonl") for split in ("train", "test")}
    missing = [f for f in files.values() if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"gsm8k: no {missing[0]} (the data folder needs gsm8k/train.jsonl and test.jsonl)")
    return {**task_file_config("gsm8k", "gsm8k.yaml"), "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": files}}


def _mmlu_config(data_dir: Path, subject: str, work_dir: Path) -> dict[str, Any]:
    """lm-eval's ``mmlu_<subject>`` on ``<data>/mmlu/{test,dev}/<subject>_<split>.csv`` (read by the same
    reader as :func:`circuit_peft.evaluate.data.load_mmlu`); without a dev file there is no few-shot split."""
    from .data import _mmlu_rows_from_csv, _mmlu_root

    root = _mmlu_root(data_dir)
    files = {}
    for split in ("test", "dev"):
        source = root / split / f"{subject}_{split}.csv"
        if not source.exists():
            if split == "test":
                raise FileNotFoundError(f"mmlu_{subject}: no {source}")
            continue
        rows = [{**r, "subject": subject} for r in _mmlu_rows_from_csv(source)]
        files[split] = str(work_dir / f"mmlu_{subject}_{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {**task_file_config("mmlu", "default", f"mmlu_{subject}.yaml"), "dataset_path": "json",
            "dataset_name": None, "fewshot_split": "dev" if "dev" in files else None,
            "dataset_kwargs": {"data_files": files}}


def task_file_config(*parts: str) -> dict[str, Any]:
    """lm-eval's own task file ``tasks/<parts>`` as one dict (its ``include`` resolved the harness's way)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(_lm_eval_task_file(*parts))


def local_task_configs(tasks: Sequence[str], data_dir: str | os.PathLike, work_dir: str | os.PathLike
                       ) -> list[dict[str, Any]]:
    """lm-eval task configs reading ``data_dir`` instead of the hub (converted files go to ``work_dir``)."""
    data, work = Path(data_dir), Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    configs = []
    for task in tasks:
        if task == "gsm8k":
            configs.append(_gsm8k_config(data))
        elif task.startswith("mmlu_"):
            configs.append(_mmlu_config(data, task.removeprefix("mmlu_"), work))
        else:
            raise ValueError(f"--tasks: {task!r} has no local data; offline tasks are {LOCAL_TASKS} "
                             "(without --data-dir any lm-eval task name runs from the hub)")
    return configs


def run_harness(
    model: str | os.PathLike,
    tasks: Sequence[str],
    adapter: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    work_dir: str | os.PathLike = ".harness",
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    max_gen_toks: int | None = None,
    device: str | None = None,
    log_samples: bool = False,
    dtype: str = "float32",
) -> dict[str, Any]:
    """lm-eval ``simple_evaluate`` results (``results[task][metric]``) of ``model`` with ``adapter``.

    Args:
        model: a hub id or local folder (``pretrained=``); ``adapter``: a PEFT adapter folder (``peft=``).
        tasks: lm-eval task names; with ``data_dir`` only ``gsm8k`` and ``mmlu_<subject>`` (local files).
        limit: the first N documents per task; ``max_gen_toks``: overrides the task's generation cap.
        device: ``"cuda"``, ``"cpu"``, ... (default: CUDA when there is one, else CPU); ``dtype``: the
            weights' dtype name (``eval`` passes its ``--dtype`` resolved).
        log_samples: keep per-document requests and responses under ``results["samples"]``.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("the lm-eval bridge needs lm-evaluation-harness: pip install 'circuit-peft[lm-eval]'") from e
    specs: list[Any] = list(tasks) if data_dir is None else local_task_configs(tasks, data_dir, work_dir)
    no_shots = [c["task"] for c in specs if isinstance(c, dict) and "fewshot_split" in c and c["fewshot_split"] is None]
    if num_fewshot and no_shots:  # lm-eval would draw the shots from the test split itself
        raise ValueError(f"{no_shots}: the data folder has no dev split to draw {num_fewshot} shots from; "
                         "use 0 shots or add mmlu/dev/<subject>_dev.csv")
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = HFLM(pretrained=str(model), peft=None if adapter is None else str(adapter), batch_size=batch_size,
              dtype=dtype, device=device)
    gen_kwargs = None if max_gen_toks is None else {"max_gen_toks": max_gen_toks}
    return simple_evaluate(model=lm, tasks=specs, limit=limit, num_fewshot=num_fewshot, gen_kwargs=gen_kwargs,
                           task_manager=TaskManager(), log_samples=log_samples)


def harness_table(results: dict[str, Any]) -> str:
    """The table lm-eval prints for ``results``."""
    from lm_eval.utils import make_table

    return make_table(results)


__all__ = ["LOCAL_TASKS", "harness_table", "local_task_configs", "run_harness", "task_file_config"]
