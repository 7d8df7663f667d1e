"""Attribution, then the exact scan of its best candidates: the exact top heads at a fraction of the cost.

Attribution ranks every query head in one forward + backward per batch, but its first-order
estimate misorders the top heads (on SmolLM2 GSM8K it found 57 % of the exact scan's top 5 %).
:func:`refined_head_scan` takes attribution's top ``candidates x k`` heads (k = the heads kept) and
re-scores only those with the exact ablation scan
(:func:`~circuit_peft.locate.ablation.head_ablation_scan`), so the kept heads are ranked by their
exact loss increase; it misses an exact top head only when attribution ranks it below
``candidates x k``. A head whose first-order score is near zero (its effect cancels across positions, or
the loss is flat at the clean model but not along the way to the head's ablation) can sit far below that
line, so the top ``bound_candidates x k`` heads by the bound of the first-order term
(``sum_rows ||a' - a|| ||dL/da||``, from the same forward + backward: ``estimate="bound"``) join the
candidates; with ``ig_steps > 0`` the top ``ig_candidates x k`` heads by integrated gradients along the joint
ablation path join them too.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..circuit import Circuit
from ..circuits.selection import Keep
from ..errors import CircuitPeftError
from .registry import register_locator
from ..fractions import keep_count
from .ablation import DEFAULT_KEEP_FRACTION, head_ablation_scan
from .attribution import attribution_scan
from .estimate import ablation_estimates
from ..taskdata.examples import ProbeSpec


def refined_head_scan(
    model: nn.Module,
    tokenizer: Any,
    probe: Any,
    keep_fraction: float | None = DEFAULT_KEEP_FRACTION,
    candidates: float = 2.0,
    k: int | None = None,
    bound_candidates: float = 1.0,
    ig_steps: int = 0,
    ig_candidates: float = 1.0,
    method: str = "uniform",
    batch_size: int = 8,
    prompt_field: str = "prompt",
    solution_field: str = "solution",
    chat_template: bool | None = None,
    max_length: int | None = 1024,
    spec: ProbeSpec | None = None,
    progress: bool = True,
) -> Circuit:
    """Query heads ranked by the exact ablation scan, scanning only attribution's top candidates.

    Args:
        probe: rows ``{prompt, solution}`` (or as ``spec`` says), as for the ablation scan.
        keep_fraction: share of all query heads kept (k = :func:`~circuit_peft.fractions.keep_count`,
            rounded down), or ``k`` heads instead (then ``keep_fraction`` must be None).
        candidates: how many times k heads attribution passes to the exact scan (>= 1).
        bound_candidates: also pass the top ``bound_candidates x k`` heads by the bound of the first-order
            term (no extra pass; 0: none). Defaults 2 and 1: on the recipes' prompt (SmolLM2, three draws of 8
            problems) first-order candidates alone reached recall 0.79 / 0.86 / 0.71 of the exact top 5 %, with
            the bound's candidates 1.0 / 1.0 / 0.93 (``benchmarks/README.md``, locate.py).
        ig_steps / ig_candidates: with ``ig_steps > 0``, also pass the top ``ig_candidates x k`` heads by
            integrated-gradient attribution (``attribution_scan(..., ig_steps=)``, ``ig_steps`` more forward +
            backward passes per batch) to the exact scan.
        method: ablation operator (``uniform``, ``zero``, ``mean``) of both stages.
        prompt_field / solution_field / chat_template / max_length: how rows become token ids, or
            all four at once as ``spec``.

    Returns:
        a :class:`Circuit` of the top k candidates by exact score (nats per solution token);
        ``scores`` holds the exact scores of every candidate, ``meta["attribution"]`` the
        attribution score of each first-order candidate, ``meta["bound_candidates"]`` the heads the bound added
        (with their bound), ``meta["ig_candidates"]`` those integrated gradients added, and ``meta["candidates"]``
        their number.
    """
    if candidates < 1 or bound_candidates < 0 or (ig_steps and ig_candidates <= 0):
        raise ValueError(f"candidates must be >= 1, bound_candidates >= 0 and ig_candidates > 0 (got {candidates}, "
                         f"{bound_candidates}, {ig_candidates}): the exact scan re-scores attribution's top "
                         "candidates x kept heads")
    if (k is None) == (keep_fraction is None):
        raise ValueError("give one of keep_fraction= or k=")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    spec = ProbeSpec.resolve(spec, prompt_field=prompt_field, solution_field=solution_field,
                             chat_template=chat_template, max_length=max_length)
    batch = max(1, batch_size // 2)
    estimates = ablation_estimates(model, tokenizer, probe, method, ("q",), batch, spec, progress)
    ranked = estimates["first_order"].ranked(["q"])
    k = min(k, len(ranked)) if k is not None else keep_count(len(ranked), keep_fraction)
    chosen = ranked[: math.ceil(candidates * k)]
    by_bound = _not_in(estimates["bound"].ranked(["q"])[: math.ceil(bound_candidates * k)], chosen)
    by_ig = []
    if ig_steps:
        ig = attribution_scan(model, tokenizer, probe, target="ablation", method=method, kinds=("q",),
                              batch_size=batch, keep_fraction=None, spec=spec, progress=progress, ig_steps=ig_steps)
        by_ig = _not_in(ig.ranked(["q"])[: math.ceil(ig_candidates * k)], chosen + by_bound)
    heads = [(c.layer, c.index) for c, _ in chosen + by_bound + by_ig]
    exact = head_ablation_scan(model, tokenizer, probe, method=method, batch_size=batch_size, heads=heads,
                               keep_fraction=None, spec=spec, progress=progress)
    meta = dict(exact.meta, candidates=len(heads), candidates_factor=candidates, ig_steps=ig_steps,
                attribution=_named(chosen), bound_candidates=_named(by_bound), ig_candidates=_named(by_ig))
    refined = Circuit(exact.components, exact.scores, exact.fingerprint, method="refined_ablation", meta=meta)
    return refined.top(k=k)


def _not_in(ranked: list, taken: list) -> list:
    """The (component, score) pairs of ``ranked`` whose component is not among ``taken``'s."""
    seen = {c for c, _ in taken}
    return [(c, s) for c, s in ranked if c not in seen]


def _named(pairs: list) -> dict[str, float]:
    """``{"layer.head": score}`` of (component, score) pairs (the JSON form of a candidate list)."""
    return {f"{c.layer}.{c.index}": s for c, s in pairs}


@register_locator("refined", reads="probe", kinds=("q",), heads=True, z=False,
                  summary="ablation_estimate's (and its bound's) top candidates re-scored by the exact ablation scan")
def locate_by_refined_scan(model: nn.Module, tokenizer: Any, task_data: Any, keep: Any, **options: Any) -> Circuit:
    """Locator ``refined``: :func:`refined_head_scan`; ``keep`` gives k or a fraction of the query heads (the
    exact scan sees only candidates, so a z-score over all heads cannot be taken)."""
    rule = Keep.of(keep)
    if rule is None or rule.z is not None:
        raise CircuitPeftError(f"keep: the refined scan keeps fraction= or k= heads (the exact scan sees only "
                               f"candidates), got {rule}")
    return refined_head_scan(model, tokenizer, task_data, keep_fraction=rule.fraction, k=rule.k, **options)
