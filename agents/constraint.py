"""The violation-rate constraint as Lagrange multipliers (dual ascent, as in PPO-Lagrangian).

The design's reward charges an overshoot by its squared size, which is tiny just past the budget:
the default run's controller violated 14.7% of its test budgets. With `loss.violation_target` set,
every episode whose measured latency exceeded its budget also pays `lambda`, and after each step

    lambda <- max(0, lambda + violation_lambda_lr * (violation rate of the batch - target))

so lambda grows while the controller violates more often than the target and decays once it
violates less. The penalty enters the advantages only; the logged and validated rewards stay the
design's reward.

With `loss.violation_budget_bins` B > 1 the budget range is cut into B equal bins, each with its own
lambda driven by the violation rate of the batch's episodes in that bin: the target holds per budget
(issue: <= 5% at every budget), and a bin that meets it keeps lambda near 0.

`loss.violation_lambda_max` caps every lambda. Dual ascent rises fast while the initial policy
violates 30-45% of its budgets and decays by only lr * target per step: uncapped, the lowest bin's
lambda reached 31 in 120 steps and the policy collapsed to the cheapest plans at every budget.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from tensordict import TensorDictBase


class ViolationMultiplier:
    def __init__(self, target: float, lr: float, budget_range_ms: Sequence[float] = (0.0, 1.0), bins: int = 1,
                 max_value: float | None = None):
        for name, v in (("loss.violation_target", target), ("loss.violation_lambda_lr", lr)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}={v!r}: expected a finite number > 0")
        if target >= 1:
            raise ValueError(f"loss.violation_target={target!r}: expected a rate in (0, 1)")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"loss.violation_budget_bins={bins!r}: expected an integer >= 1")
        if max_value is not None and (isinstance(max_value, bool) or not isinstance(max_value, (int, float))
                                      or not math.isfinite(max_value) or max_value <= 0):
            raise ValueError(f"loss.violation_lambda_max={max_value!r}: expected a finite number > 0, or null (no cap)")
        lo, hi = (float(b) for b in budget_range_ms)
        if bins > 1 and not 0 <= lo < hi < math.inf:
            raise ValueError(f"budget range {list(budget_range_ms)}: per-bin multipliers need 0 <= lo < hi")
        self.target, self.lr, self.lo, self.hi = float(target), float(lr), lo, hi
        self.max_value = math.inf if max_value is None else float(max_value)
        self.values = [0.0] * bins

    @property
    def bins(self) -> int:
        return len(self.values)

    def bin_of(self, budget_ms: torch.Tensor) -> torch.Tensor:
        """Each budget's bin (budgets outside the range fall in the nearest end bin)."""
        if self.bins == 1:
            return torch.zeros(budget_ms.shape, dtype=torch.long)
        position = (budget_ms.detach().double().cpu() - self.lo) / (self.hi - self.lo)
        return (position * self.bins).floor().long().clamp(0, self.bins - 1)

    def penalize(self, rollout: TensorDictBase) -> None:
        """Subtract its bin's lambda from the terminal reward of every violating episode (before the advantages)."""
        reward = rollout["next", "reward"]
        violated = rollout["next", "episode", "violation"][:, -1].reshape(reward[:, -1].shape)
        lam = torch.tensor(self.values, dtype=reward.dtype)[self.bin_of(episode_budgets(rollout))]
        reward[:, -1] -= lam.to(reward.device).reshape(violated.shape) * violated.to(reward.dtype)  # in place

    def update(self, budget_ms: torch.Tensor, violated: torch.Tensor) -> None:
        """One dual-ascent step per bin that holds episodes of the (global) batch."""
        bins = self.bin_of(budget_ms).flatten()
        violated = violated.detach().flatten().double().cpu()
        for b in bins.unique().tolist():
            rate = float(violated[bins == b].mean())
            self.values[b] = min(self.max_value, max(0.0, self.values[b] + self.lr * (rate - self.target)))

    def metrics(self) -> dict[str, float]:
        """TensorBoard values: the mean lambda, and each bin's when there are several."""
        out = {"train/violation_lambda": sum(self.values) / self.bins}
        if self.bins > 1:
            out.update({f"train/violation_lambda_bin{b}": v for b, v in enumerate(self.values)})
        return out

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        values = state["values"] if "values" in state else [state["value"]]  # "value": one global lambda
        if len(values) != self.bins:
            raise ValueError(f"the checkpoint holds {len(values)} violation multiplier(s); "
                             f"loss.violation_budget_bins={self.bins}: resume with the run's own setting")
        self.values = [float(v) for v in values]


def episode_budgets(rollout: TensorDictBase) -> torch.Tensor:
    """(episodes,) budget of each episode, read at its first step."""
    return rollout["budget_ms"][:, 0].reshape(-1)
