"""The violation-rate constraint as a Lagrange multiplier (dual ascent, as in PPO-Lagrangian).

The design's reward charges an overshoot by its squared size, which is tiny just past the budget:
the default run's controller violated 14.7% of its test budgets. With `loss.violation_target` set,
every episode whose measured latency exceeded its budget also pays `lambda`, and after each step

    lambda <- max(0, lambda + violation_lambda_lr * (violation rate of the batch - target))

so lambda grows while the controller violates more often than the target and decays once it
violates less. The penalty enters the advantages only; the logged and validated rewards stay the
design's reward.
"""
from __future__ import annotations

import math

from tensordict import TensorDictBase


class ViolationMultiplier:
    def __init__(self, target: float, lr: float, value: float = 0.0):
        for name, v in (("loss.violation_target", target), ("loss.violation_lambda_lr", lr)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}={v!r}: expected a finite number > 0")
        if target >= 1:
            raise ValueError(f"loss.violation_target={target!r}: expected a rate in (0, 1)")
        self.target, self.lr, self.value = float(target), float(lr), float(value)

    def penalize(self, rollout: TensorDictBase) -> None:
        """Subtract lambda from the terminal reward of every violating episode (before the advantages)."""
        reward = rollout["next", "reward"]
        violated = rollout["next", "episode", "violation"][:, -1].reshape(reward[:, -1].shape)
        reward[:, -1] -= self.value * violated.to(reward.dtype)  # in place: the rollout's own tensor

    def update(self, violation_rate: float) -> None:
        self.value = max(0.0, self.value + self.lr * (float(violation_rate) - self.target))

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
