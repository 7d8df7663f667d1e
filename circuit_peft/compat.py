"""Every place circuit-peft changes or reads PEFT, TRL or transformers beyond their public API, in one module.

Each patch below is one function, recorded in :data:`PATCHES` with the package it touches, what it touches and the
version range it was written and tested for. ``tests/test_compat.py`` holds one test per patch: it fails when the
patch is gone or when the installed package leaves that range. Applying a patch on a version outside its range
warns (:class:`CompatWarning`) naming the patch and the range; it is still applied.

This module knows the upstream internals (which attribute to wrap, with which signature); what the circuit
adapter does inside a wrapper (a model card section, an atomic save, a refused broken folder) is passed in by
the tuner (``circuit_peft/tuner/``), so nothing here imports the tuner. Each wrapper calls the original and is
installed once (a marker attribute ``_circuit_peft`` on the wrapper keeps a second install a no-op).

The autoload hook's code lives in ``circuit_peft_autoload.py`` at the top level: it runs at interpreter start,
before ``circuit_peft`` (torch, transformers) may be imported. The attention-function wrapper of
``interventions.capture_qk`` is the execution layer's (the one place that hooks a model). Both are recorded
here with their ranges and tested.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterable, Iterator

_MARK = "_circuit_peft"


class CompatWarning(UserWarning):
    """A patch is applied to a package version outside the range it was tested for."""


@dataclass(frozen=True)
class Patch:
    """One reach into an upstream package: ``package``'s ``target``, tested for versions ``bounds`` (PEP 440)."""

    name: str
    package: str
    bounds: str
    target: str

    def installed(self) -> str | None:
        """The installed version of ``package`` (None: not installed)."""
        try:
            return version(self.package)
        except PackageNotFoundError:
            return None

    def in_bounds(self, installed: str | None = None) -> bool:
        """Whether ``installed`` (default: the installed version) lies in ``bounds``."""
        from packaging.specifiers import SpecifierSet

        installed = installed if installed is not None else self.installed()
        return installed is not None and SpecifierSet(self.bounds).contains(installed, prereleases=True)


PATCHES: dict[str, Patch] = {p.name: p for p in (
    Patch("peft_type", "peft", ">=0.21,<0.23",
          "peft.utils.PeftType gains a CIRCUIT member (aenum.extend_enum on a closed str enum)"),
    Patch("model_card", "peft", ">=0.21,<0.23",
          "PeftModel.create_or_update_model_card(self, output_dir) wrapped: the circuit section added after it"),
    Patch("adapter_saving", "peft", ">=0.21,<0.23",
          "peft.peft_model.safe_save_file(tensors, filename, metadata=) and PeftModel.save_pretrained(self, "
          "save_directory, ...) wrapped: a circuit adapter's weights and config committed atomically"),
    Patch("config_reading", "peft", ">=0.21,<0.23",
          "classmethods PeftConfigMixin.from_json_file(path_json_file, **kwargs) and the private "
          "PeftConfigMixin._get_peft_type(model_id, **hf_hub_download_kwargs) wrapped: a broken local folder named"),
    Patch("autoload", "peft", ">=0.21,<0.23",
          "circuit_peft_autoload.py: a sys.meta_path finder wraps the `peft` module's loader.exec_module and "
          "registers CIRCUIT right after `import peft` (needs a source loader with exec_module)"),
    Patch("signature_columns", "transformers", ">=5.16,<6",
          "Trainer._set_signature_columns_if_needed() / Trainer._signature_columns (private): the columns "
          "remove_unused_columns keeps"),
    Patch("attention_interface", "transformers", ">=5.16,<6",
          "ALL_ATTENTION_FUNCTIONS.get_interface(name, default) shadowed by an instance attribute while "
          "circuit_peft.interventions.capture_qk records q/k after rotary (its code stays in interventions/attention.py)"),
    Patch("fused_head_outputs", "trl", ">=1.16,<1.17",
          "SFTTrainer.compute_loss runs model(..., fused_lm_head=True), whose output holds per-token log_probs "
          "and label_mask (B, T-1); read by a forward hook on the model"),
)}


def check_bounds(name: str) -> bool:
    """Whether patch ``name``'s package is in its tested range; warns (:class:`CompatWarning`) when it is not."""
    patch = PATCHES[name]
    ok = patch.in_bounds()
    if not ok:
        warnings.warn(f"circuit-peft's {name} patch ({patch.target}) was tested for {patch.package}{patch.bounds}; "
                      f"{patch.package} {patch.installed()} is installed: run tests/test_compat.py on it",
                      CompatWarning, stacklevel=3)
    return ok


def is_patched(owner: Any, name: str) -> bool:
    """Whether ``owner.name`` is one of this module's wrappers."""
    attr = getattr(owner, name, None)
    return bool(getattr(getattr(attr, "__func__", attr), _MARK, False))


def _wrap(owner: Any, name: str, replacement: Callable[..., Any], kind: str = "method") -> None:
    """Replace ``owner.name`` by ``replacement(original, *args, **kwargs)`` (idempotent). ``kind``: "method" (the
    original bound to the instance), "classmethod" (bound to the class) or "function" (a module attribute)."""
    if is_patched(owner, name):
        return
    raw = owner.__dict__[name] if kind == "classmethod" else getattr(owner, name)
    original = raw.__func__ if kind == "classmethod" else raw

    if kind == "function":
        wrapper = functools.wraps(original)(lambda *a, **k: replacement(original, *a, **k))
    else:
        @functools.wraps(original)
        def wrapper(first: Any, *args: Any, **kwargs: Any) -> Any:
            return replacement(functools.partial(original, first), *args, **kwargs)
    setattr(wrapper, _MARK, True)
    setattr(owner, name, classmethod(wrapper) if kind == "classmethod" else wrapper)


# ----- PEFT ----------------------------------------------------------------------------------------
def extend_peft_type(name: str) -> None:
    """Add ``name`` to PEFT's closed ``PeftType`` enum (idempotent): ``register_peft_method`` accepts only a
    member (PEFT has no plugin entry point), and transformers' ``load_adapter`` reads ``peft_type.value``."""
    from peft.utils import PeftType

    if name not in PeftType.__members__:
        check_bounds("peft_type")
        from aenum import extend_enum

        extend_enum(PeftType, name, name)


def patch_model_card(after: Callable[[Any, str], None]) -> None:
    """``PeftModel.create_or_update_model_card(self, output_dir)`` runs PEFT's, then ``after(self, output_dir)``."""
    from peft import PeftModel

    def create_or_update_model_card(original: Callable[[str], None], output_dir: str) -> None:
        original(output_dir)
        after(original.args[0], output_dir)

    if not is_patched(PeftModel, "create_or_update_model_card"):
        check_bounds("model_card")
        _wrap(PeftModel, "create_or_update_model_card", create_or_update_model_card)


def patch_adapter_saving(save_file: Callable[..., None],
                         saving: Callable[[Any, str], AbstractContextManager]) -> None:
    """PEFT's weight writer becomes ``save_file(original, tensors, filename, metadata=None)``, and
    ``PeftModel.save_pretrained(self, save_directory, ...)`` runs inside ``saving(self, save_directory)``."""
    import peft.peft_model as peft_model
    from peft import PeftModel

    def save_pretrained(original: Callable[..., Any], save_directory: str, *args: Any, **kwargs: Any) -> Any:
        with saving(original.args[0], save_directory):
            return original(save_directory, *args, **kwargs)

    if not (is_patched(peft_model, "safe_save_file") and is_patched(PeftModel, "save_pretrained")):
        check_bounds("adapter_saving")
    _wrap(peft_model, "safe_save_file", save_file, kind="function")
    _wrap(PeftModel, "save_pretrained", save_pretrained)


def patch_config_reading(from_json_file: Callable[..., Any], get_peft_type: Callable[..., Any]) -> None:
    """``PeftConfigMixin.from_json_file`` becomes ``from_json_file(original, path_json_file, **kwargs)`` and
    ``PeftConfigMixin._get_peft_type`` becomes ``get_peft_type(original, model_id, **kwargs)`` (originals bound
    to the class the call was made on)."""
    from peft.config import PeftConfigMixin

    if not (is_patched(PeftConfigMixin, "from_json_file") and is_patched(PeftConfigMixin, "_get_peft_type")):
        check_bounds("config_reading")
    _wrap(PeftConfigMixin, "from_json_file", from_json_file, kind="classmethod")
    _wrap(PeftConfigMixin, "_get_peft_type", get_peft_type, kind="classmethod")


# ----- transformers / TRL trainers -------------------------------------------------------------------
def keep_signature_columns(trainer: Any, columns: Iterable[str]) -> None:
    """Make ``remove_unused_columns`` keep ``columns``: they are appended to the trainer's private
    ``_signature_columns`` (filled first by ``_set_signature_columns_if_needed``, as the trainer would)."""
    check_bounds("signature_columns")
    trainer._set_signature_columns_if_needed()
    trainer._signature_columns = [*trainer._signature_columns, *(c for c in columns
                                                                 if c not in trainer._signature_columns)]


def fused_head_outputs(compute_loss: Callable[..., Any], model: Any, inputs: dict[str, Any],
                       num_items_in_batch: Any = None) -> Any:
    """Run TRL's ``SFTTrainer.compute_loss`` (``compute_loss``, e.g. ``super().compute_loss``; it logs TRL's
    metrics) and return the output of its fused-LM-head forward: ``log_probs`` and ``label_mask``, (B, T-1).
    Raises ``ValueError`` when that forward returned no ``log_probs`` (label smoothing, sequence parallelism)."""
    from .interventions import capture_module_output

    check_bounds("fused_head_outputs")
    with capture_module_output(model) as captured:
        compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
    outputs = captured.get("out")
    if getattr(outputs, "log_probs", None) is None or getattr(outputs, "label_mask", None) is None:
        raise ValueError("PivotalSFTTrainer needs TRL's fused LM head outputs (per-token log_probs); "
                         "label smoothing and sequence parallelism are not supported: use PivotalTrainer")
    return outputs


@contextmanager
def no_patch(owner: Any, name: str) -> Iterator[None]:
    """Within the block, ``owner.name`` is the original again (for tests: the behaviour without the patch)."""
    attr = owner.__dict__[name]
    func = getattr(attr, "__func__", attr)
    if not getattr(func, _MARK, False):
        yield
        return
    original = func.__wrapped__
    setattr(owner, name, classmethod(original) if isinstance(attr, classmethod) else original)
    try:
        yield
    finally:
        setattr(owner, name, attr)
