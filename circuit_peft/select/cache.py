"""Chunked, resumable, multi-process scoring of a pool of examples.

:func:`score_in_chunks` splits ``n`` examples into chunks of ``chunk_size``; each finished chunk
is written atomically to the cache folder (temp file + ``os.replace``), so a killed run resumes
from the last finished chunk. Under ``torchrun`` / ``accelerate launch`` each process takes
every ``world_size``-th chunk and the results are gathered (``all_gather_object``) in order,
so every process returns the full score vector.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_arch, unwrap_model
from ..files import atomic_path, atomic_write_bytes


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture, the checkpoint name and the weights (per-tensor sums)."""
    model = unwrap_model(model)
    h = hashlib.sha256()
    h.update(json.dumps(get_arch(model).fingerprint(), sort_keys=True).encode())
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.detach().float().sum().item():.6e}".encode())
    return h.hexdigest()[:16]


def dist_info(init: bool = True) -> tuple[int, int]:
    """``(rank, world_size)``; starts a process group from torchrun/accelerate environment variables
    (gloo on CPU, nccl on GPU) when one is expected but not started yet."""
    if not torch.distributed.is_available():
        return 0, 1
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and init and "MASTER_ADDR" in os.environ:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend)
        atexit.register(_end_process_group)  # the group this started ends before the interpreter does
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _end_process_group() -> None:
    """Destroy the default process group if it is still up: a gloo group left to interpreter shutdown can
    abort the process ("terminate called without an active exception") after all its work is done."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class ScoreCache:
    """A folder ``root/<name>-<hash of key>/`` with one ``chunk-XXXXXXX.npy`` per finished chunk."""

    def __init__(self, root: str | os.PathLike, name: str, key: dict[str, Any]):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.dir = Path(root) / f"{name}-{digest}"
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            atomic_write_bytes(meta, json.dumps(key, indent=1, sort_keys=True, default=str).encode())

    def _path(self, chunk: int) -> Path:
        return self.dir / f"chunk-{chunk:07d}.npy"

    def load(self, chunk: int, size: int) -> np.ndarray | None:
        path = self._path(chunk)
        if not path.exists():
            return None
        try:
            values = np.load(path)
        except (ValueError, OSError, EOFError):
            return None  # unreadable: score the chunk again
        return values if values.shape == (size,) else None

    def save(self, chunk: int, values: np.ndarray) -> None:
        with atomic_path(self._path(chunk)) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(values, dtype=np.float64))
            f.flush()
            os.fsync(f.fileno())


def score_in_chunks(
    n: int,
    score_fn: Callable[[int, int, Callable[[int], None]], np.ndarray],
    chunk_size: int = 1024,
    cache: ScoreCache | None = None,
    desc: str = "scoring",
    progress: bool = True,
    tokens: Sequence[int] | None = None,
) -> np.ndarray:
    """Scores of examples ``0..n-1``; ``score_fn(start, stop, advance)`` returns the scores of one
    chunk and calls ``advance(n_done)`` after each batch (moves the progress bar).

    Finished chunks are read from ``cache``; the rest are split across processes. ``tokens``
    (per-example token counts) only feeds the throughput shown on the progress bar.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rank, world = dist_info()
    bounds = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    results: dict[int, np.ndarray] = {}
    todo = []
    for c, (s, e) in enumerate(bounds):
        cached = cache.load(c, e - s) if cache is not None else None
        if cached is not None:
            results[c] = cached
        elif c % world == rank:
            todo.append(c)
    total = sum(bounds[c][1] - bounds[c][0] for c in todo)
    bar = tqdm(total=total, desc=desc, unit="ex", disable=not progress or rank != 0 or total == 0)
    start_time = time.perf_counter()
    done = {"tokens": 0}

    def advance(k: int) -> None:
        bar.update(k)
        if tokens is not None:
            done["tokens"] += int(k * mean_tokens)
            bar.set_postfix(tok_s=f"{done['tokens'] / max(time.perf_counter() - start_time, 1e-9):.0f}")

    for c in todo:
        s, e = bounds[c]
        mean_tokens = float(np.mean(tokens[s:e])) if tokens is not None else 0.0
        values = np.asarray(score_fn(s, e, advance), dtype=np.float64)
        if values.shape != (e - s,):
            raise RuntimeError(f"score_fn returned shape {values.shape} for chunk [{s}, {e})")
        if cache is not None:
            cache.save(c, values)
        results[c] = values
    bar.close()
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, {c: results[c] for c in todo})
        for part in gathered:
            results.update(part)
        # every rank got here through the gather; the barrier settles its work before anything can end the
        # group (ending a gloo group while it still frees the gather's work deadlocks or aborts the process)
        torch.distributed.barrier()
    missing = [c for c in range(len(bounds)) if c not in results]
    if missing:
        raise RuntimeError(f"chunks {missing[:5]} were not scored by any process")
    return np.concatenate([results[c] for c in range(len(bounds))]) if bounds else np.zeros(0)
