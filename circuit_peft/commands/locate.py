"""``circuit-peft locate``: find a circuit with DCM, a head ablation scan or attribution, save it as JSON
(and a PNG picture)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..files import ROW_FILE_SUFFIXES, read_rows
from ._args import add_model_args, at_least_one, fraction, load_spec, non_negative, positive

logger = logging.getLogger(__name__)

METHODS = ("dcm", "ablation", "attribution", "refined")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "locate",
        help="locate a circuit (DCM masks, head ablation scan, attribution, attribution refined by the exact scan) "
             "and save it as JSON",
        description="Locate the components that do a task. dcm and attribution --target logit_diff read "
                    "contrastive records (jsonl of {context_ids, desired_id, undesired_id, problem_id}); "
                    "ablation, refined and attribution --target ablation read probe rows with a prompt and a "
                    "solution (e.g. GSM8K question/answer).",
    )
    p.add_argument("--model", required=True, help="hub id, local folder, or 'smollm2' (offline SmolLM2-135M-Instruct)")
    p.add_argument("--data", required=True, help="local .jsonl/.json/.csv file, a saved datasets folder, or a hub dataset name")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--out", required=True, help="where to write the circuit JSON")
    p.add_argument("--plot", default=None, help="also write a PNG picture of the circuit here")
    g = p.add_argument_group("data")
    g.add_argument("--data-config", default=None, help="hub dataset configuration (e.g. 'main' for gsm8k)")
    g.add_argument("--split", default="train", help="hub dataset split (default train)")
    g.add_argument("--limit", type=positive(int), default=None, help="use only the first N rows")
    g.add_argument("--prompt-field", "--question-field", dest="prompt_field", default=None,
                   help="probe field with the prompt (default: 'prompt', else 'question' if present; "
                        "--question-field as in the other commands)")
    g.add_argument("--solution-field", "--answer-field", dest="solution_field", default=None,
                   help="probe field with the solution (default: 'solution', else 'answer' if present; "
                        "--answer-field as in the other commands)")
    g.add_argument("--no-chat-template", action="store_true", help="probe prompts as plain text, not a chat turn")
    g.add_argument("--max-length", type=positive(int), default=1024, help="probe rows are cut to this many tokens")
    s = p.add_argument_group("selection")
    s.add_argument("--keep-fraction", type=fraction, default=None,
                   help="keep this share of each scored kind, as the library call does (ablation/attribution default 0.05)")
    s.add_argument("--top-k", type=positive(int), default=None, help="keep the k best scored components instead")
    s.add_argument("--z", type=float, default=None, help="keep components with score z-score >= Z instead")
    a = p.add_argument_group("ablation / attribution")
    a.add_argument("--ablation", choices=("uniform", "zero", "mean"), default="uniform", help="head ablation operator")
    a.add_argument("--target", choices=("ablation", "logit_diff"), default=None,
                   help="attribution target (default: logit_diff for contrastive records, else ablation)")
    a.add_argument("--batch-size", type=positive(int), default=None, help="rows per forward (ablation 8, attribution 4, dcm 8)")
    a.add_argument("--naive", action="store_true", help="ablation: one full forward per head (slow reference)")
    a.add_argument("--candidates", type=at_least_one(float), default=2.0,
                   help="refined: the exact scan re-scores attribution's top CANDIDATES x kept heads (default 2)")
    a.add_argument("--bound-candidates", type=non_negative(float), default=1.0,
                   help="refined: also the top N x kept heads by the bound of the first-order term (same pass; "
                        "default 1; 0: none)")
    a.add_argument("--estimate", choices=("first_order", "bound"), default="first_order",
                   help="attribution (ablation target): the signed first-order estimate (default) or its bound "
                        "sum_rows ||a' - a|| ||dL/da||")
    a.add_argument("--ig-steps", type=non_negative(int), default=0,
                   help="attribution (ablation target) / refined: integrated gradients over N points of the joint "
                        "ablation path (N more forward + backward passes per batch; default 0: first order). "
                        "refined: its top --ig-candidates x kept heads join the candidates")
    a.add_argument("--ig-candidates", type=positive(float), default=1.0,
                   help="refined with --ig-steps: how many times the kept heads integrated gradients adds (default 1)")
    d = p.add_argument_group("dcm")
    d.add_argument("--dcm-lambda", dest="lambda_l1", type=non_negative(float), default=0.01,
                   help="L1 weight (default 0.01; the same flag as amplify's)")
    d.add_argument("--lambda", dest="lambda_l1", type=non_negative(float), help=argparse.SUPPRESS)  # old name
    d.add_argument("--lr", type=positive(float), default=5e-3, help="Adam learning rate (default 5e-3)")
    d.add_argument("--dcm-epochs", dest="epochs", type=positive(int), default=50,
                   help="maximum epochs (default 50; the same flag as amplify's)")
    d.add_argument("--epochs", dest="epochs", type=positive(int), help=argparse.SUPPRESS)  # old name
    d.add_argument("--patience", type=positive(int), default=5,
                   help="early stop after N checks (epochs, or --dcm-check-every steps) with the same kept set")
    d.add_argument("--dcm-steps", type=positive(int), default=None,
                   help="step schedule: exactly N Adam steps, cosine lr (use --lr ~0.05); default: the paper's epochs")
    d.add_argument("--dcm-check-every", type=positive(int), default=10, help="step schedule: check every N steps")
    d.add_argument("--objective", choices=("logit_diff", "logsigmoid"), default="logit_diff")
    d.add_argument("--seed", type=int, default=0)
    add_model_args(p)
    p.set_defaults(func=run)
    return p


def load_rows(data: str, config: str | None = None, split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """Rows from a local jsonl/json/csv file, a ``save_to_disk`` folder, or a hub dataset name."""
    path = Path(data)
    if path.is_file():
        rows = read_rows(path)
    elif path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        rows = [dict(r) for r in ds]
    elif path.suffix.lower() in ROW_FILE_SUFFIXES or data.startswith((".", "/")):
        raise FileNotFoundError(f"no data file at {path}")
    else:
        import datasets

        ds = datasets.load_dataset(data, config, split=split)
        rows = [dict(r) for r in (ds.select(range(min(limit, len(ds)))) if limit else ds)]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"the data set {data} is empty")
    return rows


def _is_records(rows: list[dict[str, Any]]) -> bool:
    return "context_ids" in rows[0]


def _probe_fields(rows: list[dict[str, Any]], prompt: str | None, solution: str | None) -> tuple[str, str]:
    first = rows[0]
    if prompt is None:
        prompt = "prompt" if "prompt" in first or "question" not in first else "question"
    if solution is None:
        solution = "solution" if "solution" in first or "answer" not in first else "answer"
    return prompt, solution


def run(args: argparse.Namespace) -> int:
    rows = load_rows(args.data, args.data_config, args.split, args.limit)
    target = _check_request(args, rows)
    model, tok = _load(args)
    circuit = _scan(args, model, tok, rows, target)
    circuit = _select(args, circuit)
    circuit.meta.setdefault("source", {"model": args.model, "data": args.data, "rows": len(rows)})
    circuit.save(args.out)
    print(circuit.summary())
    print(f"wrote {args.out}")
    if args.plot:
        circuit.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def _check_request(args: argparse.Namespace, rows: list[dict]) -> str:
    """Refuse flags that do not fit each other or the data (before the model loads); the attribution target."""
    from ..files import check_output_path

    if len([x for x in (args.keep_fraction, args.top_k, args.z) if x is not None]) > 1:
        raise ValueError("give at most one of --keep-fraction, --top-k, --z")
    records = _is_records(rows)
    if args.method == "dcm" and not records:
        raise ValueError(f"--method dcm needs contrastive records (context_ids, desired_id, undesired_id); "
                         f"{args.data} has fields {sorted(rows[0])}. Mine them with `circuit-peft mine`.")
    if args.method in ("ablation", "refined") and records:
        raise ValueError(f"--method {args.method} needs probe rows with a prompt and a solution, not contrastive records")
    if args.method == "refined" and (args.top_k is not None or args.z is not None):
        raise ValueError("--method refined keeps --keep-fraction of the heads (default 0.05); --top-k/--z do not apply")
    if args.method == "refined" and (args.target is not None or args.naive):
        raise ValueError("--method refined scores heads by the ablation target, exactly; --target/--naive do not apply")
    target = args.target or ("logit_diff" if records else "ablation")
    if args.method == "attribution" and (target == "logit_diff") != records:
        raise ValueError(f"--target {target} does not fit this data ({'contrastive records' if records else 'probe rows'})")
    if args.ig_steps and (args.method not in ("attribution", "refined") or target != "ablation"):
        raise ValueError("--ig-steps works with --method attribution (ablation target: probe rows) or refined")
    if args.estimate == "bound" and (args.method != "attribution" or target != "ablation" or args.ig_steps):
        raise ValueError("--estimate bound works with --method attribution on probe rows (ablation target), "
                         "without --ig-steps")
    if Path(args.out).suffix.lower() != ".json":
        raise ValueError(f"--out should be a .json file, got {args.out}")
    check_output_path(args.out, "--out", (args.data,))  # before the scan, not after it
    if args.plot:
        check_output_path(args.plot, "--plot", (args.data,))
    return target


def _load(args: argparse.Namespace):
    """The model and its tokenizer (None when there is none: the data must then be token ids)."""
    from ..models import load_model, load_tokenizer

    model = load_model(args.model, spec=load_spec(args))
    try:
        return model, load_tokenizer(args.model)
    except (OSError, ValueError) as err:
        # contrastive records and prompt_ids/solution_ids rows are token ids already
        logger.warning("no tokenizer for %s (%s); the data must be token ids", args.model, err)
        return model, None


def _scan(args: argparse.Namespace, model, tok, rows: list[dict], target: str):
    """The circuit of ``--method`` with every scored component."""
    from ..locate import ProbeSpec, attribution_scan, head_ablation_scan, learn_masks, refined_head_scan

    prompt_field, solution_field = _probe_fields(rows, args.prompt_field, args.solution_field)
    spec = ProbeSpec(prompt_field, solution_field, chat_template=False if args.no_chat_template else None,
                     max_length=args.max_length)
    # --keep-fraction goes to the library's own keep rule (a share of each kind), so the CLI keeps
    # exactly what the Python call with the same number keeps
    selected = any(x is not None for x in (args.top_k, args.z))
    keep = args.keep_fraction if args.keep_fraction is not None else (None if selected else 0.05)
    if args.method == "dcm":
        return learn_masks(model, rows, lambda_l1=args.lambda_l1, lr=args.lr, batch_size=args.batch_size or 8,
                           epochs=args.epochs, patience=args.patience, objective=args.objective, seed=args.seed,
                           tokenizer=tok, steps=args.dcm_steps, check_every=args.dcm_check_every)
    if args.method == "ablation":
        return head_ablation_scan(model, tok, rows, method=args.ablation, batch_size=args.batch_size or 8,
                                  naive=args.naive, keep_fraction=keep, spec=spec)
    if args.method == "refined":
        return refined_head_scan(model, tok, rows, keep_fraction=keep, candidates=args.candidates,
                                 bound_candidates=args.bound_candidates, ig_steps=args.ig_steps,
                                 ig_candidates=args.ig_candidates, method=args.ablation,
                                 batch_size=args.batch_size or 8, spec=spec)
    return attribution_scan(model, tok, rows, target=target, method=args.ablation, ig_steps=args.ig_steps,
                            estimate=args.estimate, batch_size=args.batch_size or 4, keep_fraction=keep, spec=spec)


def _select(args: argparse.Namespace, circuit):
    """The kept components of ``--keep-fraction`` (DCM), ``--top-k`` or ``--z``."""
    if args.keep_fraction is not None and args.method == "dcm":
        return circuit.top_each_kind(args.keep_fraction)
    if args.top_k is not None:
        return circuit.top(k=args.top_k)
    if args.z is not None:
        return circuit.top(z=args.z)
    return circuit
