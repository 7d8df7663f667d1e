"""Atomic file writes: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import CircuitPeftError


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


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it takes ``path``'s place by renames,
    so a kill leaves the old folder or the new one, never a mix (e.g. one adapter's weights with
    another's config). On an exception the temporary folder is removed and ``path`` is untouched."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp, old = (path.with_name(f".{path.name}.{tag}{os.getpid()}") for tag in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id is running (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dir(path: str | os.PathLike) -> None:
    """Clean up after :func:`atomic_dir` writers that were killed (SIGKILL runs no ``finally``): a kill
    between the two renames left ``path`` missing with the old folder in ``.NAME.old<pid>`` and the
    finished new one in ``.NAME.tmp<pid>``: the new one takes ``path``'s place; every other leftover
    of a dead writer is removed. Leftovers of a live writer are left alone."""
    import re
    import shutil

    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)(\d+)$")
    found = [(m.group(1), int(m.group(2)), p) for p in path.parent.glob(f".{path.name}.*")
             if (m := pattern.match(p.name))]
    dead = [(tag, pid, p) for tag, pid, p in found if pid != os.getpid() and not pid_alive(pid)]
    for tag, pid, p in dead:
        if tag == "old" and not path.exists():  # killed between the renames: the tmp folder is complete
            new = path.with_name(f".{path.name}.tmp{pid}")
            os.replace(new if new.exists() else p, path)
    for _, _, p in dead:
        shutil.rmtree(p, ignore_errors=True)


def recover_file(path: str | os.PathLike) -> None:
    """Remove the temporaries that :func:`atomic_path` writers of ``path`` left when killed (dead process ids)."""
    path = Path(path)
    for p in path.parent.glob(f"{path.name}.tmp*"):
        pid = p.name[len(path.name) + 4:]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)


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


ADAPTER_WEIGHT_FILES: tuple[str, ...] = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter_folder(path: str | os.PathLike, flag: str = "--adapter") -> Path:
    """Refuse, before any model loads, a PEFT adapter folder that cannot load: missing, no or unreadable
    ``adapter_config.json`` (or one without ``peft_type``), no weights file, a truncated safetensors file.

    A hub id (a path that does not exist locally and looks like ``owner/name``) is passed through. The CLI
    checks ``--adapter`` with it; loading a CIRCUIT adapter checks its folder with it too (tuner/saving.py)."""
    folder = Path(path)
    if not folder.exists():
        if len(str(path).split("/")) == 2 and not str(path).startswith((".", "/")):
            return folder  # a hub adapter id: PEFT resolves it
        raise CircuitPeftError(f"{flag} {folder}: no such folder")
    config = folder / "adapter_config.json"
    if not folder.is_dir() or not config.is_file():
        raise CircuitPeftError(f"{flag} {folder}: no adapter_config.json (is it a saved adapter folder?)")
    try:
        fields = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CircuitPeftError(f"{config}: not valid JSON ({err}); re-save the adapter") from None
    if not isinstance(fields, dict) or "peft_type" not in fields:
        raise CircuitPeftError(f"{config}: no 'peft_type' field, so PEFT cannot tell which adapter this is; "
                               "re-save the adapter")
    weights = [folder / name for name in ADAPTER_WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise CircuitPeftError(f"{flag} {folder}: no weights ({' or '.join(ADAPTER_WEIGHT_FILES)}); "
                               "the save did not finish")
    if weights[0].suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights[0]), "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            raise CircuitPeftError(f"{weights[0]}: unreadable ({err}); the file is truncated or damaged: "
                                   "re-save the adapter") from None
    return folder


ROW_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson", ".json", ".csv")


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a local ``.jsonl``/``.ndjson``/``.json``/``.csv`` file, as dicts: THE row reader of every command.

    Errors name the file and line: a missing file, a malformed JSON line, a line that is not an
    object, bytes that are not UTF-8 (with the fix), an unknown suffix, a file without rows.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no data file at {p}")
    suffix = p.suffix.lower()
    if suffix not in ROW_FILE_SUFFIXES:
        raise ValueError(f"{p}: unknown data file type {suffix!r}; use {', '.join(ROW_FILE_SUFFIXES)}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{p}:{line}: not UTF-8 text (byte {raw[err.start]:#04x}); save the file as UTF-8") from None
    if suffix == ".csv":
        import csv
        import io

        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    elif suffix == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}:{err.lineno}: not valid JSON ({err.msg})") from None
        rows = loaded if isinstance(loaded, list) else (loaded.get("data") or loaded.get("rows")
                                                        if isinstance(loaded, dict) else None)
        if not isinstance(rows, list):
            raise ValueError(f"{p}: a .json data file holds a list of rows (or {{'data': [...]}})")
    else:
        rows = _json_lines(p, text)
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{p}: row {bad} is a {type(rows[bad]).__name__}, not an object with fields")
    if not rows:
        raise ValueError(f"{p} holds no rows")
    return rows


def _json_lines(p: Path, text: str) -> list[Any]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}:{lineno}: not valid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{p}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows
