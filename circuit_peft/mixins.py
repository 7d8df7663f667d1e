"""Give an existing trainer a mixin the way a subclass would: the one rule behind ``attach`` and ``use_sampler``."""

from __future__ import annotations

from typing import Any


def add_mixin(obj: Any, mixin: type, prefix: str) -> bool:
    """Make ``obj`` an instance of ``class <prefix><Class>(mixin, type(obj))`` (methods resolve through the
    class, ``super()`` reaches the original; nothing is patched on the instance). Returns False when
    ``obj`` already has the mixin."""
    if isinstance(obj, mixin):
        return False
    cls = type(obj)
    obj.__class__ = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
    return True
