"""``circuit-peft select``: choose a training subset by CircuitSeer or a baseline.

    circuit-peft select --model smollm2 --data train.jsonl --fraction 0.1 --method circuitseer \\
        --heads heads.json --out subset.jsonl --plot scores.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ._args import add_model_args, fraction, load_spec, non_negative, positive
from ..files import atomic_write_text, read_rows
from ..locate.registry import locator_names

# the locators that score query heads on probe rows alone (gradient_contrast needs general text too)
HEAD_METHODS = tuple(n for n in locator_names(heads=True) if n != "gradient_contrast") + ("attribution",)

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(path: str, split: str = "train") -> Any:
    """A ``datasets.Dataset`` from a .jsonl/.json/.csv/.parquet file (or a hub data set name)."""
    import datasets

    p = Path(path)
    if p.suffix == ".parquet" and p.exists():
        return datasets.load_dataset("parquet", data_files=str(p), split="train")
    if p.exists() or p.suffix in DATA_SUFFIXES:
        return datasets.Dataset.from_list(read_rows(p))
    return datasets.load_dataset(path, split=split)


def run(args: argparse.Namespace) -> int:
    from ..select.api import check_added_columns
    from ..select.data import row_texts
    from ..select.heads import ReasoningHeads
    from ..select.sampling import subset_size

    if args.fraction is None or not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1] (e.g. 0.1 for 10 %), got {args.fraction}")
    from ..files import check_output_path

    check_output_path(args.out, "--out", (args.data,))
    if args.plot:
        check_output_path(args.plot, "--plot", (args.data,))
    dataset = load_rows(args.data, args.split)
    subset_size(len(dataset), args.fraction)
    # check the fields before loading a model, so a bad file fails in a second
    row_texts(dataset, args.question_field, None, what="question")
    if args.method in ("max-loss", "ifd"):
        row_texts(dataset, args.answer_field, None, what="answer")
    check_added_columns(dataset.column_names, args.method, args.score_column, "--score-column")
    # a heads file is read and checked (fields, indices against its own fingerprint) before the model loads
    heads = ReasoningHeads.load(args.heads) if args.heads and args.method in ("circuitseer", "length-matched") else None
    cache = _open_cache(args, dataset)
    try:
        return _select(args, dataset, heads)
    finally:
        if cache is not None:
            cache.close()


# flags that change which rows are kept or where they go, not the cached scores (and the method: each
# method's scores are a subfolder of their own, keyed by model, data and settings)
CACHE_FLAGS_IGNORED = ("plot", "fraction", "tau", "seed", "save_heads", "score_column", "cache_dir", "split",
                       "method")


def _open_cache(args: argparse.Namespace, dataset):
    """``--cache-dir`` as a run folder: the scoring flags and the pool's fingerprint are recorded, a cache
    of another pool or other scoring flags is refused, and a second live writer is refused."""
    if not args.cache_dir:
        return None
    from ..distributed import is_main_process
    from ._cca import open_run

    if not is_main_process():  # under torchrun the main process checks and locks the folder; this one only scores
        return None
    pool = getattr(dataset, "_fingerprint", None) or dataset.to_list()  # datasets' own content hash when it has one
    return open_run(args, "cache_dir", CACHE_FLAGS_IGNORED, adopt=_only_score_caches, pool=pool)


def _only_score_caches(folder: Path) -> bool:
    """A cache folder written before caches were run folders: only ``<method>-<hash>/`` score caches."""
    return all(p.is_dir() and "-" in p.name for p in folder.iterdir())


def _select(args: argparse.Namespace, dataset, heads=None) -> int:
    from ..models import load_model, load_tokenizer
    from ..select.api import plot_scores, select_data
    from ..select.heads import ReasoningHeads, find_reasoning_heads

    model = tokenizer = None
    if args.method != "random":
        model, tokenizer = load_model(args.model, spec=load_spec(args)), load_tokenizer(args.model)
    if args.method in ("circuitseer", "length-matched"):
        if heads is not None:
            heads.check_model(model)
        else:
            probe = dataset.select(range(min(args.probe_rows, len(dataset))))
            if args.answer_field not in dataset.column_names:
                raise ValueError(f"finding reasoning heads needs solutions: row 0 has no answer field "
                                 f"{args.answer_field!r}; pass --heads FILE or --answer-field")
            print(f"no --heads given: scanning every head ({args.head_method}) on the first {len(probe)} rows")
            heads = find_reasoning_heads(model, tokenizer, probe, method=args.head_method,
                                         fraction=args.head_fraction, prompt_field=args.question_field,
                                         solution_field=args.answer_field)
            saved = heads.save(args.save_heads or Path(args.out).with_suffix(".heads.json"))
            print(f"reasoning heads {heads.heads} saved to {saved}")
    result = select_data(
        model, tokenizer, dataset, method=args.method, fraction=args.fraction, heads=heads, tau=args.tau, seed=args.seed,
        question_field=args.question_field, answer_field=args.answer_field, score_column=args.score_column,
        batch_size=args.batch_size, max_length=args.max_length, on_long=args.on_long, cache_dir=args.cache_dir,
        **({"query": args.query, "exclude_sink": not args.keep_sink, "length_normalized": args.length_normalized,
            "length_debias": not args.no_length_debias}
           if args.method in ("circuitseer", "length-matched") else {}),
    )
    out = Path(args.out)
    atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in result.subset))
    info = result.info
    msg = (f"{args.method}: kept {info['selected']} of {info['pool']} rows -> {out} "
           f"({info['seconds']:.1f} s, {info['examples_per_s']:.1f} examples/s)")
    if info.get("score_length_spearman") is not None:
        msg += f"; score vs question length Spearman {info['score_length_spearman']:.2f}"
    print(msg)
    if args.plot:
        if result.scores is None:
            print("--plot: the random method has no scores to plot; skipped")
        else:
            print(f"histogram written to {plot_scores(result.scores, result.indices, args.plot, f'{args.method} score')}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "select", help="choose a training subset (CircuitSeer, random, length-matched, max-loss, IFD)",
        description="Score a pool of training rows and keep a fraction of it: CircuitSeer (attention variance "
                    "of the reasoning heads over the question, soft-sampled), or a baseline.",
    )
    p.add_argument("--model", default="smollm2", help="reference model: 'smollm2', a hub id or a folder")
    p.add_argument("--data", required=True, help=".jsonl/.json/.csv/.parquet file (or a hub data set name)")
    p.add_argument("--split", default="train", help="split of a hub data set")
    p.add_argument("--fraction", type=fraction, default=0.1, help="share of the pool to keep, in (0, 1]")
    p.add_argument("--method", default="circuitseer",
                   choices=["circuitseer", "random", "length-matched", "max-loss", "ifd"])
    p.add_argument("--out", required=True, help="where to write the subset (.jsonl; adds pool_index and score)")
    p.add_argument("--plot", help="PNG histogram of the scores, selected vs not")
    p.add_argument("--heads", help="reasoning heads file (circuit-peft select/locate output) for circuitseer")
    p.add_argument("--head-method", default="ablation", choices=HEAD_METHODS,
                   help="the locator that finds reasoning heads when --heads is not given ('attribution': the old "
                        "name of ablation_estimate)")
    p.add_argument("--head-fraction", type=fraction, default=0.05, help="share of heads kept as reasoning heads")
    p.add_argument("--probe-rows", type=positive(int), default=16, help="rows of --data used to find the heads")
    p.add_argument("--save-heads", help="where to save heads found here (default: OUT.heads.json)")
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--score-column", default="score")
    p.add_argument("--tau", type=non_negative(float), default=0.5, help="soft-sampling temperature (0 = top-k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query", default="last", choices=["last", "mean"], help="attention row(s) scored")
    p.add_argument("--keep-sink", action="store_true", help="paper's raw variance (keep the first/BOS token)")
    p.add_argument("--length-normalized", action="store_true", help="score Var(n*a) instead of Var(a)")
    p.add_argument("--no-length-debias", action="store_true",
                   help="keep per-example scores (default: residual of log score after a fit on log length)")
    p.add_argument("--batch-size", type=positive(int), default=16)
    p.add_argument("--max-length", type=positive(int), help="token limit (default: the model's context)")
    p.add_argument("--on-long", default="truncate", choices=["truncate", "error"],
                   help="what to do with rows longer than the context")
    p.add_argument("--cache-dir", help="folder for resumable score caches (one pool and scoring setting per "
                                        "folder; another is refused)")
    add_model_args(p)
    p.set_defaults(func=run)
