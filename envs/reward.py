"""The episode reward shared by both controller stages.

reward = a*accuracy - b*sigmoid(10*(lat/budget - 1)) - g*(max(lat - budget, 0)/budget)^2
         - e*complexity + d*max(0, 1 - lat/budget)
with `lat` the episode's total measured latency. The sigmoid is a soft latency penalty that already
bites before the budget; the squared term is the hard budget-violation penalty.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import torch


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward terms (design defaults)."""

    accuracy: float = 1.0  # a: weight of the answer's accuracy in [0, 1]
    latency: float = 0.5  # b: soft latency penalty sigmoid(10*(lat/budget-1))
    violation: float = 10.0  # g: squared relative overshoot of the budget
    complexity: float = 0.05  # e: mean normalised knob cost
    efficiency: float = 0.1  # d: bonus for unused budget fraction

    @classmethod
    def from_dict(cls, cfg: Mapping | None) -> "RewardWeights":
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise KeyError(
                f"unknown reward weight(s) {sorted(unknown)}; expected a subset of {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**{k: float(v) for k, v in cfg.items()})

    def to_dict(self) -> dict:
        return asdict(self)


def compute_reward(
    accuracy: torch.Tensor,
    latency_ms: torch.Tensor,
    budget_ms: torch.Tensor,
    complexity: torch.Tensor,
    weights: RewardWeights = RewardWeights(),
) -> torch.Tensor:
    """Elementwise reward; all inputs broadcast together."""
    ratio = latency_ms / budget_ms
    return (
        weights.accuracy * accuracy
        - weights.latency * torch.sigmoid(10.0 * (ratio - 1.0))
        - weights.violation * torch.clamp(ratio - 1.0, min=0.0) ** 2
        - weights.complexity * complexity
        + weights.efficiency * torch.clamp(1.0 - ratio, min=0.0)
    )


# Budgets above this (a quarter of an hour for one request) are a unit or typing mistake, not a
# latency target; the budget code would also alias them onto meaningless phases.
MAX_BUDGET_MS = 1e6


def check_budget(budget_ms: float | torch.Tensor, field: str = "budget_ms") -> None:
    """Raise a ValueError naming the value when a budget is not a finite number in (0, MAX_BUDGET_MS]."""
    t = torch.as_tensor(budget_ms, dtype=torch.float64)
    bad = ~torch.isfinite(t) | (t <= 0) | (t > MAX_BUDGET_MS)
    if bool(bad.any()):
        value = t[bad].flatten()[0].item()
        raise ValueError(f"{field}={value} is invalid; expected a finite latency budget > 0 ms and "
                         f"<= {MAX_BUDGET_MS:g} ms")
