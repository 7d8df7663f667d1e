"""``circuit-peft locate``: run any registered locator (:mod:`circuit_peft.locate.registry`) on probe rows or
contrastive records, and save its circuit as JSON (and a PNG picture)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..files import ROW_FILE_SUFFIXES, read_rows
from ..interventions import ABLATION_METHODS
from ..locate.estimate import ESTIMATES
from ..locate.registry import LOCATORS, locator_names
from ._args import add_model_args, at_least_one, fraction, load_spec, non_negative, positive

logger = logging.getLogger(__name__)

METHODS = locator_names()
DEFAULT_KEEP_FRACTION = 0.05  # a locator without a kept set of its own keeps this share of each kind
_PROBE = locator_names(reads="probe")
_ESTIMATORS = ("ablation_estimate", "refined")
_ABLATING = ("ablation", "ablation_estimate", "refined")
REFUSED = ("estimate", "ig_steps", "ig_candidates", "reference", "naive")  # foreign: refused, not ignored

# Each locator's own flags: (flags, dest, the locator option it sets (None: read by this command), the locators
# that take it, argparse settings). A flag given to a locator that does not take it is refused (_check_request).
OPTIONS: tuple[tuple[tuple[str, ...], str, str | None, tuple[str, ...], dict[str, Any]], ...] = (
    (("--ablation",), "ablation", "method", _ABLATING,
     dict(choices=ABLATION_METHODS, default="uniform", help="head ablation operator")),
    (("--batch-size",), "batch_size", "batch_size", METHODS,
     dict(type=positive(int), default=None, help="rows per forward (default: the locator's: ablation 8, "
                                                  "ablation_estimate/attribution 4, dcm 8)")),
    (("--naive",), "naive", "naive", ("ablation",),
     dict(action="store_true", help="one full forward per head (slow reference)")),
    (("--candidates",), "candidates", "candidates", ("refined",),
     dict(type=at_least_one(float), default=2.0, help="the exact scan re-scores the estimate's top CANDIDATES x "
                                                      "kept heads (default 2)")),
    (("--bound-candidates",), "bound_candidates", "bound_candidates", ("refined",),
     dict(type=non_negative(float), default=1.0, help="also the top N x kept heads by the bound of the first-order "
                                                      "term (same pass; default 1; 0: none)")),
    (("--estimate",), "estimate", "estimate", ("ablation_estimate",),
     dict(choices=ESTIMATES, default="first_order", help="the signed first-order estimate (default) or its bound "
                                                         "sum_rows ||a' - a|| ||dL/da||")),
    (("--ig-steps",), "ig_steps", "ig_steps", _ESTIMATORS,
     dict(type=non_negative(int), default=0, help="integrated gradients over N points of the joint ablation path "
          "(N more forward + backward passes per batch; default 0: first order); refined: its top --ig-candidates "
          "x kept heads join the candidates")),
    (("--ig-candidates",), "ig_candidates", "ig_candidates", ("refined",),
     dict(type=positive(float), default=1.0, help="with --ig-steps: how many times the kept heads integrated "
                                                  "gradients adds (default 1)")),
    (("--reference",), "reference", None, ("gradient_contrast",),
     dict(default=None, help="general text the task gradient is divided by: a .txt file or a data folder with "
                             "text/tinyshakespeare.txt (required)")),
    (("--dcm-lambda",), "lambda_l1", "lambda_l1", ("dcm",),
     dict(type=non_negative(float), default=0.01, help="L1 weight (default 0.01; the same flag as amplify's)")),
    (("--lambda",), "lambda_l1", "lambda_l1", ("dcm",), dict(type=non_negative(float), help=argparse.SUPPRESS)),
    (("--lr",), "lr", "lr", ("dcm",), dict(type=positive(float), default=5e-3, help="Adam learning rate (default 5e-3)")),
    (("--dcm-epochs",), "epochs", "epochs", ("dcm",),
     dict(type=positive(int), default=50, help="maximum epochs (default 50; the same flag as amplify's)")),
    (("--epochs",), "epochs", "epochs", ("dcm",), dict(type=positive(int), help=argparse.SUPPRESS)),
    (("--patience",), "patience", "patience", ("dcm",),
     dict(type=positive(int), default=5, help="early stop after N checks (epochs, or --dcm-check-every steps) with "
                                              "the same kept set")),
    (("--dcm-steps",), "dcm_steps", "steps", ("dcm",),
     dict(type=positive(int), default=None, help="step schedule: exactly N Adam steps, cosine lr (use --lr ~0.05); "
                                                 "default: the paper's epochs")),
    (("--dcm-check-every",), "dcm_check_every", "check_every", ("dcm",),
     dict(type=positive(int), default=10, help="step schedule: check every N steps")),
    (("--objective",), "objective", "objective", ("dcm",), dict(choices=("logit_diff", "logsigmoid"), default="logit_diff")),
    (("--seed",), "seed", "seed", ("dcm",), dict(type=int, default=0)),
)

# (flags, settings) of the data and the keep rule, shared by every locator
COMMON: tuple[tuple[str, tuple[str, ...], dict[str, Any]], ...] = (
    ("data", ("--data-config",), dict(default=None, help="hub dataset configuration (e.g. 'main' for gsm8k)")),
    ("data", ("--split",), dict(default="train", help="hub dataset split (default train)")),
    ("data", ("--limit",), dict(type=positive(int), default=None, help="use only the first N rows")),
    ("data", ("--prompt-field", "--question-field"), dict(dest="prompt_field", default=None, help=
     "probe field with the prompt (default: 'prompt', else 'question' if present)")),
    ("data", ("--solution-field", "--answer-field"), dict(dest="solution_field", default=None, help=
     "probe field with the solution (default: 'solution', else 'answer' if present)")),
    ("data", ("--no-chat-template",), dict(action="store_true", help="probe prompts as plain text, not a chat turn")),
    ("data", ("--max-length",), dict(type=positive(int), default=1024, help="probe rows are cut to this many tokens")),
    ("selection", ("--keep-fraction",), dict(type=fraction, default=None, help=
     f"keep this share of each scored kind (default {DEFAULT_KEEP_FRACTION}; dcm: its masks m >= 0.5)")),
    ("selection", ("--top-k",), dict(type=positive(int), default=None, help="keep the k best scored components instead")),
    ("selection", ("--z",), dict(type=float, default=None, help="keep components with score z-score >= Z instead")),
    ("selection", ("--target",), dict(choices=("ablation", "logit_diff"), default=None, help=argparse.SUPPRESS)),
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    methods = "; ".join(f"{name} ({spec.reads}): {spec.summary}" for name, spec in LOCATORS.items())
    p = subparsers.add_parser(
        "locate", help="locate a circuit with any registered locator and save it as JSON",
        description="Locate the components that do a task. Locators reading records take contrastive records "
                    "(jsonl of {context_ids, desired_id, undesired_id, problem_id}); those reading probe rows take "
                    "a prompt and a solution (e.g. GSM8K question/answer). " + methods)
    p.add_argument("--model", required=True, help="hub id, local folder, or 'smollm2' (offline SmolLM2-135M-Instruct)")
    p.add_argument("--data", required=True, help="local .jsonl/.json/.csv file, a saved datasets folder, or a hub dataset name")
    p.add_argument("--method", choices=METHODS, required=True, help="the locator (see above)")
    p.add_argument("--out", required=True, help="where to write the circuit JSON")
    p.add_argument("--plot", default=None, help="also write a PNG picture of the circuit here")
    groups = {name: p.add_argument_group(name) for name in ("data", "selection", "locator settings")}
    for group, flags, settings in COMMON:
        groups[group].add_argument(*flags, **settings)
    for flags, dest, _, users, settings in OPTIONS:
        hidden = settings.get("help") is argparse.SUPPRESS
        groups["locator settings"].add_argument(*flags, dest=dest, **dict(
            settings, help=settings["help"] if hidden else f"{'/'.join(users)}: {settings.get('help', '')}"))
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
    method = _check_request(args, rows)
    model, tok = _load(args)
    circuit = LOCATORS[method](model, tok, rows, _keep(args, method), **_options(args, method, rows))
    circuit.meta.setdefault("source", {"model": args.model, "data": args.data, "rows": len(rows)})
    circuit.save(args.out)
    print(circuit.summary())
    print(f"wrote {args.out}")
    if args.plot:
        circuit.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def _method(args: argparse.Namespace, records: bool) -> str:
    """The locator: ``--method``, where the old spellings name ``attribution`` on probe rows (now
    ``ablation_estimate``) or the hidden ``--target`` (``logit_diff``: attribution, ``ablation``: its estimate)."""
    method = args.method
    if method in ("attribution", "ablation_estimate") and args.target is not None:
        method = "attribution" if args.target == "logit_diff" else "ablation_estimate"
        if (method == "attribution") != records:
            raise ValueError(f"--target {args.target} does not fit this data "
                             f"({'contrastive records' if records else 'probe rows'})")
    elif args.target is not None:
        raise ValueError(f"--target works with --method attribution or ablation_estimate, not {method}")
    elif method == "attribution" and not records:
        method = "ablation_estimate"
    if method != args.method:
        logger.warning("--method %s%s on %s runs the locator %s (attribution is the logit difference on "
                       "contrastive records)", args.method, f" --target {args.target}" if args.target else "",
                       "contrastive records" if records else "probe rows", method)
    return method


def _check_request(args: argparse.Namespace, rows: list[dict]) -> str:
    """Refuse flags that do not fit each other, the locator or the data (before the model loads); the locator."""
    from ..files import check_output_path

    if len([x for x in (args.keep_fraction, args.top_k, args.z) if x is not None]) > 1:
        raise ValueError("give at most one of --keep-fraction, --top-k, --z")
    records = _is_records(rows)
    method = _method(args, records)
    spec = LOCATORS[method]
    if spec.reads == "records" and not records:
        raise ValueError(f"--method {method} needs contrastive records (context_ids, desired_id, undesired_id); "
                         f"{args.data} has fields {sorted(rows[0])}. Mine them with `circuit-peft mine`.")
    if spec.reads == "probe" and records:
        raise ValueError(f"--method {method} needs probe rows with a prompt and a solution, not contrastive records")
    if method == "refined" and (args.top_k is not None or args.z is not None):
        raise ValueError("--method refined keeps --keep-fraction of the heads (default 0.05); --top-k/--z do not apply")
    if method == "refined" and args.naive:
        raise ValueError("--method refined scores heads by the ablation target, exactly; --target/--naive do not apply")
    _refuse_foreign_flags(args, method)
    if args.estimate == "bound" and args.ig_steps:
        raise ValueError("--estimate bound works with --method ablation_estimate without --ig-steps")
    if method == "gradient_contrast" and args.reference is None:
        raise ValueError("--method gradient_contrast needs --reference (general text: a .txt file or a data folder)")
    if Path(args.out).suffix.lower() != ".json":
        raise ValueError(f"--out should be a .json file, got {args.out}")
    check_output_path(args.out, "--out", (args.data,))  # before the scan, not after it
    if args.plot:
        check_output_path(args.plot, "--plot", (args.data,))
    return method


def _refuse_foreign_flags(args: argparse.Namespace, method: str) -> None:
    """A locator flag set (away from its default) for a locator that does not take it: refused where it would
    change what is measured (``REFUSED``), else ignored with a warning."""
    defaults: dict[str, Any] = {}
    for flags, dest, _, users, settings in OPTIONS:
        defaults.setdefault(dest, settings.get("default", False if settings.get("action") == "store_true" else None))
        value = getattr(args, dest)
        if method not in users and value != defaults[dest]:
            shown = f"{flags[0]} {value}" if "choices" in settings else flags[0]
            if dest not in REFUSED:
                logger.warning("%s is ignored: it works with --method %s, not %s", shown, " or ".join(users), method)
                continue
            raise ValueError(f"{shown} works with --method {' or '.join(users)}, not {method}")


def _keep(args: argparse.Namespace, method: str):
    """The keep rule of ``--top-k`` / ``--z`` (pooled over kinds), ``--keep-fraction`` (each kind), or the default:
    :data:`DEFAULT_KEEP_FRACTION` of each kind (a locator with a kept set of its own: that set)."""
    from ..circuits.selection import Keep

    if args.top_k is not None:
        return Keep(k=args.top_k, per_kind=False)
    if args.z is not None:
        return Keep(z=args.z, per_kind=False)
    if args.keep_fraction is not None:
        return Keep(fraction=args.keep_fraction)
    return None if LOCATORS[method].own_keep else Keep(fraction=DEFAULT_KEEP_FRACTION)


def _options(args: argparse.Namespace, method: str, rows: list[dict]) -> dict[str, Any]:
    """The locator's options: its flags (``OPTIONS``), how probe rows become ids, the reference text."""
    from ..taskdata.examples import ProbeSpec

    options = {option: getattr(args, dest) for _, dest, option, users, _ in OPTIONS
               if option is not None and method in users and getattr(args, dest) is not None}
    if method in _PROBE:
        prompt_field, solution_field = _probe_fields(rows, args.prompt_field, args.solution_field)
        options["spec"] = ProbeSpec(prompt_field, solution_field, max_length=args.max_length,
                                    chat_template=False if args.no_chat_template else None)
    if method == "gradient_contrast":
        from ..evaluate.data import load_text

        options["reference"] = load_text(args.reference)
    return options


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
