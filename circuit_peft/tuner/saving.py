"""Adapter folders that survive a kill, and loading that names the broken file (docs/reliability.md).

PEFT's ``PeftModel.save_pretrained`` writes, per adapter, ``adapter_model.safetensors`` and then
``adapter_config.json`` straight into the folder, so a SIGKILL can leave an empty config or a cut
weights file (and the adapter that was there is lost). For a model holding a CIRCUIT adapter,
:func:`install` makes that save commit each CIRCUIT adapter's two files like this:

1. the weights go to a temporary beside them (``adapter_model.safetensors.tmp<pid>``), flushed to disk;
2. ``CircuitConfig.save_pretrained`` writes the config to ``adapter_config.json.tmp<pid>`` with the sha256
   of those weights (``weights_sha256``), flushed to disk;
3. the weights' temporary is renamed over the weights, then the config's over the config.

A kill before step 3 leaves the old adapter; after it, the new one; between the two renames, the new
weights beside the old config and the complete new config in its temporary: :func:`finish_killed_save`
(run by the next load and the next save) sees that the dead writer's temporary config names the weights
now in place and renames it, so the folder loads as the new adapter. The flush in steps 1-2 keeps the
renames fast (ext4 flushes a file renamed over another: milliseconds otherwise). With several adapters
each adapter's folder is one save's; a kill between two adapters leaves some new beside some old.

Loading: reading a local folder's config (``PeftModel.from_pretrained``, ``load_adapter``,
``CircuitConfig.from_pretrained``) first finishes a killed save (:func:`finish_killed_save`). A config
that PEFT itself cannot read (empty, cut, missing) is refused by :func:`circuit_peft.files.check_adapter_folder`,
for any adapter type (the type is not known yet); a CIRCUIT folder without weights or with cut weights is
refused by the same check when PEFT reads its type to load it (a hub id keeps PEFT's own errors). When the
tuner first injects an adapter whose config was read from a local folder, :func:`check_saved_adapter` refuses weights whose sha256 is not the
one the config recorded (and cut weights, for ``config=`` passed by hand), before any weight is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .. import compat
from ..errors import CircuitPeftError
from ..files import ADAPTER_WEIGHT_FILES, atomic_path, check_adapter_folder, pid_alive, recover_file

PEFT_TYPE_NAME = "CIRCUIT"  # the adapter type's name in PEFT's enum and in every saved adapter_config.json
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FLAG = "adapter folder"  # how check_adapter_folder's messages name the folder on the API path


@dataclass
class _Save:
    """One ``PeftModel.save_pretrained`` of a model holding a CIRCUIT adapter."""

    circuit_dirs: set[str]  # absolute folders the CIRCUIT adapters are written to
    pending: dict[str, tuple[Path, str]] = field(default_factory=dict)  # weights path -> (temporary, sha256)


_SAVE: ContextVar[Optional[_Save]] = ContextVar("circuit_peft_save", default=None)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _temporary(path: str | os.PathLike) -> Path:
    """This process's temporary for ``path``: atomic_path's name, so recover_file removes a dead writer's."""
    return Path(f"{path}.tmp{os.getpid()}")


def saved_weights_digest(save_directory: str | os.PathLike) -> Optional[str]:
    """The sha256 of the weights this save wrote for ``save_directory`` (None: none written by it)."""
    save = _SAVE.get()
    entry = save.pending.get(os.path.abspath(os.path.join(save_directory, WEIGHTS_NAME))) if save else None
    return entry[1] if entry else None


def write_config(save_directory: str | os.PathLike, text: str) -> None:
    """Steps 2-3 of the module docstring: ``text`` to a flushed temporary, then this save's weights for
    ``save_directory`` renamed into place (if it wrote any), then the config."""
    path = Path(save_directory) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_file(path)
    tmp = _temporary(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _fsync(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    save = _SAVE.get()
    entry = save.pending.pop(os.path.abspath(os.path.join(save_directory, WEIGHTS_NAME)), None) if save else None
    if entry is not None:
        os.replace(entry[0], Path(save_directory) / WEIGHTS_NAME)
    os.replace(tmp, path)


def finish_killed_save(folder: str | os.PathLike) -> bool:
    """Finish the commit of a save killed between its two renames: a dead writer's complete temporary config
    that names the weights now in the folder replaces the config. Whether it did."""
    folder = Path(folder)
    weights, digest = folder / WEIGHTS_NAME, None
    for tmp in sorted(folder.glob(f"{CONFIG_NAME}.tmp*")) if weights.is_file() else []:
        pid = tmp.name[len(CONFIG_NAME) + 4:]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        try:
            recorded = json.loads(tmp.read_text(encoding="utf-8")).get("weights_sha256")
        except (ValueError, OSError, AttributeError):
            continue  # killed while writing it: the weights were not renamed yet
        digest = digest or file_sha256(weights)
        if recorded == digest:
            os.replace(tmp, folder / CONFIG_NAME)
            return True
    return False


def check_saved_adapter(folder: str | os.PathLike, weights_sha256: Optional[str]) -> None:
    """Refuse a local adapter folder whose weights would not load as the config read from it: a cut weights
    file (:func:`check_adapter_folder`) or weights whose sha256 is not ``weights_sha256`` (the digest that
    config recorded; None: not checked). A folder without weights passes: a config saved on its own may seed
    a new adapter (``get_peft_model``); the loading paths refuse it when they read its type."""
    weights = Path(folder) / WEIGHTS_NAME
    if not os.path.isdir(folder) or not any((Path(folder) / n).is_file() for n in ADAPTER_WEIGHT_FILES):
        return  # a hub id (PEFT resolves it), or a config without weights
    check_adapter_folder(folder, flag=FLAG)
    if weights_sha256 and weights.is_file() and file_sha256(weights) != weights_sha256:
        raise CircuitPeftError(
            f"{weights}: not the weights that {Path(folder) / CONFIG_NAME} was saved with (another process is "
            f"saving into {folder}, or the files come from two saves); re-save the adapter")


def _save_file(original, tensors: dict, filename: str, metadata: Optional[dict] = None) -> None:
    """safetensors' ``save_file``. Inside a circuit save: a CIRCUIT adapter's weights go to a flushed
    temporary that waits for its config (:func:`write_config`); any other file is written atomically."""
    save = _SAVE.get()
    if save is None:
        return original(tensors, filename, metadata=metadata)
    recover_file(filename)
    path = os.path.abspath(filename)
    if os.path.dirname(path) not in save.circuit_dirs:
        with atomic_path(filename) as tmp:
            original(tensors, str(tmp), metadata=metadata)
        return
    tmp = _temporary(path)
    original(tensors, str(tmp), metadata=metadata)
    _fsync(tmp)
    save.pending[path] = (tmp, file_sha256(tmp))


@contextmanager
def circuit_save(model: Any, save_directory: str) -> Iterator[None]:
    """The span of one ``PeftModel.save_pretrained`` of ``model``: when it holds a CIRCUIT adapter, its files
    commit as the module docstring says (installed by :func:`install` through ``circuit_peft.compat``)."""
    circuits = [name for name, c in model.peft_config.items() if c.peft_type == PEFT_TYPE_NAME]
    if not circuits:
        yield
        return
    save = _Save({os.path.abspath(os.path.join(save_directory, n) if n != "default" else save_directory)
                  for n in circuits})
    for folder in save.circuit_dirs:
        finish_killed_save(folder)  # before this save's own temporaries replace the dead one's
    token = _SAVE.set(save)
    try:
        yield
    finally:
        _SAVE.reset(token)
        for tmp, _ in save.pending.values():  # weights whose config was never written (an error between)
            tmp.unlink(missing_ok=True)


def _is_local(model_id: str) -> bool:
    """Whether ``model_id`` names a local folder, existing or not (an absolute path, or one whose parent
    folder exists here) rather than a hub id like ``org/name``."""
    parent = os.path.dirname(str(model_id))
    return os.path.isdir(model_id) or os.path.isabs(model_id) or bool(parent) and os.path.isdir(parent)


def read_config_json(original: Callable[..., Any], path_json_file: str, **kwargs: Any) -> Any:
    """PEFT's ``from_json_file`` (``original``); an ``adapter_config.json`` that is empty, cut or not JSON is
    refused naming the folder and file (:func:`check_adapter_folder`)."""
    try:
        return original(path_json_file, **kwargs)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        if os.path.basename(path_json_file) == CONFIG_NAME:
            check_adapter_folder(os.path.dirname(path_json_file) or ".", flag=FLAG)  # raises, naming the file
        raise


def read_peft_type(original: Callable[..., Any], model_id: str, **kwargs: Any) -> Any:
    """PEFT's ``_get_peft_type`` (``original``) for a local folder: a killed save finished first, a config
    without ``peft_type`` or missing refused naming the folder and file, and a CIRCUIT folder's weights checked
    before it loads. Anything that is not a local folder (a hub id, with or without ``subfolder``) keeps
    PEFT's own error."""
    subfolder = kwargs.get("subfolder")
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(folder):
        finish_killed_save(folder)  # before the config is read
    try:
        peft_type = original(model_id, **kwargs)
    except (ValueError, KeyError):  # no config found, or one without peft_type
        if _is_local(model_id):  # a local folder, or one a kill never made, is ours to explain;
            check_adapter_folder(folder, flag=FLAG)  # raises, naming the folder or file; a hub failure stays PEFT's
        raise
    if peft_type == PEFT_TYPE_NAME and os.path.isdir(folder):  # loading it: its weights must be there
        check_adapter_folder(folder, flag=FLAG)
    return peft_type


def install() -> None:
    """Install the saving and config-reading patches (idempotent; their version bounds: ``circuit_peft.compat``);
    ``circuit_peft.tuner.register`` calls it."""
    compat.patch_adapter_saving(_save_file, circuit_save)
    compat.patch_config_reading(read_config_json, read_peft_type)
