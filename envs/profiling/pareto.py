"""The latency Pareto rule and the training budget range derived from a profile."""
from __future__ import annotations

import math
from typing import Mapping, Sequence


def pareto_frontier(configs: Sequence[Mapping], acc_key: str = "accuracy_mean",
                    lat_key: str = "latency_mean_ms") -> list[int]:
    """Indices of configs not dominated in (accuracy up, latency down).

    c' dominates c when acc' >= acc and lat' <= lat with at least one strict; exact ties are
    kept (neither dominates the other).
    """
    front = []
    for i, c in enumerate(configs):
        dominated = any(
            o[acc_key] >= c[acc_key] and o[lat_key] <= c[lat_key]
            and (o[acc_key] > c[acc_key] or o[lat_key] < c[lat_key])
            for j, o in enumerate(configs) if j != i
        )
        if not dominated:
            front.append(i)
    return front


# Headroom over the fastest configuration's p95 for the lowest budget: the episode also pays the
# Stage-2 controller's own time, and latency drifts a few percent between the profile and a run.
LOW_BUDGET_HEADROOM = 1.1

BUDGET_RANGE_RULE = (
    f"[{LOW_BUDGET_HEADROOM} x min over the latency Pareto frontier (accuracy up, mean latency down) of latency_p95_ms, "
    "max over the frontier of latency_p95_ms]: from the lowest budget that the fastest useful "
    "configuration meets 95% of the time (with headroom for the controller's own time) to the most "
    "accurate one's tail, so a policy can keep violations under 5% at every budget of the range and the "
    "top configuration fits at p95. If that span is empty (e.g. a one-point frontier), the same rule "
    "over all configurations is used instead."
)


def budget_range(configs: Sequence[Mapping]) -> tuple[list[float], str, list[int]]:
    """([lo, hi], which rule applied, frontier indices); see BUDGET_RANGE_RULE."""
    def span(p95s: list[float]) -> tuple[float, float]:
        return LOW_BUDGET_HEADROOM * min(p95s), max(p95s)

    front = pareto_frontier(configs)
    lo, hi = span([configs[i]["latency_p95_ms"] for i in front])
    rule = "pareto_frontier"
    if not 0 < lo < hi:
        lo, hi = span([c["latency_p95_ms"] for c in configs])
        rule = "all_configs (frontier span empty)"
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"budget range [{lo}, {hi}] from the profile is empty; need 0 < lo < hi")
    return [lo, hi], rule, front
