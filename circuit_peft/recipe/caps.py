"""Uncut baselines: the base model is measured with a token cap that cuts (almost) none of its answers.

A chat model answers at length before it gives the number; at a cap of 64 new tokens a third to more than
half of SmolLM2's answers were cut on two tasks (issue 36), so "before" was understated and "after -
before" inflated. :func:`uncut_measure` measures the base at the run's cap and, while more than
``max_cut_share`` (default :data:`MAX_CUT_SHARE`, 2 %) of its answers hit the cap, doubles the cap up to
``limit`` and measures again; at the limit it stops with an error that names the flags to set. ``train``
and ``compare`` then measure every trained arm at the cap the base needed, so before and after are read
alike.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import CircuitPeftError

MAX_CUT_SHARE = 0.02
MAX_NEW_TOKENS_LIMIT = 512


def check_cap_settings(max_new_tokens: int, limit: int, max_cut_share: float) -> None:
    """Refuse a limit below the cap or a share outside [0, 1] (``--max-new-tokens-limit``, ``--max-cut-share``)."""
    if int(limit) != limit or limit < max_new_tokens:
        raise CircuitPeftError(f"--max-new-tokens-limit must be an integer >= --max-new-tokens ({max_new_tokens}), "
                               f"got {limit!r}")
    if not 0 <= max_cut_share <= 1:
        raise CircuitPeftError(f"--max-cut-share must be in [0, 1], got {max_cut_share!r}")


def uncut_measure(measure: Callable[[int], dict[str, Any]], cap: int, limit: int,
                  max_cut_share: float = MAX_CUT_SHARE, log: Callable[[str], None] = print,
                  what: str = "the base model") -> dict[str, Any]:
    """``measure(cap)`` (a dict with ``capped_fraction``: the share of answers that hit the cap) at ``cap``,
    then at twice the cap, ... up to ``limit``, until at most ``max_cut_share`` of the answers are cut.
    Returns the last measurement with ``max_new_tokens`` (the cap used) and ``caps_tried``
    (``[{"max_new_tokens", "capped_fraction"}, ...]``); raises :class:`CircuitPeftError` when the limit
    still cuts too many."""
    tried = []
    while True:
        result = dict(measure(cap))
        tried.append({"max_new_tokens": cap, "capped_fraction": result["capped_fraction"]})
        if result["capped_fraction"] <= max_cut_share:
            return {**result, "max_new_tokens": cap, "caps_tried": tried}
        if cap >= limit:
            raise CircuitPeftError(
                f"{100 * result['capped_fraction']:.0f} % of {what}'s answers hit the token cap even at "
                f"--max-new-tokens-limit {limit} (allowed: {100 * max_cut_share:g} %); its accuracy would be "
                "understated: raise --max-new-tokens-limit, or accept cut answers with --max-cut-share")
        new = min(limit, 2 * cap)
        log(f"[cap] {100 * result['capped_fraction']:.0f} % of {what}'s answers hit the cap of {cap} new tokens "
            f"(allowed {100 * max_cut_share:g} %): measuring again at {new}")
        cap = new


__all__ = ["MAX_CUT_SHARE", "MAX_NEW_TOKENS_LIMIT", "check_cap_settings", "uncut_measure"]
