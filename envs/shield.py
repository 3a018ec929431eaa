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

One margin per bin gives every request the same risk, wherever its blocks buy accuracy: at the lowest
budget of one run the shield cut 71% of a seed's knowledge questions to 12 blocks (0.69 right on them),
while the family oracle ran them at (low, 4, 15), 10% of them late, 0.97 right, and held 3.3% over
all questions, because coarse questions lose nothing at 12 blocks (RESULTS 0-s22, eval29). With `values`
({requested plan: accuracy of each plan for the questions that request it}, agents.warm_start's
request_mix_values; value_weights: how many questions make each request) the shield spends the bin's
violations where they buy the most: it executes the plan that maximizes value - price x
P(latency > budget), the bin's price steered to the target by the same adaptive update as the
margin (price x exp(violation_rate x (violated - target))):
  Stage 1  among the tiers at or below the chosen one, the one whose best plan scores highest on the
           values of the requests made at the chosen tier (their mean weighted by value_weights;
           ties: the higher tier);
  Stage 2  among the pairs at or below the chosen one in both knobs, the best-scoring one on the
           request's values (a request without values: with the ceiling the weighted mean of all
           requests', without it those Stage 1 read, and any pair of the tier; ties:
           the lower risk, then the larger p95).
The ceiling is the request itself unless value_ceilings ({request: (tier, top-k, blocks) index at or
above it}) lifts it: Stage 1 then reads the tiers up to the highest ceiling of the requests made at
the chosen tier (ties: the highest at or below the chosen one, else the lowest above it), Stage 2
the pairs up to the request's ceiling in both knobs. A measured request mix
(agents.warm_start.request_ceilings) lifts a request to the largest plan any family making it was
taught to ask for: a knowledge question that asks for coarse's (low, 4, 13) may then keep 16 blocks,
while the val grid's noise above a taught request stays out of reach.
With value_ceiling off, a request that has values of its own only names them: Stage 1 reads every
tier for a tier at which such requests are made, Stage 2 every pair of the tier, and ties go to the
cheaper plan and the lower tier. A request without values then takes those Stage 1 read for its
requested tier, over every pair: Stage 2 answers the latency token of the tier the shield ran, and
lifted to the high tier, seeds 43 and 44 asked a 13-block pair for half of their reasoning questions,
a request no question made at the medium tier, and ran 13 blocks under the mean of all requests'
values (0.59-0.62 of them right at the top budgets, against 0.73 for seed 42, whose measured mix
knew its request; docs/RESULTS.md 0-s26, eval38).
The steered price only learns from violations: an episode in time lowers it by x0.998 at a 2% target (rate 0.1),
so a bin whose plans rarely exceed its budget keeps a price near its start for hundreds of episodes and
stays under its target. Replaying eval36's test table with every question's family known, the top
three budgets' bins violated 0.3-0.5% and ran reasoning questions at the high tier for 7-64% of them,
where lookup-calibrated ran every question there (docs/RESULTS.md 0-s26). With expected_price the price
at a decision is the smaller of the steered one and the expected one: the smallest price (on a
geometric grid, EXPECTED_PRICES) at which every request, weighted by value_weights, picking its best
plan within its ceiling, would exceed the budget with probability <= the bin's expected target on
average (by the risk below). That target starts at violation_target and is steered by the bin's
violations like the price (x exp(violation_rate x (violation_target - violated)), within
EXPECTED_TARGET_RANGE x violation_target), so a risk that proves too low is corrected.
P(latency > budget) is the fraction of recent executed episodes whose latency / their plan's table
time exceeded budget / this plan's table time (a pool of RATIO_WINDOW ratios, started from a
lognormal prior whose 95% quantile is the table, RATIO_PRIOR_SIGMA wide): the spread of this machine
around its table, shared by every plan.

With stage2_risk "elapsed", Stage 2 reads P(latency > budget) as predicted by how fast this request has
run so far. On the 2-core VM a request's slowness persists: over 800 requests of four fixed plans the
log of the time before Stage 2 (over its plan's median) and of the rest correlated 0.77-0.82, and a
least-squares line on the first cut the spread of the rest's 95% point over its median from 0.31-0.36
to 0.18-0.24 in log (a check outside the repository, docs/RESULTS.md 0-s29). Each observed episode keeps,
beside its ratio, its time before Stage 2 (`elapsed_ms`, the Stage-1 controller's included) over its
tier's tracked scale; its speed is that over the median of the pool's episodes of its tier. A line
log ratio = a + b log speed fitted to the pool's episodes that have one gives Stage 2 the risk
P(residual > log(budget / plan's table time) - a - b log speed now) over the line's residuals; with
fewer than SPEED_MIN_EPISODES such episodes, or no elapsed time given, Stage 2 reads the pool as Stage 1.

With risk_pool "tier" a plan's risk reads only its own tier's last RATIO_WINDOW episodes (their ratios, and
at Stage 2 their residuals from the shared line), once there are TIER_MIN_EPISODES of them. Behind the shared pool,
71% of whose episodes ran the low tier, the default run's shields predicted 8.3% violations for the
high tier's plans that ran and measured 5.6% (medium 3.2% / 2.6%, low 0.57% / 0.62%), and the top
budgets, where detail and reasoning questions run the higher tiers, spent 0.4-1.3% of a 1.5% target
(docs/RESULTS.md 0-s33, eval50). By tier on the same checkpoints the prediction came closer (2.47% vs 2.04%
measured, shared 3.08% vs 1.85%; high tier 7.05% vs 4.75%) at -0.16 +- 0.47 accuracy points and +0.19 +- 0.14
violation points, a tie (screen51): an option.
price_start sets every bin's steered price before its first episode (PRICE_START by default). A bin's
price moves by exp(violation_rate x (its violation rate - target) x episodes), so over the 600 episodes
a bin sees in an evaluation the start sets its level, and with expected_price the steered price caps
the expected one: behind a start of 2 the default run's shields predicted 2.37% for a 1.5% target and
measured 1.25%; from 100 the expected price governed and predicted 1.60%, measured 0.75%, for 1.9 +- 0.3
accuracy points less (docs/RESULTS.md 0-s34, screen53): an option.
"""
from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from envs.knobs import KnobSpace


# The per-bin margin's range (module doc): below 0.8 a plan's table time is no longer a useful guide.
MARGIN_MIN, MARGIN_MAX = 0.8, 1.5
# The per-bin price of a violation with values (module doc), in accuracy per unit of probability: at
# 1 or more no accuracy gain (at most 1) buys a certain violation over a plan that surely fits. A
# violation raises it by x1.1, an episode in time lowers it by x0.998 (at rate 0.1, a 2% target), so its start
# matters in a short run: a default run's prices ended at 1.5-3.5 (8 in its lowest bin); from 4 an
# 80-request screen never came down and ran 0% at most budgets, from 1 it ran 4.2% on average.
# PRICE_START is price_start's default (policy.latency_shield_price_start).
PRICE_MIN, PRICE_MAX, PRICE_START = 1.0, 100.0, 2.0
# Latency / table ratios kept for P(latency > budget), and the prior's log-spread (the 2-core VM's
# request-to-request noise is 2-15%).
RATIO_WINDOW, RATIO_PRIOR_SIGMA, RATIO_PRIOR_SIZE = 512, 0.1, 20
# expected_price (module doc): the prices it may name, down to 0.001 (a violation all but free), and the
# range of its steered target, as factors of violation_target.
EXPECTED_PRICES = torch.logspace(-3, math.log10(PRICE_MAX), 51, dtype=torch.float64).numpy()
EXPECTED_TARGET_RANGE = (0.1, 10.0)
# How Stage 2 reads P(violation) (module doc), and the fewest episodes with a speed before its line is used.
STAGE2_RISKS = ("pooled", "elapsed")
SPEED_MIN_EPISODES = 32
# Whose ratios give a plan its risk (module doc): every tier's alike, or its own tier's once its last
# episodes number TIER_MIN_EPISODES (before that the shared pool's).
RISK_POOLS = ("shared", "tier")
TIER_MIN_EPISODES = 64


class LatencyShield:
    """p95_ms: (tiers, top-k values, block counts) p95 latency of each plan at the table's insertion
    (inf: not timed), in the knob space's index order; insertion_index: that insertion's index;
    violation_target (None: off), violation_rate and budget_edges_ms (the increasing interior edges of
    the budget bins, () for one bin): the per-bin margin (module doc); values ({(tier, top-k, blocks)
    index of a request: (tiers, top-k values, block counts) accuracy of each plan for it}, needs
    violation_target; NaN: a plan without a value, never picked): the per-bin price instead of the
    margin (module doc); value_weights ({request: weight > 0}, None: 1 each): each request's weight
    in a mean of several requests' values; value_ceilings ({request: index >= it in every knob}, None:
    each request its own): the largest plan the shield may execute for it with value_ceiling on;
    expected_price (needs values): the price at a decision is the smaller of the steered one and the
    expected one (module doc); stage2_risk (one of STAGE2_RISKS, "elapsed" needs values): how Stage 2
    reads P(violation) (module doc); risk_pool (one of RISK_POOLS, "tier" needs values): whose ratios give a
    plan its risk (module doc); price_start (in [PRICE_MIN, PRICE_MAX]): every bin's steered price before
    its first episode."""

    def __init__(self, knob_space: KnobSpace, p95_ms: torch.Tensor, insertion_index: int = 0,
                 tracking_rate: float = 0.0, quantile: float = 0.95, violation_target: float | None = None,
                 violation_rate: float = 0.1, budget_edges_ms=(), values=None, value_ceiling: bool = True,
                 value_weights=None, value_ceilings=None, expected_price: bool = False,
                 stage2_risk: str = "pooled", risk_pool: str = "shared", price_start: float = PRICE_START):
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
        check_violation_rate(violation_rate, "latency shield violation_rate")
        edges = [float(e) for e in budget_edges_ms]
        if not all(math.isfinite(e) for e in edges) or any(a >= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"latency shield budget_edges_ms={edges}: expected finite, strictly increasing edges")
        self.violation_target = None if violation_target is None else float(violation_target)
        self.violation_rate = float(violation_rate)
        self.budget_edges_ms = torch.tensor(edges, dtype=torch.float64)
        self._budget_edges = edges
        self.margin = torch.ones(len(edges) + 1, dtype=torch.float64)  # per budget bin, moved with violation_target
        self.knob_space = knob_space
        self.quantile = check_quantile(quantile, "latency shield quantile")
        self.tracking_rate = float(tracking_rate)
        self.scale = torch.ones(shape[0], dtype=torch.float64)  # per tier, tracked online when tracking_rate > 0
        self.p95_ms = p95_ms
        self._p95 = p95_ms.numpy()
        self.insertion_index = int(insertion_index)
        # fixed at construction: what the decisions derive from them is computed once, here
        self._values = None if values is None else self._check_values(values, shape)
        self._value_weights = None if values is None else self._check_weights(value_weights)
        self.value_ceiling = bool(value_ceiling)
        self._value_ceilings = None if values is None else self._check_ceilings(value_ceilings, shape)
        if values is not None:
            self._derive_request_tables()
        price_start = check_price_start(price_start, "latency shield price_start")
        self.price = torch.full((len(edges) + 1,), price_start, dtype=torch.float64)  # per budget bin, with values
        if not isinstance(expected_price, bool) or (expected_price and values is None):
            raise ValueError(f"latency shield expected_price={expected_price!r}: expected a boolean, true only with "
                             f"values (the requests whose plans it prices)")
        self.expected_price = expected_price
        if stage2_risk not in STAGE2_RISKS or (stage2_risk == "elapsed" and values is None):
            raise ValueError(f"latency shield stage2_risk={stage2_risk!r}: expected one of {list(STAGE2_RISKS)}, "
                             f"'elapsed' only with values (the plans whose risk it reads)")
        self.stage2_risk = stage2_risk
        if risk_pool not in RISK_POOLS or (risk_pool == "tier" and values is None):
            raise ValueError(f"latency shield risk_pool={risk_pool!r}: expected one of {list(RISK_POOLS)}, "
                             f"'tier' only with values (the plans whose risk it reads)")
        self.risk_pool = risk_pool
        # risk_pool "tier": per tier the (ratios, times before Stage 2 over its scale) of its last episodes
        self._tier_history = [(np.empty(0), np.empty(0)) for _ in range(shape[0])]
        # per budget bin, the mean risk the expected price allows (module doc)
        self.expected_target = torch.full((len(edges) + 1,), self.violation_target or 0.0, dtype=torch.float64)
        self._episode: dict | None = None  # what this episode's decisions read (_episode_tables)
        # what the last Stage-2 decision read for the plan it returned (NaN without values): its
        # P(latency > budget) and the price of a violation, so that a run can check the risk model
        self.last_risk, self.last_price = math.nan, math.nan
        self._observed = 0
        prior = torch.special.ndtri((torch.arange(RATIO_PRIOR_SIZE, dtype=torch.float64) + 0.5) / RATIO_PRIOR_SIZE)
        q95 = torch.special.ndtri(torch.tensor(0.95, dtype=torch.float64))
        self.ratios = torch.exp(RATIO_PRIOR_SIGMA * (prior - q95))

    @property
    def ratios(self) -> torch.Tensor:
        """The pool of latency / table ratios (module doc), in arrival order."""
        return self._ratios

    @ratios.setter
    def ratios(self, pool: torch.Tensor) -> None:
        """A pool set from outside (and the prior) has no times before Stage 2 and no tier (-1; observe keeps both)."""
        self._set_pool(pool, np.full(len(pool), np.nan), np.full(len(pool), -1, dtype=np.int64))

    def _set_pool(self, pool: torch.Tensor, elapsed: np.ndarray, tiers: np.ndarray) -> None:
        """The ratios with each one's time before Stage 2 over its tier's scale (NaN: none) and tier.
        Sorted and fitted here, when an episode is observed after its latency, not in the next request's
        decisions."""
        self._ratios = pool
        self._sorted_ratios = np.sort(pool.numpy())
        self._pool_elapsed, self._pool_tiers = elapsed, tiers
        # risk_pool "tier": per tier its own last episodes' sorted ratios, the shared ones until it has enough
        self._tier_ratios = [np.sort(own) if self._tier_reads_own(own) else self._sorted_ratios
                             for own, _ in self._tier_history]
        self._speed_line = self._fit_speed_line() if self.stage2_risk == "elapsed" else None
        self._episode = None

    def _tier_reads_own(self, own: np.ndarray) -> bool:
        """Whether a tier's risk reads its own episodes (`own`: their ratios or residuals), module doc."""
        return self.risk_pool == "tier" and len(own) >= TIER_MIN_EPISODES

    @property
    def speed_slope(self) -> float | None:
        """b of the line log ratio = a + b log speed Stage 2 reads now (stage2_risk "elapsed"; None: no line)."""
        return None if self._speed_line is None else self._speed_line[1]

    def _fit_speed_line(self):
        """(a, b, per tier the sorted residuals it reads (risk_pool), each tier's median time before Stage 2
        over its scale) of the line
        log ratio = a + b log speed over the pool's episodes with a time (module doc); None with fewer
        than SPEED_MIN_EPISODES."""
        has = np.isfinite(self._pool_elapsed)
        if int(has.sum()) < SPEED_MIN_EPISODES:
            return None
        tiers, elapsed = self._pool_tiers[has], self._pool_elapsed[has]
        medians = np.full(len(self._p95), np.nan)
        for t in np.unique(tiers):
            medians[t] = np.median(elapsed[tiers == t])
        x, y = np.log(elapsed / medians[tiers]), np.log(self._ratios.numpy()[has])
        var = float(((x - x.mean()) ** 2).mean())
        b = float(((x - x.mean()) * (y - y.mean())).mean() / var) if var > 0 else 0.0
        a = float(y.mean() - b * x.mean())
        shared = np.sort(y - a - b * x)
        per_tier = []
        for t, (ratios, times) in enumerate(self._tier_history):
            timed = np.isfinite(times)
            if self._tier_reads_own(ratios[timed]) and np.isfinite(medians[t]):
                per_tier.append(np.sort(np.log(ratios[timed]) - a - b * np.log(times[timed] / medians[t])))
            else:
                per_tier.append(shared)
        return a, b, per_tier, medians

    @property
    def values(self) -> dict | None:
        """{request: (tiers, top-k values, block counts) accuracies}, as constructed (read-only)."""
        return self._values

    @property
    def value_weights(self) -> dict | None:
        return self._value_weights

    @property
    def value_ceilings(self) -> dict | None:
        return self._value_ceilings

    def _derive_request_tables(self) -> None:
        """What the decisions read off the values, computed once: per tier the requests made there and
        the values Stage 1 reads for it, every request's weighted mean, and the expected price's stacked
        values, plans each request may run and weights."""
        # numpy: a decision is a few dozen operations on at most 75 plans, where each torch call costs more
        # than its arithmetic (an episode's two decisions 0.745 -> 0.197 ms, docs/BENCHMARKS.md 2c)
        requests = list(self._values)
        self._own_values = {r: v.numpy() for r, v in self._values.items()}
        self._mean_of_all = self._mean_values(requests).numpy()
        self._made = {}
        for tier in range(len(self.p95_ms)):
            made_here = [r for r in requests if r[0] == tier]
            self._made[tier] = (made_here, self._mean_values(made_here).numpy() if made_here else self._mean_of_all)
        values = np.stack([self._own_values[r] for r in requests]).reshape(len(requests), -1)  # (requests, plans)
        runnable = np.isfinite(self._p95).reshape(-1) & ~np.isnan(values)
        if self.value_ceiling:
            knobs = np.indices(self._p95.shape).reshape(3, -1)
            tops = np.array([self._value_ceilings[r] for r in requests])  # (requests, 3)
            within = runnable & (knobs[None] <= tops[:, :, None]).all(1)
            runnable = np.where(within.any(1, keepdims=True), within, runnable)  # none below: anything (stage2)
        self._priced_values = np.where(runnable, values, -np.inf)
        weights = np.array([self._value_weights[r] for r in requests], dtype=np.float64)
        self._priced_weights = weights / weights.sum()

    def _check_values(self, values, shape) -> dict[tuple[int, int, int], torch.Tensor]:
        if self.violation_target is None:
            raise ValueError("latency shield values need a violation_target (the rate their price is steered to)")
        if not values:
            raise ValueError("latency shield values are empty; expected {(tier, top-k, blocks) index: accuracies}")
        out = {}
        for request, table in values.items():
            key = tuple(int(i) for i in request)
            table = torch.as_tensor(table, dtype=torch.float64)
            if len(key) != 3 or not all(0 <= i < n for i, n in zip(key, shape)):
                raise ValueError(f"latency shield values: request {request!r}: expected a (tier, top-k, blocks) "
                                 f"index within {shape}")
            if tuple(table.shape) != shape or bool(torch.isinf(table).any()) or not bool(
                    (torch.isfinite(self.p95_ms) & ~torch.isnan(table)).flatten(1).any(1).all()):
                raise ValueError(f"latency shield values for request {key}: expected a {shape} table of "
                                 f"accuracies (NaN: unknown) with a timed, known plan in every tier")
            out[key] = table
        return out

    def _check_weights(self, weights) -> dict[tuple[int, int, int], float]:
        if weights is None:
            return {k: 1.0 for k in self.values}
        weights = {tuple(int(i) for i in k): w for k, w in weights.items()}
        bad = {k: w for k, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float))
               or not (math.isfinite(w) and w > 0)}
        if bad or set(weights) != set(self.values):
            raise ValueError(f"latency shield value_weights: expected a finite weight > 0 for each request the values "
                             f"name ({sorted(self.values)}); got {weights}")
        return {k: float(w) for k, w in weights.items()}

    def _check_ceilings(self, ceilings, shape) -> dict[tuple[int, int, int], tuple[int, int, int]]:
        out = {k: k for k in self.values}
        if ceilings is None:
            return out
        for request, ceiling in ceilings.items():
            key, top = tuple(int(i) for i in request), tuple(int(i) for i in ceiling)
            if key not in self.values or len(top) != 3 or not all(r <= c < n for r, c, n in zip(key, top, shape)):
                raise ValueError(f"latency shield value_ceilings: {request!r}: {ceiling!r}: expected, for a request the "
                                 f"values name ({sorted(self.values)}), a (tier, top-k, blocks) index at or above it "
                                 f"in every knob, within {shape}")
            out[key] = top
        return out

    def _request_values(self, request: tuple[int, int, int]) -> np.ndarray:
        """The request's plan values: its own, else the weighted mean of every request's."""
        own = self._own_values.get(request)
        return own if own is not None else self._mean_of_all

    def _made_at(self, tier: int) -> tuple[list, np.ndarray]:
        """The requests made at `tier` and the values Stage 1 reads for it: their weighted mean, or every
        request's when none is made there."""
        return self._made[tier]

    def _mean_values(self, requests) -> torch.Tensor:
        """The mean of `requests`' values, each weighted by its value_weights (how many questions make it)."""
        total = sum(self._value_weights[r] for r in requests)
        return sum(self._values[r] * (self._value_weights[r] / total) for r in requests)

    def bin_price(self, budget_ms: float) -> float:
        """The price of a violation at this budget: its bin's steered price, or with expected_price the
        smaller of it and the expected price (module doc)."""
        b = self.budget_bin(budget_ms)
        steered = float(self.price[b])
        if not self.expected_price:
            return steered
        episode = self._episode_tables(budget_ms)
        if "expected_price" not in episode:  # solved once per episode
            episode["expected_price"] = self._solve_expected_price(episode["risk"], float(self.expected_target[b]))
        return min(steered, episode["expected_price"])

    def _solve_expected_price(self, risk: np.ndarray, target: float) -> float:
        """The smallest of EXPECTED_PRICES at which the requests' best plans (value - price x risk, within
        each one's ceiling; ties: the lower risk) exceed the budget with a weighted mean probability <=
        `target`; inf when none does. risk: every plan's P(latency > budget)."""
        risk, prices = risk.reshape(-1), EXPECTED_PRICES
        scores = self._priced_values[None] - prices[:, None, None] * risk - 1e-9 * risk  # (prices, requests, plans)
        chosen = risk[scores.argmax(-1)]  # (prices, requests)
        meeting = np.flatnonzero((chosen * self._priced_weights).sum(-1) <= target)
        return float(prices[meeting[0]]) if len(meeting) else math.inf

    def violation_probability(self, table_ms: torch.Tensor, budget_ms: float) -> torch.Tensor:
        """P(latency > budget) of plans whose scaled table time is `table_ms` (module doc; inf: 1)."""
        return torch.from_numpy(self._risk(np.asarray(table_ms, dtype=np.float64), budget_ms))

    def _risk(self, table_ms: np.ndarray, budget_ms: float, ratios: np.ndarray | None = None) -> np.ndarray:
        """violation_probability on numpy, for the decisions (ratios: sorted ones to read, default the pool's)."""
        ratios = self._sorted_ratios if ratios is None else ratios
        with np.errstate(divide="ignore"):  # a plan timed at 0 ms: limit inf, risk 0
            limit = float(budget_ms) / table_ms
        return (len(ratios) - np.searchsorted(ratios, limit, side="right")) / len(ratios)

    def stage2_violation_probability(self, tier: int, elapsed_ms: float | None, budget_ms: float) -> np.ndarray:
        """(top-k values, block counts) P(latency > budget) of the tier's plans at Stage 2 (module doc):
        with stage2_risk "elapsed" and a fitted line, as predicted by the request's time before Stage 2."""
        episode, line = self._episode_tables(budget_ms), self._speed_line
        if elapsed_ms is None or line is None or not np.isfinite(line[3][int(tier)]):
            return episode["risk"][int(tier)]
        a, b, residuals, medians = line
        residuals = residuals[int(tier)]
        table = episode["table"][int(tier)]
        speed = float(elapsed_ms) / float(self.scale[int(tier)]) / medians[int(tier)]
        with np.errstate(divide="ignore"):  # a plan timed at 0 ms: limit inf, risk 0
            limit = np.log(float(budget_ms) / table) - a - b * math.log(max(speed, 1e-9))
        return (len(residuals) - np.searchsorted(residuals, limit, side="right")) / len(residuals)

    def _episode_tables(self, budget_ms: float) -> dict:
        """Every plan's scaled table time ("table") and P(latency > budget_ms) ("risk"), and with expected_price
        the expected price (bin_price adds it), computed once per episode: both stages' decisions read them,
        and only an observed episode or a new ratio pool changes them."""
        key = (float(budget_ms), self._observed)
        if self._episode is None or self._episode["key"] != key:
            table = self._p95 * self.scale.numpy()[:, None, None]
            risk = (np.stack([self._risk(t, budget_ms, ratios) for t, ratios in zip(table, self._tier_ratios)])
                    if self.risk_pool == "tier" else self._risk(table, budget_ms))
            self._episode = {"key": key, "table": table, "risk": risk}
        return self._episode

    def _best(self, values: np.ndarray, table_ms: np.ndarray, risk: np.ndarray,
              budget_ms: float) -> tuple[np.ndarray, int]:
        """Per row of the (rows, plans) tables (risk: each plan's P(latency > budget)), the best score of
        value - price x risk, and the flat index of the best plan overall (ties: the lower risk, then with
        the ceiling the larger table time, the least change; without it the smaller, the cheapest)."""
        rows = len(values)
        known = np.isfinite(table_ms) & ~np.isnan(values)  # a plan without a value is never picked
        with np.errstate(invalid="ignore"):  # NaN values, masked out here
            scores = np.where(known, values - self.bin_price(budget_ms) * risk, -np.inf).reshape(rows, -1)
        best = scores == scores.max()
        risk = risk.reshape(rows, -1)
        best &= risk == np.where(best, risk, np.inf).min()
        sign = 1.0 if self.value_ceiling else -1.0
        flat = int(np.where(best, sign * table_ms.reshape(rows, -1), -np.inf).argmax())
        return scores.max(1), flat

    def budget_bin(self, budget_ms: float) -> int:
        """The index of the budget bin `budget_ms` falls in (budgets outside the edges: the end bins)."""
        return bisect.bisect_right(self._budget_edges, float(budget_ms))

    def budget_margin(self, budget_ms: float) -> float:
        """The factor on the table at this budget: its bin's margin (1 with violation_target off)."""
        return float(self.margin[self.budget_bin(budget_ms)])

    def stage1(self, tier: int, insertion: int, budget_ms: float) -> tuple[int, int]:
        """(tier index, insertion index) to execute for the chosen ones (module doc)."""
        if self.values is not None:
            made_here, values = self._made_at(int(tier))
            if not made_here:
                top = int(tier) + 1
            elif self.value_ceiling:
                top = max(self.value_ceilings[r][0] for r in made_here) + 1
            else:
                top = len(self.p95_ms)
            episode = self._episode_tables(budget_ms)
            table, risk = episode["table"], episode["risk"]
            best, _ = self._best(values[:top], table[:top], risk[:top], budget_ms)
            tied = np.flatnonzero(best == best.max()).tolist()
            if not self.value_ceiling:
                return min(tied), self.insertion_index  # ties: the lower tier
            # ties: the least change, the highest tier at or below the chosen one, else the lowest above it
            at_or_below = [t for t in tied if t <= int(tier)]
            return (max(at_or_below) if at_or_below else min(tied)), self.insertion_index
        cheapest = self.p95_ms.flatten(1).min(1).values * self.scale * self.budget_margin(budget_ms)
        fitting = [t for t in range(int(tier) + 1) if float(cheapest[t]) <= budget_ms]
        return (fitting[-1] if fitting else int(cheapest.argmin())), self.insertion_index

    def stage2(self, tier: int, top_k: int, num_blocks: int, budget_ms: float,
               requested_tier: int | None = None, elapsed_ms: float | None = None) -> tuple[int, int]:
        """(top-k index, blocks index) to execute at `tier` for the chosen ones (module doc);
        requested_tier: the tier Stage 1 chose (default `tier`), which names the request's values;
        elapsed_ms: the request's measured time before Stage 2 (stage2_risk "elapsed" reads it).
        With values, last_risk and last_price hold what the decision read for the returned plan."""
        self.last_risk, self.last_price = math.nan, math.nan
        if self.values is not None:
            request = (int(tier) if requested_tier is None else int(requested_tier), int(top_k), int(num_blocks))
            table = self._episode_tables(budget_ms)["table"][int(tier)]
            risk = self.stage2_violation_probability(tier, elapsed_ms, budget_ms)
            if self.value_ceiling or request in self._values:
                whole = self._request_values(request)[int(tier)]
            else:  # free: Stage 1's values for the requested tier
                whole = self._made_at(request[0])[1][int(tier)]
            below, values, below_risk = table, whole, risk
            if self.value_ceiling:
                _, k_top, n_top = self.value_ceilings.get(request, request)
                below, values, below_risk = (x[: k_top + 1, : n_top + 1] for x in (table, whole, risk))
            if not (np.isfinite(below) & ~np.isnan(values)).any():  # none known below: the whole tier
                below, values, below_risk = table, whole, risk
            k, n = divmod(self._best(values, below, below_risk, budget_ms)[1], below.shape[1])
            self.last_risk, self.last_price = float(risk[k, n]), self.bin_price(budget_ms)
            return k, n
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

    def observe(self, tier: int, top_k: int, num_blocks: int, latency_ms: float, budget_ms: float,
                elapsed_ms: float | None = None) -> None:
        """An executed episode's measured latency at its budget: moves its tier's scale and its budget
        bin's margin (with values: its price, and the ratio joins the pool, with its time before Stage 2
        `elapsed_ms` when given) (module doc)."""
        if not math.isfinite(float(latency_ms)):
            return
        self._observed += 1
        predicted = float(self.p95_ms[tier, top_k, num_blocks] * self.scale[tier])
        if self.violation_target is not None:
            b = self.budget_bin(budget_ms)
            violated = float(float(latency_ms) > float(budget_ms))
            step = math.exp(self.violation_rate * (violated - self.violation_target))
            if self.values is None:
                self.margin[b] = min(max(float(self.margin[b]) * step, MARGIN_MIN), MARGIN_MAX)
            else:
                self.price[b] = min(max(float(self.price[b]) * step, PRICE_MIN), PRICE_MAX)
                if self.expected_price:
                    low, high = (f * self.violation_target for f in EXPECTED_TARGET_RANGE)
                    self.expected_target[b] = min(max(float(self.expected_target[b]) / step, low), min(high, 1.0))
                if math.isfinite(predicted) and predicted > 0:
                    ratio = torch.tensor([float(latency_ms) / predicted], dtype=torch.float64)
                    elapsed = math.nan if elapsed_ms is None else float(elapsed_ms) / float(self.scale[tier])
                    if self.risk_pool == "tier":  # each tier's last RATIO_WINDOW episodes, whatever the others ran
                        own, times = self._tier_history[tier]
                        self._tier_history[tier] = (np.append(own, float(ratio))[-RATIO_WINDOW:],
                                                    np.append(times, elapsed)[-RATIO_WINDOW:])
                    self._set_pool(torch.cat([self.ratios, ratio])[-RATIO_WINDOW:],
                                   np.append(self._pool_elapsed, elapsed)[-RATIO_WINDOW:],
                                   np.append(self._pool_tiers, int(tier))[-RATIO_WINDOW:])
        if self.tracking_rate == 0 or not math.isfinite(predicted):
            return
        exceeded = float(float(latency_ms) > predicted)
        self.scale[tier] *= math.exp(self.tracking_rate * (exceeded - (1.0 - self.quantile)))

    def mean_scale(self) -> float:
        """The tiers' tracked scales as one ratio (their geometric mean): how much slower than its
        start-up table the table now says this machine is (a controller's time_scale follows it)."""
        return float(self.scale.log().mean().exp())

    def state_dict(self) -> dict:
        def by_request(table, entry):  # JSON keys: a request's (tier, top-k, blocks) index as "t,k,n"
            return None if table is None else {",".join(map(str, k)): entry(v) for k, v in table.items()}
        return {"p95_ms": self.p95_ms.tolist(), "insertion_index": self.insertion_index,
                "tracking_rate": self.tracking_rate, "quantile": self.quantile, "scale": self.scale.tolist(),
                "violation_target": self.violation_target, "violation_rate": self.violation_rate,
                "budget_edges_ms": self.budget_edges_ms.tolist(), "margin": self.margin.tolist(),
                "values": by_request(self.values, torch.Tensor.tolist),
                "value_weights": by_request(self.value_weights, float),
                "value_ceilings": by_request(self.value_ceilings, list),
                "price": self.price.tolist(), "value_ceiling": self.value_ceiling,
                "expected_price": self.expected_price, "expected_target": self.expected_target.tolist(),
                "stage2_risk": self.stage2_risk, "speed_slope": self.speed_slope, "risk_pool": self.risk_pool}


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


def check_price_start(value, field: str) -> float:
    """A steered price's start, or an error naming `field` when it is not a number in [PRICE_MIN, PRICE_MAX]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not PRICE_MIN <= float(value) <= PRICE_MAX:
        raise ValueError(f"{field}={value!r}: expected a price in [{PRICE_MIN:g}, {PRICE_MAX:g}] (accuracy per "
                         f"unit of violation probability), e.g. {PRICE_START:g}")
    return float(value)


def check_violation_rate(value, field: str) -> float:
    """The per-bin steering step as a float, or a ValueError naming `field` when it is not a finite rate > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{field}={value!r}: expected a finite rate > 0 (the step by which each budget bin's "
                         f"margin or price follows its violations, e.g. 0.1)")
    return float(value)


def following_time_scale(start_up: float, shield: LatencyShield | None, budget_ms: float | None = None) -> float:
    """A controller's time_scale before an episode: its start-up scale (this machine's latency over its
    training run's) times its shield's tracked mean_scale and, at `budget_ms`, the shield's margin for
    it, so that the plan it picks is one the table the shield now holds lets through (evaluate.py
    --time_rescale on, answer.py)."""
    if shield is None:
        return start_up
    return start_up * shield.mean_scale() * (shield.budget_margin(budget_ms) if budget_ms is not None else 1.0)
