"""``circuit-peft demo``: the main job (``circuit-peft train``) on the offline SmolLM2, end to end.

``make demo`` runs :data:`TRAIN_DEMO_ARGS` through ``circuit-peft train``: 64 two-digit arithmetic
problems, the circuit located by the SFT-loss gradient (2 % of each kind), pivotal SFT of only that
circuit, held-out accuracy before/after on 100 problems (with standard errors and the share of
answers that hit the token cap), KL on the shipped text slice, and the adapter with its card.

``circuit-peft demo --cca`` runs the earlier CCA demo: ``amplify`` on the small arithmetic problem set shipped in the package: mine
pivotal tokens (first wrong answer digit), locate a 2 % circuit by attribution, update only it,
and print accuracy before/after, the fraction of components and parameters changed and the side
effects (on the tiny side-effect slices shipped in the package). 148 s on an idle 2-core CPU (session 21).

``circuit-peft demo --adapter-only`` keeps the first, adapter-only demo: a fixed hand-picked
circuit trained for a few AdamW steps on bundled GSM8K problems (no locating step).
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from typing import Any

from pathlib import Path

import torch
from peft import get_peft_model
from tqdm import tqdm

from ._args import load_spec, positive
from ..arch import get_arch
from ..taskdata.prompts import build_prompt
from ..files import atomic_dir
from ..models import LoadSpec, load_model, load_tokenizer
from ..taskdata.collate import PivotalCollator
from ..taskdata.examples import answer_example, encode_text_pair
from ..tuner import CircuitConfig, circuit_size


def demo_problems() -> list[dict[str, str]]:
    """The bundled GSM8K problems: ``{"question", "answer"}`` rows."""
    text = resources.files("circuit_peft").joinpath("data/gsm8k_demo.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def demo_circuit(model: torch.nn.Module) -> CircuitConfig:
    """A fixed small circuit: 2 query heads (with their key/value head) in each of the 3 layers at
    3/4 depth, and 32 neurons in the layer above. Hand-picked, not located."""
    arch = get_arch(model)
    n = arch.dims.n_layers
    first = (3 * n) // 4
    comps = []
    for layer in range(first, min(first + 3, n)):
        comps += [("q", layer, 0), ("q", layer, 1), ("k", layer, arch.kv_head_of(0)), ("v", layer, arch.kv_head_of(0))]
    top = min(first + 3, n - 1)
    comps += [("mlp", top, i) for i in range(0, min(32, arch.dims.n_neurons))]
    return CircuitConfig.from_components(comps)


def _batch(tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> dict[str, torch.Tensor]:
    """Chat-formatted prompt + answer; loss only on the answer tokens, at least half the window kept for them
    (:func:`~circuit_peft.taskdata.examples.fit_to_length`). Returns input_ids/attention_mask/labels (B, T)."""
    examples = []
    for r in rows:
        p, a = encode_text_pair(tokenizer, build_prompt(tokenizer, r["question"], style="chat"),
                                r["answer"] + tokenizer.eos_token, add_special_tokens=False, add_eos=False)
        examples.append(answer_example(p, a, max_length, min_answer=max_length // 2))
    return PivotalCollator(pad_token_id=tokenizer.pad_token_id)(examples)


def run_demo(model_name: str = "smollm2", steps: int = 6, lr: float = 2e-3, output_dir: str = "circuit-demo-adapter",
             problems: int = 4, max_length: int = 128, load: LoadSpec | None = None) -> dict[str, float]:
    """Train the demo circuit (the model loaded as ``load`` says); returns ``{"loss_before", "loss_after",
    "seconds"}``."""
    if not 1 <= problems <= len(demo_problems()):
        raise ValueError(f"--adapter-problems must be between 1 and {len(demo_problems())}")
    _check_adapter_folder(output_dir)  # before any training
    torch.manual_seed(0)
    model = load_model(model_name, spec=load or LoadSpec())
    tokenizer = load_tokenizer(model_name, padding_side="right")
    config = demo_circuit(model)
    size = circuit_size(config, model)
    print(f"circuit: {size['components']} components of {size['total_components']} "
          f"({100 * size['component_fraction']:.3f} %), {size['trainable_params']:,} trainable parameters "
          f"({100 * size['param_fraction']:.3f} % of {size['total_params']:,})")
    model = get_peft_model(model, config)
    batch = {k: v.to(model.device) for k, v in _batch(tokenizer, demo_problems()[:problems], max_length).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)

    def loss_now() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    before = loss_now()
    print(f"loss before: {before:.4f}")
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(steps), desc="training the circuit"):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - start
    after = loss_now()
    print(f"loss after {steps} steps: {after:.4f} ({seconds:.1f} s)")
    with atomic_dir(Path(output_dir).resolve()) as tmp:  # a kill leaves the old adapter or this one, never a mix
        model.save_pretrained(tmp)
    print(f"adapter saved to {output_dir}/ (load: import circuit_peft; PeftModel.from_pretrained(base, {output_dir!r}))")
    return {"loss_before": before, "loss_after": after, "seconds": seconds}


def _check_adapter_folder(output_dir: str) -> None:
    """Refuse to replace a folder that is not a PEFT adapter (saving replaces the whole folder)."""
    path = Path(output_dir)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "adapter_config.json").exists())):
        raise ValueError(f"--output-dir {path} exists and is not an adapter folder (no adapter_config.json); "
                         "the demo replaces the whole folder, so give a new or an adapter folder")


def run_adapter_only(args: argparse.Namespace) -> int:
    run_demo(args.model, steps=args.steps, lr=args.lr, output_dir=args.output_dir, problems=args.adapter_problems,
             load=load_spec(args))
    return 0


# ----- the CCA demo ----------------------------------------------------------------------------------

# Our choice for a demo that finishes in a few minutes on 2 CPU cores (148 s measured): the first-wrong-digit pivot
# (one greedy trace per problem), short traces, a bounded loss with Adam and frequent validation.
CCA_DEMO_DEFAULTS: dict[str, Any] = dict(
    problems="demo", n_problems=32, heldout="demo", n_val=16, n_test=64, pivot="digit", n_samples=4,
    max_new_tokens=16, batch_size=16, locate="attribution", circuit_fraction=0.02, steps=10, lr=1e-3,
    optimizer="adam", loss="logsigmoid", eval_every=2, patience=3, mmlu_limit=5, truthfulqa_limit=20, kl_chunks=4,
    out="circuit-demo",
)


# The demo's `circuit-peft train` command line (sized for under 10 minutes on an idle 2-core CPU).
TRAIN_DEMO_ARGS: tuple[str, ...] = (
    "--data", "arithmetic", "--n-train", "64", "--heldout", "arithmetic", "--n-heldout", "100", "--epochs", "4",
    "--max-new-tokens", "32", "--locate", "gradient", "--circuit-fraction", "0.02",
)


def run_train_demo(args: argparse.Namespace) -> int:
    from ..cli import build_parser
    from .amplify import package_side_effect_dir

    out = args.out or "circuit-demo"
    argv = ["train", "--model", args.model, *TRAIN_DEMO_ARGS, "--side-effects-data", str(package_side_effect_dir()[0]),
            "--out", out] + (["--threads", str(args.threads)] if args.threads else [])
    argv += [x for flag in ("device", "dtype") if getattr(args, flag) != "auto" for x in (f"--{flag}", getattr(args, flag))]
    print("demo: circuit-peft " + " ".join(argv))
    start = time.perf_counter()
    train_args = build_parser().parse_args(argv)
    train_args.argv = argv
    code = train_args.func(train_args)
    print(f"demo finished in {time.perf_counter() - start:.0f} s (the CCA-update demo: circuit-peft demo --cca)")
    return code


def run(args: argparse.Namespace) -> int:
    if args.adapter_only:
        return run_adapter_only(args)
    if not args.cca:
        return run_train_demo(args)
    import time

    from . import amplify as amplify_command

    start = time.perf_counter()
    print(f"CCA demo on {args.model}: {args.n_problems} training problems, {args.n_val} validation, "
          f"{args.n_test} test (pivot={args.pivot}, locate={args.locate}, {args.steps} {args.optimizer} steps)")
    code = amplify_command.run(args)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return code


def add_parser(subparsers: Any) -> None:
    from ._cca import add_mining_args, add_problem_args, add_runtime_args
    from .amplify import add_amplify_args

    p = subparsers.add_parser(
        "demo", help="circuit-peft train end to end on the offline SmolLM2 (under 10 min on 2 cores)",
        description="Runs `circuit-peft train` on the built-in arithmetic problems. --cca runs the CCA-update "
                    "demo (`circuit-peft amplify` with demo settings; the amplify options apply to it); "
                    "--adapter-only the first adapter-only demo.",
    )
    add_runtime_args(p)
    add_problem_args(p, required=False)
    add_mining_args(p)
    add_amplify_args(p)
    p.add_argument("--out", help="output folder (default circuit-demo)")
    p.add_argument("--cca", action="store_true", help="the CCA-update demo (amplify; the options above apply to it)")
    a = p.add_argument_group("adapter-only demo")
    a.add_argument("--adapter-only", action="store_true", help="the fixed-circuit AdamW demo (no CCA)")
    a.add_argument("--adapter-problems", type=positive(int), default=4, help="bundled GSM8K problems to train on (1-8)")
    a.add_argument("--output-dir", default="circuit-demo-adapter", help="where the adapter-only demo saves")
    p.set_defaults(func=run, **CCA_DEMO_DEFAULTS)
