"""Registers circuit-peft's ``CIRCUIT`` adapter type with PEFT as soon as ``peft`` is imported, so that
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``, transformers' ``load_adapter`` and
lm-evaluation-harness load a CIRCUIT adapter without ``import circuit_peft``.

Installed by the one-line ``circuit_peft_autoload.pth`` that pip puts in site-packages. At interpreter
start it only adds a finder to ``sys.meta_path`` (no import of torch or peft). Switch it off with
``CIRCUIT_PEFT_NO_AUTOLOAD=1``. It never raises: any failure leaves PEFT as it was.
"""

from __future__ import annotations

import os
import sys

ENV_SWITCH = "CIRCUIT_PEFT_NO_AUTOLOAD"

# bitsandbytes (the optional 4-bit extra; peft imports it whenever it is installed) logs this warning on
# every import on a CPU with AVX512-BF16 when the optional `kernels` package (which fetches a faster CPU
# 4-bit matmul from the Hugging Face hub) is absent. Its own fallback matmul is used and is correct, so
# the line is noise in every command; this filter drops that one message from that one logger.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_kernel_notice(record) -> bool:
    return not str(record.msg).startswith(_BNB_KERNEL_NOTICE)


def quiet_bitsandbytes_kernel_notice() -> None:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning (only that
    message, only from its logger); must run before bitsandbytes is imported. Idempotent."""
    import logging

    logger = logging.getLogger(_BNB_CPU_LOGGER)
    if _not_the_kernel_notice not in logger.filters:
        logger.addFilter(_not_the_kernel_notice)


class _RegisterAfterPeft:
    """A meta-path finder that lets ``peft`` load normally, then registers the CIRCUIT type."""

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        sys.meta_path.remove(self)  # once: find peft the normal way
        quiet_bitsandbytes_kernel_notice()  # peft imports bitsandbytes (when installed) as it loads
        try:
            import importlib.util

            spec = importlib.util.find_spec("peft")
        except Exception:
            return None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def _register() -> None:
    try:
        from circuit_peft.tuner.config import ensure_peft_type  # noqa: F401

        import circuit_peft.tuner  # noqa: F401  (registers CIRCUIT with PEFT)
    except Exception as err:  # never break `import peft`
        if os.environ.get("CIRCUIT_PEFT_AUTOLOAD_DEBUG"):
            print(f"circuit_peft_autoload: could not register CIRCUIT ({err!r})", file=sys.stderr)


def install() -> None:
    """Called from the .pth file at interpreter start."""
    if os.environ.get(ENV_SWITCH, "") not in ("", "0"):
        return
    if "peft" in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterPeft) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeft())
