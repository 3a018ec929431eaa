"""Budget -> d_model feature: fixed sinusoidal code, trainable MLP (the design's budget token)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


# sinusoidal_code's defaults (policies/native.py reads them too)
SINUSOID_MAX_PERIOD, SINUSOID_SCALE = 100.0, 25.0


def sinusoidal_code(x: torch.Tensor, dim: int, max_period: float = SINUSOID_MAX_PERIOD,
                    scale: float = SINUSOID_SCALE) -> torch.Tensor:
    """Transformer-style code of x in [0, 1] (treated as position x*scale): (..., 1) -> (..., dim).

    The defaults make every component vary smoothly over the budget range, from ~4 cycles (the
    fastest) to ~1/25 of a cycle (the slowest). Transformer position scales (x*1000, period up to
    10^4) made most components alias across budgets a few ms apart, and the controller could not
    learn budget-dependent choices before its tier head collapsed to one value.
    """
    angles = x.float() * scale * sinusoid_frequencies(dim, max_period, x.device)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def sinusoid_frequencies(dim: int, max_period: float = SINUSOID_MAX_PERIOD, device=None) -> torch.Tensor:
    """The dim // 2 frequencies of `sinusoidal_code` (float32)."""
    if dim % 2:
        raise ValueError(f"sinusoidal dim={dim}: expected an even number")
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, device=device, dtype=torch.float32) / half)


class LatencyBudgetEncoder(nn.Module):
    """budget (ms) -> normalise over budget_range_ms -> fixed 256-d sinusoid -> MLP -> d_model.

    Its output is both Stage 1's budget feature and the budget token appended to the prefill.
    """

    def __init__(self, d_model: int, budget_range_ms: Sequence[float], sinusoidal_dim: int = 256):
        super().__init__()
        lo, hi = (float(v) for v in budget_range_ms)
        if not (0 < lo < hi):
            raise ValueError(f"budget_range_ms={list(budget_range_ms)}: expected 0 < lo < hi")
        self.register_buffer("budget_range_ms", torch.tensor([lo, hi]))
        self.sinusoidal_dim = int(sinusoidal_dim)
        self.mlp = nn.Sequential(
            nn.Linear(self.sinusoidal_dim, d_model),
            nn.LayerNorm(d_model),
            nn.GELU(),
            nn.Linear(d_model, d_model),
            nn.LayerNorm(d_model),
        )

    def normalise(self, budget_ms: torch.Tensor) -> torch.Tensor:
        lo, hi = self.budget_range_ms
        return (budget_ms - lo) / (hi - lo)

    def forward(self, budget_ms: torch.Tensor) -> torch.Tensor:
        """(..., 1) budget in ms -> (..., d_model)."""
        return self.mlp(sinusoidal_code(self.normalise(budget_ms), self.sinusoidal_dim))


class ElapsedCode(nn.Module):
    """(elapsed_ms, remaining_ms) -> fixed sinusoidal code, no parameters (Stage 2's elapsed input).

    Both times are divided by the top of the budget range (elapsed in [0, ~1], remaining in
    [-1, 1] and below 0 once the request is over budget) and coded by `sinusoidal_code`, like the
    budget, with `dim_per_value` components each; Stage 2's trunk learns what to make of them.
    """

    def __init__(self, budget_range_ms: Sequence[float], dim_per_value: int = 32):
        super().__init__()
        lo, hi = (float(v) for v in budget_range_ms)
        if not (0 < lo < hi):
            raise ValueError(f"budget_range_ms={list(budget_range_ms)}: expected 0 < lo < hi")
        self.register_buffer("scale_ms", torch.tensor(hi))
        self.dim_per_value = int(dim_per_value)
        self.dim = 2 * self.dim_per_value

    def forward(self, elapsed_ms: torch.Tensor, remaining_ms: torch.Tensor) -> torch.Tensor:
        """(..., 1) and (..., 1) in ms -> (..., dim)."""
        return torch.cat([sinusoidal_code(t / self.scale_ms, self.dim_per_value) for t in (elapsed_ms, remaining_ms)],
                         dim=-1)
