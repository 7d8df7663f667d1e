"""``circuit-peft export``: serve a CIRCUIT adapter where only plain models or LoRA are understood.

``--merged OUT`` writes the base model with the circuit merged in (a plain transformers folder, with
the tokenizer); ``--lora OUT`` writes an exact standard LoRA adapter (``peft.save_as_lora``: a slice
delta has rank at most its width, so the SVD at that rank is exact) and prints the ``max_lora_rank`` a
vLLM server needs to load it (or, when a module is wider than vLLM's 512, that it cannot, and ``--merged``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..export import export_lora, serving_note
from ..files import check_adapter_folder


def _check_out(path: str | None, flag: str) -> None:
    if path is None:
        return
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ValueError(f"{flag} {p} exists and is not an empty folder; choose a new one")


def run(args: argparse.Namespace) -> int:
    import peft
    from peft import PeftModel

    from ..models import load_model, load_tokenizer, resolve_model_path

    if not args.merged and not args.lora:
        raise ValueError("give --merged OUT and/or --lora OUT")
    adapter = check_adapter_folder(args.adapter)
    _check_out(args.merged, "--merged")
    _check_out(args.lora, "--lora")
    base_name = args.model or peft.PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path  # local or hub
    if not base_name:
        raise ValueError(f"{adapter / 'adapter_config.json'} names no base model: pass --model")
    model = PeftModel.from_pretrained(load_model(base_name), str(adapter))
    if args.lora:
        export_lora(model, args.lora)
        print(f"LoRA adapter (exact) written to {args.lora}")
        print(serving_note(args.lora, base=resolve_model_path(base_name), adapter=str(adapter)))
    if args.merged:
        merged = model.merge_and_unload()
        merged.save_pretrained(args.merged)
        load_tokenizer(base_name).save_pretrained(args.merged)
        print(f"merged model written to {args.merged}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="merged model or exact LoRA adapter from a CIRCUIT adapter",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="a saved CIRCUIT adapter folder")
    p.add_argument("--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--merged", default=None, help="write the merged model here")
    p.add_argument("--lora", default=None, help="write an exact LoRA adapter here")
    p.set_defaults(func=run)
