"""Output folders that cannot be mixed: the settings and inputs that made a folder, and one writer at a time.

Every command that writes a folder (``train``, ``amplify``, ``mine``, ``select --cache-dir``) opens it through :class:`OpenRun`
before any model is loaded; ``recipe.RunFolder`` adds resumable stages on top. What a folder is keyed by is one
config through a :class:`RunSchema` (``train``'s TRAIN_SCHEMA, ``compare``'s COMPARE_SCHEMA, the CLI's per command):
its fields less those that may change on a resume, and less the fields added after folders were made while they
hold the value those folders implicitly had (so an older folder resumes); a change that must not resume older
folders bumps the schema's version, which then enters the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .files import atomic_write_json, pid_alive


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (settings, data rows)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass(frozen=True)
class RunSchema:
    """How one kind of run folder is keyed. ``volatile``: fields that may change on a resume (what they change
    is added beside the finished stages, e.g. controls, search bounds); ``added``: fields added after version 1,
    each with the value folders made before it implicitly had (left out of the key at that value); a dotted name
    (``recipe.seed``) reaches into a nested config. ``version``: 1 for every folder made so far; a higher version
    is written into the key (``schema``: ``kind/version``). ``nest``: the settings field the config sits under
    (``None``: its fields sit beside the inputs, as in the first compare folders)."""

    kind: str
    version: int = 1
    volatile: tuple[str, ...] = ()
    added: Mapping[str, Any] = field(default_factory=dict)
    nest: str | None = "config"

    def config(self, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """``values`` as keyed: volatile fields dropped, added fields dropped at their original value (nested
        dicts alike, under their dotted names)."""
        out: dict[str, Any] = {}
        for k, v in values.items():
            name = f"{prefix}{k}"
            if name in self.volatile or (name in self.added and _same(v, self.added[name])):
                continue
            out[k] = self.config(v, f"{name}.") if isinstance(v, dict) else v
        return out

    def settings(self, values: Mapping[str, Any], **inputs: Any) -> dict[str, Any]:
        """The settings a folder is keyed by: ``inputs`` (model, fingerprints, ...) and :meth:`config` of
        ``values`` under ``nest`` (or beside the inputs); the schema's version when above 1."""
        config = self.config(values)
        if self.nest is None and set(config) & set(inputs):
            raise ValueError(f"{self.kind} run settings: {sorted(set(config) & set(inputs))} both input and config")
        out = {**inputs, **(config if self.nest is None else {self.nest: config})}
        if self.version > 1:
            out["schema"] = f"{self.kind}/{self.version}"
        return out


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON (a tuple equals the list it is saved as)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


class OpenRun:
    """An output folder that remembers the settings and inputs that made it (``run.json``) and holds a
    lock while a process writes into it. ``open()`` refuses, before any work: a file, a folder of another
    run (naming the settings that differ), a non-empty folder of something else, an unwritable folder,
    a second live writer."""

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any], flag: str = "--out",
                 adopt: Callable[[Path], bool] | None = None):
        """``adopt(folder)``: True for a folder without ``run.json`` that may become this run's (e.g. a
        score cache written before caches were run folders)."""
        self.path, self.flag, self.adopt = Path(path), flag, adopt
        self.key = fingerprint(settings)
        self.settings = settings

    def open(self) -> None:
        """Create the folder, or check that it belongs to this run; raise before any work otherwise."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.flag} {self.path} is a file, not a folder")
        run = self.path / "run.json"
        if run.exists():
            old = json.loads(run.read_text())
            if old.get("key") != self.key:
                was, now = _flat(old.get("settings", {})), _flat(self.settings)
                diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
                raise ValueError(f"{self.path} holds another run (different {', '.join(diff) or 'settings'}); "
                                 f"use another {self.flag} folder or delete this one")
        elif self.path.exists() and any(self.path.iterdir()) and not (self.adopt and self.adopt(self.path)):
            raise ValueError(f"{self.path} is not empty and holds no circuit-peft run; use another {self.flag}")
        self.path.mkdir(parents=True, exist_ok=True)
        if not os.access(self.path, os.W_OK):
            raise ValueError(f"{self.flag} {self.path} is not writable")
        self._lock()
        atomic_write_json(run, {"key": self.key, "settings": self.settings})

    def _lock(self) -> None:
        """Refuse a second live process on this folder (a lock left by a killed one is taken over)."""
        lock = self.path / "lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = int((lock.read_text().strip() or "0")) if lock.exists() else 0
            if pid and pid != os.getpid() and pid_alive(pid):
                raise ValueError(f"{self.path} is in use by process {pid}; wait for it or use another {self.flag}") from None
            lock.write_text(str(os.getpid()))
            return
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))

    def close(self) -> None:
        (self.path / "lock").unlink(missing_ok=True)


__all__ = ["OpenRun", "RunSchema", "fingerprint"]
