"""Atomic file writes: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    """Write ``data`` as JSON atomically (non-JSON values via ``str``)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str))


def check_output_path(path: str | os.PathLike, flag: str, inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Refuse, before any work, an output file that could not be written or that is one of ``inputs``.

    ``flag`` (e.g. ``"--out"``) names the option in the message. Creates no file; may create the parent folder.
    """
    path = Path(path)
    for source in inputs:
        if source is not None and Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise ValueError(f"{flag} {path} is also an input; writing it would replace the input. Choose another file")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    parent = path.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{flag} {path}: {p} is a file, not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create the folder {parent} ({err.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {parent} is not writable")
    return path
