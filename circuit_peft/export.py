"""The exact LoRA export of a CIRCUIT adapter, and the ``max_lora_rank`` a LoRA server needs to load it.

``peft.save_as_lora(folder, model, rank=1.0)`` keeps every singular value of each module's delta, so
the export is exact: a module's LoRA rank is the rank of its slice delta (at most the slice width:
``head_dim`` rows per query/key/value head, one row or column per neuron; plus ``r`` with a LoRA
branch). PEFT writes ``r=1`` and each module's rank in ``rank_pattern``. vLLM refuses an adapter
whose widest rank (``max(r, *rank_pattern.values())``) exceeds the server's ``max_lora_rank``, which
takes only the values in :data:`VLLM_MAX_LORA_RANKS` (at most 512).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import located

VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


def _lora_config(folder: str | Path) -> dict:
    """``adapter_config.json`` of a saved LoRA adapter (CircuitPeftError naming the file otherwise)."""
    path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise located(str(path), f"cannot read the LoRA adapter config ({err})") from err
    if config.get("peft_type") != "LORA":
        raise located(f"{path}: peft_type", f"is {config.get('peft_type')!r}, not a LoRA adapter")
    return config


def lora_ranks(folder: str | Path) -> dict[str, int]:
    """Each LoRA module's rank in a saved LoRA adapter ``folder`` (``rank_pattern`` entries, and ``r``
    for the listed target modules that have none)."""
    config = _lora_config(folder)
    r, pattern = int(config["r"]), {k: int(v) for k, v in (config.get("rank_pattern") or {}).items()}
    targets = config.get("target_modules") or []
    plain = {} if isinstance(targets, str) else {t: r for t in targets if t not in pattern}
    return {**plain, **pattern}


def widest_lora_rank(folder: str | Path) -> int:
    """The rank vLLM compares with ``max_lora_rank``: ``max(r, *rank_pattern.values())`` of the adapter."""
    config = _lora_config(folder)
    return max([int(config["r"]), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest vLLM ``max_lora_rank`` that serves a LoRA of widest rank ``rank``; None above 512."""
    if rank < 1:
        raise located("rank", f"must be >= 1, got {rank}")
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


def export_lora(model, folder: str | Path) -> int:
    """Write ``model``'s active CIRCUIT adapter as an exact standard LoRA adapter to ``folder``
    (``peft.save_as_lora`` at energy 1.0); returns its widest rank (:func:`widest_lora_rank`)."""
    import peft

    peft.save_as_lora(str(folder), model, rank=1.0)
    return widest_lora_rank(folder)


def serving_note(folder: str | Path, base: str = "BASE", adapter: str = "ADAPTER") -> str:
    """What a server needs to load the LoRA export in ``folder`` (made from ``adapter`` on ``base``):
    vLLM's ``max_lora_rank``, or, when a module is wider than vLLM allows, which modules and the merged
    export to serve instead."""
    rank = widest_lora_rank(folder)
    server_rank = vllm_max_lora_rank(rank)
    if server_rank is not None:
        return (f"widest LoRA rank {rank}: serve it with vLLM at max_lora_rank={server_rank}, e.g. "
                f"`vllm serve {base} --enable-lora --max-lora-rank {server_rank} --lora-modules circuit={folder}`")
    wide = sorted(m for m, r in lora_ranks(folder).items() if r > VLLM_MAX_LORA_RANKS[-1])
    return (f"widest LoRA rank {rank} is above vLLM's largest max_lora_rank ({VLLM_MAX_LORA_RANKS[-1]}) in "
            f"{len(wide)} module(s) ({', '.join(wide[:3])}{', ...' if len(wide) > 3 else ''}): vLLM cannot load "
            "this LoRA (one module's delta cannot be split exactly into one adapter of allowed ranks); serve "
            f"the merged model instead: `circuit-peft export --adapter {adapter} --merged OUT`")


__all__ = ["VLLM_MAX_LORA_RANKS", "export_lora", "lora_ranks", "serving_note", "vllm_max_lora_rank",
           "widest_lora_rank"]
