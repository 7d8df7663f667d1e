"""The primary statistic, the paired t test over seeds and Holm's correction (pure functions, no model).

**Test accuracy at drift budget B** (issue 36): for one arm and one seed, among its measured points
(every learning rate x checkpoint, plus the untrained base, which drifts 0) whose validation KL on
general text is <= B, take the one with the best validation accuracy (ties: the lower validation KL,
then the earlier point) and report its test accuracy. Nothing measured on the test split chooses.
Arms are compared by a paired t test over seeds (the seed is the unit of replication), and the p-values
of the whole list of comparisons x budgets are adjusted by Holm's step-down method.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..errors import CircuitPeftError
from ..stats import mean_se

ALPHA = 0.05


def best_at_budget(points: Sequence[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    """The point (``val_acc``, ``val_kl``, ``test_acc``, ...) with the best validation accuracy among
    those with ``val_kl <= budget`` (ties: lower ``val_kl``, then the earlier in ``points``); None if none."""
    inside = [(i, p) for i, p in enumerate(points) if p["val_kl"] <= budget]
    if not inside:
        return None
    return min(inside, key=lambda ip: (-ip[1]["val_acc"], ip[1]["val_kl"], ip[0]))[1]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired t test of ``a[i] - b[i]`` (one pair per seed): ``diff`` (mean), ``se``, ``t``, ``df``, ``p``
    (two-sided; None with fewer than two pairs), ``n`` and the per-pair ``diffs``."""
    if len(a) != len(b) or not a:
        raise CircuitPeftError(f"paired_t needs two equal, non-empty lists (got {len(a)} and {len(b)})")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    diff, se = mean_se(diffs)
    out: dict[str, Any] = {"diff": diff, "se": se, "n": len(diffs), "df": len(diffs) - 1, "diffs": diffs,
                           "t": None, "p": None}
    if se is None:
        return out
    if se == 0:
        out["t"], out["p"] = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
        return out
    out["t"] = diff / se
    out["p"] = t_two_sided_p(out["t"], out["df"])
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the input's order: sorted ascending, the k-th smallest
    (k from 0) is multiplied by ``m - k`` and kept at least as large as the ones before it, capped at 1.
    ``None`` entries (no test) stay None and do not count in ``m``."""
    order = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m, running = len(order), 0.0
    out: list[float | None] = [None] * len(pvalues)
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * float(pvalues[i])))
        out[i] = running
    return out


def arm_at_budget(points_by_seed: dict[int, list[dict[str, Any]]], budget: float) -> dict[int, dict[str, Any]]:
    """``{seed: chosen point}`` of one arm at ``budget`` (every seed's list holds the base point, KL 0, so a
    point is always found for a budget >= 0)."""
    chosen = {}
    for seed, points in sorted(points_by_seed.items()):
        point = best_at_budget(points, budget)
        if point is None:
            raise CircuitPeftError(f"budget {budget:g}: seed {seed} has no point with validation KL within it")
        chosen[seed] = point
    return chosen


def chosen_rate_kl(points_by_seed: dict[int, list[dict[str, Any]]]) -> float:
    """The validation KL of an arm at its validation-chosen rate (the last checkpoint of the rate with the
    best validation accuracy; ties: the lower KL), averaged over seeds: what a derived budget reads."""
    kls = []
    for points in points_by_seed.values():
        last = max(p.get("step", 0) for p in points)
        final = [p for p in points if p.get("lr") is not None and p.get("step", 0) == last]
        kls.append(best_at_budget(final, math.inf)["val_kl"])
    return sum(kls) / len(kls)


def resolve_budgets(specs: Sequence[str], points: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, float]:
    """``--budgets`` entries to KL values: a number (nats per token), ``ARM`` (that arm's validation KL at its
    validation-chosen rate, mean over seeds) or ``ARM/N`` (a N-th of it). ``points``: ``{arm: {seed: [...]}}``."""
    out = {}
    for spec in specs:
        try:
            out[spec] = float(spec)
            continue
        except ValueError:
            pass
        arm, _, div = spec.partition("/")
        if arm not in points:
            raise CircuitPeftError(f"--budgets {spec}: {arm!r} is not an arm of this run (arms: {', '.join(points)})")
        try:
            divisor = float(div) if div else 1.0
        except ValueError:
            raise CircuitPeftError(f"--budgets {spec}: {div!r} after '/' is not a number") from None
        if not divisor > 0:
            raise CircuitPeftError(f"--budgets {spec}: the divisor must be > 0")
        out[spec] = chosen_rate_kl(points[arm]) / divisor
    return out


def verdict(points: dict[str, dict[int, list[dict[str, Any]]]], budgets: dict[str, float],
            comparisons: Sequence[tuple[str, str]], alpha: float = ALPHA) -> dict[str, Any]:
    """The table and the tests: ``arms[arm][budget]`` = test accuracy at the budget (mean, SE over seeds,
    per seed, the chosen points), ``tests`` = one paired t per (comparison, budget) on the seeds both arms
    ran, with Holm-adjusted p-values over the whole list and ``significant`` (adjusted p < ``alpha``)."""
    arms: dict[str, dict[str, Any]] = {}
    for arm, by_seed in points.items():
        arms[arm] = {}
        for name, b in budgets.items():
            chosen = arm_at_budget(by_seed, b)
            mean, se = mean_se([p["test_acc"] for p in chosen.values()])
            arms[arm][name] = {"test_acc": mean, "se": se, "per_seed": {s: p["test_acc"] for s, p in chosen.items()},
                               "points": {s: {k: p.get(k) for k in ("lr", "step", "val_acc", "val_kl", "test_acc",
                                                                    "test_kl")} for s, p in chosen.items()}}
    tests = []
    for a, b in comparisons:
        for name in budgets:
            seeds = sorted(set(arms[a][name]["per_seed"]) & set(arms[b][name]["per_seed"]))
            t = paired_t([arms[a][name]["per_seed"][s] for s in seeds], [arms[b][name]["per_seed"][s] for s in seeds])
            tests.append({"a": a, "b": b, "budget": name, "budget_kl": budgets[name], "seeds": seeds, **t})
    for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
        test["p_holm"] = adjusted
        test["significant"] = adjusted is not None and adjusted < alpha
    return {"budgets": budgets, "alpha": alpha, "arms": arms, "tests": tests}


__all__ = ["ALPHA", "arm_at_budget", "best_at_budget", "betainc", "chosen_rate_kl", "holm", "paired_t",
           "resolve_budgets", "t_two_sided_p", "verdict"]
