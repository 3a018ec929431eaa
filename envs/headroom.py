"""Structural headroom: how much per-question adaptation can buy over the best static configuration.

At a budget B, among the static configurations whose p95 latency fits (<= B):
  * best static   - the one configuration with the best overall accuracy;
  * family oracle - each question family takes its own best configuration.
headroom(B) = family-oracle accuracy - best-static accuracy. A controller that only learns "which
family is this, how much budget is there" can close it; more than that needs per-sample signal.

Structure: if accuracy never falls when a knob is raised, then at a budget where one fitting
configuration is at least as large as every other fitting one in every knob, the static and the
family choices coincide and the headroom is zero whatever the weights. `knobs` (optional) gives
each configuration's knob values in that order, and the report lists the undominated fitting
configurations per budget: only budgets with two or more can hold headroom.

Honesty: the maximum over ~75 noisy accuracy estimates is biased upward, so the CHOICES are made
on one split (val) and the accuracies READ on another (test). Accuracy tables are
{config name: {family: accuracy}}; the overall accuracy is the family-share-weighted mean.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence


def _overall(acc: Mapping[str, float], shares: Mapping[str, float]) -> float:
    return sum(shares[f] * acc[f] for f in shares)


def headroom_choices(
    choose: Mapping[str, Mapping[str, float]],
    p95_ms: Mapping[str, float],
    shares: Mapping[str, float],
    budget_ms: float,
) -> tuple[str, dict[str, str], list[str]] | None:
    """(best static, {family: its best configuration}, the fitting configurations) at one budget,
    chosen on `choose` alone (ties: the lower p95), or None when no configuration fits."""
    fits = sorted(c for c in choose if p95_ms[c] <= budget_ms)
    if not fits:
        return None
    static = max(fits, key=lambda c: (_overall(choose[c], shares), -p95_ms[c]))
    family_choice = {f: max(fits, key=lambda c: (choose[c][f], -p95_ms[c])) for f in shares}
    return static, family_choice, fits


def budget_headroom(
    choose: Mapping[str, Mapping[str, float]],
    read: Mapping[str, Mapping[str, float]],
    p95_ms: Mapping[str, float],
    shares: Mapping[str, float],
    budget_ms: float,
    knobs: Mapping[str, Sequence[float]] | None = None,
) -> dict | None:
    """The headroom report at one budget, or None when no configuration fits it.

    choose / read: accuracy tables of the choosing (val) and reading (test) splits; p95_ms: each
    configuration's p95 latency; shares: each family's share of the questions (sums to 1);
    knobs: each configuration's knob values, larger = more expensive (see the module doc).
    """
    chosen = headroom_choices(choose, p95_ms, shares, budget_ms)
    if chosen is None:
        return None
    static, family_choice, fits = chosen
    structure = {}
    if knobs is not None:
        structure["undominated_configs"] = [
            c for c in fits
            if not any(d != c and all(x >= y for x, y in zip(knobs[d], knobs[c])) for d in fits)]
    oracle = sum(shares[f] * read[family_choice[f]][f] for f in shares)
    static_acc = _overall(read[static], shares)
    return {
        "budget_ms": budget_ms,
        "best_static": static,
        "best_static_accuracy": static_acc,
        "family_oracle_accuracy": oracle,
        "headroom": oracle - static_acc,
        "family_choice": family_choice,
        "configs_that_fit": len(fits),
        **structure,
    }


def headroom_report(
    choose: Mapping[str, Mapping[str, float]],
    read: Mapping[str, Mapping[str, float]],
    p95_ms: Mapping[str, float],
    shares: Mapping[str, float],
    budgets_ms: Sequence[float],
    knobs: Mapping[str, Sequence[float]] | None = None,
) -> dict:
    """Per-budget reports and their summary (mean headroom, budgets with >= 4 points, and with
    `knobs` the budgets where the knob structure leaves room for any headroom)."""
    missing = sorted(set(choose) ^ set(read) | set(choose) - set(p95_ms))
    if missing:
        raise ValueError(f"accuracy tables and latencies must cover the same configurations; differ on {missing[:5]}")
    if abs(sum(shares.values()) - 1) > 1e-6 or any(v < 0 for v in shares.values()):
        raise ValueError(f"family shares {dict(shares)} must be >= 0 and sum to 1")
    if knobs is not None and set(choose) - set(knobs):
        raise ValueError(f"knobs must cover every configuration; missing {sorted(set(choose) - set(knobs))[:5]}")
    rows = [budget_headroom(choose, read, p95_ms, shares, b, knobs) for b in budgets_ms]
    values = [r["headroom"] for r in rows if r is not None]
    structure = {}
    if knobs is not None:
        structure["budgets_with_two_or_more_undominated_configs"] = sum(
            len(r["undominated_configs"]) >= 2 for r in rows if r is not None)
    return {
        "budgets": [r for r in rows if r is not None],
        "budgets_without_a_fitting_config": [b for b, r in zip(budgets_ms, rows) if r is None],
        "mean_headroom": sum(values) / len(values) if values else None,
        "budgets_with_headroom_ge_0.04": sum(v >= 0.04 for v in values),
        "rule": "choices on the choosing split, accuracy read on the reading split; p95 latency <= budget",
        **structure,
    }
