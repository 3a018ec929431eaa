"""The latency shield: an episode never executes a plan that its latency table says overshoots the budget.

A learned policy picks its knobs from smooth logits, and the lowest budgets sit at a knife edge:
at 21.0 ms only (low, 4, 12) fitted at p95 and the default run's controllers, keeping 13-14 blocks
for knowledge and reasoning questions, violated 38-72% there while they held 0-4% elsewhere
(RESULTS 0-s6, 2026-12-03). The shield is a post-posed safety layer (Alshiekh et al., 2018, "Safe
reinforcement learning via shielding"): the policy's action stands as sampled (its log-probability
is what GRPO's ratio reads), and the env executes the nearest plan the table says fits:

  Stage 1  the insertion becomes the table's (the static configurations are timed at one p; a
           larger p runs blocks 1..p-1 at full top-k, which the table never timed), and the tier
           the highest one at or below the chosen tier whose cheapest timed plan fits;
  Stage 2  a chosen (top-k, blocks) that fits stays; otherwise, among the pairs at or below it in
           both knobs that fit, the one with the largest p95 (the least change); none fits: the
           tier's cheapest plan.

From the policy's side the shield is part of the env's dynamics, so GRPO needs nothing else. The
table holds each static configuration's p95 latency on this machine now plus the controller's own
time (agents.factory.make_latency_shield: the profile rescaled by a start-up measurement, as the
warm start's table). The episode info records the plan that ran (tier_index ... num_blocks_index)
and whether the shield changed it (shielded).

With tracking_rate > 0 the table follows the machine during the run: each executed episode's
measured latency updates its tier's scale by stochastic approximation of the quantile q (default
0.95: x exp(rate * q) after an exceedance of the scaled table, x exp(-rate * (1 - q)) otherwise), so
that at equilibrium a fraction 1 - q of a tier's episodes exceed it. The start-up measurement alone
missed by about a third on a machine whose tail grew during an 88-minute evaluation (RESULTS 0-s8,
2026-12-04). At q 0.95 a plan at the knife edge of a budget still violates about 5% of the time, and
the controllers violated 5.5-6.8% at the budget above the lowest (RESULTS 0-s16). A higher q buys a
margin with accuracy: in one run on the same checkpoints, q 0.98 cost 2.1 +- 0.3 accuracy points against
q 0.95 and saved 0.9 +- 0.2 points of violations (1.1% vs 2.0% on average; RESULTS 0-s18).

A quantile of each tier's latency is not the rate at which budgets are exceeded: that depends on how
close the executed plans sit to their budgets, which differs per budget (behind q 0.95 the controllers
violated 7.3% at the lowest budget and 0.6-1.0% at the three highest, RESULTS 0-s18). With
violation_target set, the shield also keeps one margin per budget bin and steers the bin's violation
rate itself, by adaptive conformal inference (Gibbs & Candes, 2021, "Adaptive conformal inference
under distribution shift"): a plan fits a budget when table x tier scale x the bin's margin <= budget,
and after each episode of the bin margin <- margin x exp(violation_rate * (violated - target)), within
[MARGIN_MIN, MARGIN_MAX]. Over T episodes of a bin its violation rate is then within (log of the
margin range + rate) / (rate x T) of the target, unless the margin sits at a bound (a budget no plan
meets at the target). A controller reads its budgets divided by the margin too
(following_time_scale), so it picks among the plans the shield now lets through.
"""
from __future__ import annotations

import math

import torch

from envs.knobs import KnobSpace


# The per-bin margin's range (module doc): below 0.8 a plan's table time is no longer a useful guide.
MARGIN_MIN, MARGIN_MAX = 0.8, 1.5


class LatencyShield:
    """p95_ms: (tiers, top-k values, block counts) p95 latency of each plan at the table's insertion
    (inf: not timed), in the knob space's index order; insertion_index: that insertion's index;
    violation_target (None: off), violation_rate and budget_edges_ms (the increasing interior edges of
    the budget bins, () for one bin): the per-bin margin (module doc)."""

    def __init__(self, knob_space: KnobSpace, p95_ms: torch.Tensor, insertion_index: int = 0,
                 tracking_rate: float = 0.0, quantile: float = 0.95, violation_target: float | None = None,
                 violation_rate: float = 0.1, budget_edges_ms=()):
        shape = (len(knob_space.tiers), len(knob_space.top_k_values), len(knob_space.num_blocks_values))
        p95_ms = torch.as_tensor(p95_ms, dtype=torch.float64)
        if tuple(p95_ms.shape) != shape:
            raise ValueError(f"latency shield table of shape {tuple(p95_ms.shape)}: expected {shape} "
                             f"(tiers, top-k values, block counts)")
        if bool(torch.isnan(p95_ms).any()) or bool((p95_ms < 0).any()):
            raise ValueError("latency shield table holds NaN or negative latencies; expected p95 times >= 0 (inf: not timed)")
        if not 0 <= int(insertion_index) < len(knob_space.insertion_positions):
            raise ValueError(f"latency shield insertion_index={insertion_index}: expected an index in "
                             f"[0, {len(knob_space.insertion_positions) - 1}]")
        if not bool(torch.isfinite(p95_ms).flatten(1).any(1).all()):
            missing = [t for t, row in zip(knob_space.tiers, p95_ms) if not bool(torch.isfinite(row).any())]
            raise ValueError(f"latency shield table times no plan of tier(s) {missing}; expected >= 1 per tier")
        if not (math.isfinite(float(tracking_rate)) and float(tracking_rate) >= 0):
            raise ValueError(f"latency shield tracking_rate={tracking_rate}: expected a finite rate >= 0 "
                             f"(0: a fixed table)")
        if violation_target is not None:
            check_violation_target(violation_target, "latency shield violation_target")
        if isinstance(violation_rate, bool) or not isinstance(violation_rate, (int, float)) or not (
                math.isfinite(violation_rate) and violation_rate > 0):
            raise ValueError(f"latency shield violation_rate={violation_rate!r}: expected a finite rate > 0")
        edges = [float(e) for e in budget_edges_ms]
        if not all(math.isfinite(e) for e in edges) or any(a >= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"latency shield budget_edges_ms={edges}: expected finite, strictly increasing edges")
        self.violation_target = None if violation_target is None else float(violation_target)
        self.violation_rate = float(violation_rate)
        self.budget_edges_ms = torch.tensor(edges, dtype=torch.float64)
        self.margin = torch.ones(len(edges) + 1, dtype=torch.float64)  # per budget bin, moved with violation_target
        self.knob_space = knob_space
        self.quantile = check_quantile(quantile, "latency shield quantile")
        self.tracking_rate = float(tracking_rate)
        self.scale = torch.ones(shape[0], dtype=torch.float64)  # per tier, tracked online when tracking_rate > 0
        self.p95_ms = p95_ms
        self.insertion_index = int(insertion_index)

    def budget_bin(self, budget_ms: float) -> int:
        """The index of the budget bin `budget_ms` falls in (budgets outside the edges: the end bins)."""
        return int(torch.bucketize(torch.tensor(float(budget_ms), dtype=torch.float64), self.budget_edges_ms, right=True))

    def budget_margin(self, budget_ms: float) -> float:
        """The factor on the table at this budget: its bin's margin (1 with violation_target off)."""
        return float(self.margin[self.budget_bin(budget_ms)])

    def stage1(self, tier: int, insertion: int, budget_ms: float) -> tuple[int, int]:
        """(tier index, insertion index) to execute for the chosen ones (module doc)."""
        cheapest = self.p95_ms.flatten(1).min(1).values * self.scale * self.budget_margin(budget_ms)
        fitting = [t for t in range(int(tier) + 1) if float(cheapest[t]) <= budget_ms]
        return (fitting[-1] if fitting else int(cheapest.argmin())), self.insertion_index

    def stage2(self, tier: int, top_k: int, num_blocks: int, budget_ms: float) -> tuple[int, int]:
        """(top-k index, blocks index) to execute at `tier` for the chosen ones (module doc)."""
        table = self.p95_ms[int(tier)] * self.scale[int(tier)] * self.budget_margin(budget_ms)
        if float(table[top_k, num_blocks]) <= budget_ms:
            return int(top_k), int(num_blocks)
        below = table[: top_k + 1, : num_blocks + 1]
        fits = below <= budget_ms
        if bool(fits.any()):
            flat = int(torch.where(fits, below, -math.inf).flatten().argmax())
        else:
            below, flat = table, int(table.flatten().argmin())
        return divmod(flat, below.shape[1])

    def observe(self, tier: int, top_k: int, num_blocks: int, latency_ms: float, budget_ms: float) -> None:
        """An executed episode's measured latency at its budget: moves its tier's scale and its budget
        bin's margin (module doc)."""
        if not math.isfinite(float(latency_ms)):
            return
        if self.violation_target is not None:
            b = self.budget_bin(budget_ms)
            violated = float(float(latency_ms) > float(budget_ms))
            step = math.exp(self.violation_rate * (violated - self.violation_target))
            self.margin[b] = min(max(float(self.margin[b]) * step, MARGIN_MIN), MARGIN_MAX)
        predicted = float(self.p95_ms[tier, top_k, num_blocks] * self.scale[tier])
        if self.tracking_rate == 0 or not math.isfinite(predicted):
            return
        exceeded = float(float(latency_ms) > predicted)
        self.scale[tier] *= math.exp(self.tracking_rate * (exceeded - (1.0 - self.quantile)))

    def mean_scale(self) -> float:
        """The tiers' tracked scales as one ratio (their geometric mean): how much slower than its
        start-up table the table now says this machine is (a controller's time_scale follows it)."""
        return float(self.scale.log().mean().exp())

    def state_dict(self) -> dict:
        return {"p95_ms": self.p95_ms.tolist(), "insertion_index": self.insertion_index,
                "tracking_rate": self.tracking_rate, "quantile": self.quantile, "scale": self.scale.tolist(),
                "violation_target": self.violation_target, "violation_rate": self.violation_rate,
                "budget_edges_ms": self.budget_edges_ms.tolist(), "margin": self.margin.tolist()}


def _fraction(value, field: str, example: str) -> float:
    """`value` as a float, or a ValueError naming `field` when it is not a number in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{field}={value!r}: expected a number in (0, 1), e.g. {example}")
    return float(value)


def check_quantile(value, field: str) -> float:
    """A shield quantile as a float, or a ValueError naming `field`."""
    return _fraction(value, field, "0.95 (the fraction of a tier's episodes the tracked shield table should cover)")


def check_violation_target(value, field: str) -> float:
    """A violation-rate target as a float, or a ValueError naming `field`."""
    return _fraction(value, field, "0.015 (the fraction of a budget bin's episodes the shield lets exceed their budget)")


def following_time_scale(start_up: float, shield: LatencyShield | None, budget_ms: float | None = None) -> float:
    """A controller's time_scale before an episode: its start-up scale (this machine's latency over its
    training run's) times its shield's tracked mean_scale and, at `budget_ms`, the shield's margin for
    it, so that the plan it picks is one the table the shield now holds lets through (evaluate.py
    --time_rescale on, answer.py)."""
    if shield is None:
        return start_up
    return start_up * shield.mean_scale() * (shield.budget_margin(budget_ms) if budget_ms is not None else 1.0)
