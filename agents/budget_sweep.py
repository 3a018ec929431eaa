"""Evaluation over a sweep of latency budgets: the per-(policy, budget) rows (written and plotted by
agents.reporting).

Static configurations, the lookup tables and the oracle are derived from one measured
(sample x configuration) table of accuracy and latency: latency does not depend on the budget,
so every configuration runs once per sample and every budget reuses the table. The controller
and the random policy act on the budget, so they run through the env once per (sample, budget).

Training hook (cheap, controller only):
    rows = controller_budget_sweep(val_env, actor, sample_index, budgets)
    writer.add_figure("val/accuracy_vs_budget", accuracy_vs_budget_figure(rows), step)  # agents.reporting
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from agents.baselines import (
    PolicySpec,
    ProfileEntry,
    RandomPolicy,
    StaticChoice,
    lookup_select,
    oracle_select,
)
from agents.evaluation import dummy_reference_rewards, run_episodes
from envs.budget_env import ACTION_HEADS
from envs.knobs import KnobSpace
from envs.reward import RewardWeights, check_budget, compute_reward

# --------------------------------------------------------------------------- budgets
def check_budgets(budgets: Iterable[float]) -> list[float]:
    """Budgets as floats; each must be finite and > 0 (the error names the first bad one)."""
    values = [float(b) for b in budgets]
    if not values:
        raise ValueError("budgets is empty; expected at least one latency budget in ms")
    for b in values:
        check_budget(b, "budget")
    return values


def default_budgets(budget_range_ms: Sequence[float], num: int = 8) -> list[float]:
    """`num` budgets evenly spread over the training range [lo, hi] (both ends included)."""
    if int(num) < 1:
        raise ValueError(f"num_budgets={num}: expected >= 1")
    lo, hi = (float(v) for v in budget_range_ms)
    if num == 1:
        return [(lo + hi) / 2]
    return [float(b) for b in torch.linspace(lo, hi, int(num), dtype=torch.float64)]


# --------------------------------------------------------------------------- measured table
@dataclass
class ConfigTable:
    """Accuracy and measured latency (ms, preprocess + vision + prefill + decode) of static
    configurations, one row per evaluated sample."""

    sample_index: torch.Tensor  # (S,) indices into the split's samples
    configs: list[StaticChoice]
    accuracy: torch.Tensor  # (S, C)
    latency: torch.Tensor  # (S, C)
    skipped: list[int] = field(default_factory=list)  # sample indices whose image could not be loaded
    seconds: float = 0.0

    def column(self, config: StaticChoice) -> int:
        try:
            return self.configs.index(config)
        except ValueError:
            raise KeyError(f"configuration {config.name} (p={config.insertion}) was not measured") from None


def measure_config_table(
    backend, samples: Sequence, sample_index: Sequence[int], configs: Sequence[StaticChoice],
    warmup: int = 1, seed: int = 0, progress: Callable[[str], None] | None = None,
) -> ConfigTable:
    """Run every config once per sample as a batch-1 backend episode (zero budget token, as in
    profile.json) through the one latency-table measurer (envs.profiling.measure_latency: configs in
    a shuffled order per sample, warm-up on the first readable sample). Samples whose image cannot
    be loaded are skipped (counted by envs.data.vqa.record_skipped, and listed)."""
    from envs.data.vqa import record_skipped  # the dataset-wide skip counter, as the env uses
    from envs.profiling.latency_table import measure_latency

    configs = list(configs)
    sample_index = [int(i) for i in sample_index]
    measured = measure_latency(backend, [samples[i] for i in sample_index], configs, warmup=warmup, seed=seed,
                               progress=progress, on_unreadable=record_skipped)
    if not measured.kept:
        raise RuntimeError(f"no sample of {len(sample_index)} had a readable image")
    accs = [[float(measured.results[c][row].accuracy) for c in configs] for row in range(len(measured.kept))]
    totals = [measured.totals(c) for c in configs]
    lats = [[t[row] for t in totals] for row in range(len(measured.kept))]
    return ConfigTable(torch.tensor([sample_index[n] for n in measured.kept]), configs,
                       torch.tensor(accs, dtype=torch.float64), torch.tensor(lats, dtype=torch.float64),
                       [sample_index[n] for n in measured.skipped], measured.seconds)


def configs_needed(specs: Sequence[PolicySpec], all_configs: Sequence[StaticChoice],
                   profile: Sequence[ProfileEntry] | None, budgets: Sequence[float]) -> list[StaticChoice]:
    """The configurations the table-based policies need (all of them for the oracle)."""
    kinds = {s.kind for s in specs}
    if "oracle" in kinds:  # every config, plus any profiled at another insertion that a lookup picks
        extra = {lookup_select(profile, b, rule)[0] for rule in ("mean", "p95") if f"lookup-{rule}" in kinds
                 for b in budgets} - set(all_configs)
        return list(all_configs) + sorted(extra, key=lambda c: c.name)
    needed = {s.config for s in specs if s.kind == "static"}
    for rule in ("mean", "p95"):
        if f"lookup-{rule}" in kinds:
            needed.update(lookup_select(profile, b, rule)[0] for b in budgets)
    return [c for c in all_configs if c in needed] + sorted(needed - set(all_configs), key=lambda c: c.name)


# --------------------------------------------------------------------------- one row
def summarize_choices(
    policy: str, budget: float, accuracy: torch.Tensor, latency: torch.Tensor, reward: torch.Tensor,
    actions: Mapping[str, torch.Tensor], knob_space: KnobSpace, families: Sequence | None = None,
    **extra,
) -> dict:
    """One (policy, budget) row from per-episode values; `actions` are index tensors per head."""
    acc, lat, rew = (t.double().reshape(-1) for t in (accuracy, latency, reward))
    values = {"tier": knob_space.tiers, "insertion": knob_space.insertion_positions,
              "top_k": knob_space.top_k_values, "num_blocks": knob_space.num_blocks_values}
    n = acc.numel()
    choices = {}
    for h in ACTION_HEADS:
        counts = torch.bincount(actions[h].reshape(-1).long(), minlength=len(values[h]))
        choices[h] = {str(v): float(counts[i]) / n for i, v in enumerate(values[h])}
    row = {
        "policy": policy,
        "budget_ms": float(budget),
        "accuracy_mean": float(acc.mean()),
        "latency_mean_ms": float(lat.mean()),
        "latency_p50_ms": float(torch.quantile(lat, 0.5)),
        "latency_p95_ms": float(torch.quantile(lat, 0.95)),
        "violation_rate": float((lat > budget).double().mean()),
        "reward_mean": float(rew.mean()),
        "num_episodes": n,
        "choices": choices,
    }
    if families is not None and any(f is not None for f in families):
        by = {}
        for f in sorted({f for f in families if f is not None}):
            mask = torch.tensor([g == f for g in families])
            by[f] = float(acc[mask].mean())
        row["accuracy_by_family"] = by
    row.update(extra)
    return row


def families_of(samples: Sequence, sample_index: Iterable[int]) -> list | None:
    fam = [getattr(samples[int(i)], "family", None) for i in sample_index]
    return fam if any(f is not None for f in fam) else None


# --------------------------------------------------------------------------- table policies
def table_policy_rows(
    spec: PolicySpec, table: ConfigTable, budgets: Sequence[float], knob_space: KnobSpace,
    weights: RewardWeights, families: Sequence | None = None, profile: Sequence[ProfileEntry] | None = None,
) -> list[dict]:
    """Rows of a static / lookup / oracle policy for every budget, from the measured table."""
    s = table.accuracy.shape[0]
    complexity = torch.tensor([c.complexity(knob_space) for c in table.configs], dtype=torch.float64)
    head_index = {h: torch.tensor([c.indices(knob_space)[h] for c in table.configs]) for h in ACTION_HEADS}
    rows = []
    for budget in budgets:
        extra = {}
        if spec.kind == "static":
            col = torch.full((s,), table.column(spec.config), dtype=torch.long)
            extra["config"] = spec.config.name
        elif spec.kind in ("lookup-mean", "lookup-p95"):
            if profile is None:
                raise ValueError(f"policy {spec.name!r} needs a profile")
            config, fits = lookup_select(profile, budget, spec.kind.split("-")[1])
            col = torch.full((s,), table.column(config), dtype=torch.long)
            extra.update(config=config.name, fallback_rate=0.0 if fits else 1.0)
        elif spec.kind == "oracle":  # over the static configs (smallest p), as measured on each sample
            cols = torch.tensor([j for j, c in enumerate(table.configs) if c.insertion == min(knob_space.insertion_positions)])
            sub, fits = oracle_select(table.accuracy[:, cols], table.latency[:, cols], budget)
            col = cols[sub]
            extra["fallback_rate"] = float((~fits).double().mean())
        else:
            raise ValueError(f"policy {spec.name!r} does not run from the config table")
        rows_idx = torch.arange(s)
        acc, lat = table.accuracy[rows_idx, col], table.latency[rows_idx, col]
        reward = compute_reward(acc, lat, torch.tensor(float(budget), dtype=torch.float64), complexity[col], weights)
        actions = {h: head_index[h][col] for h in ACTION_HEADS}
        rows.append(summarize_choices(spec.name, budget, acc, lat, reward, actions, knob_space, families, **extra))
    return rows


# --------------------------------------------------------------------------- env policies
def env_policy_rows(
    env, policy, name: str, sample_index: torch.Tensor, budgets: Sequence[float], greedy: bool = True,
    reference: bool = False,
) -> list[dict]:
    """Run `policy` (the controller or RandomPolicy) through the env on every (sample, budget)
    pair (one run_episodes call over all pairs) and summarize per budget. With reference=True on
    a backend with expected_rewards (the dummy), rows also get the expected/optimal/random rewards."""
    budgets = check_budgets(budgets)
    s = sample_index.numel()
    idx = sample_index.reshape(-1).repeat(len(budgets))
    bud = torch.tensor(budgets, dtype=torch.float32).repeat_interleave(s)
    episodes = run_episodes(env, policy, idx, bud, greedy=greedy)
    families = families_of(env.samples, sample_index.tolist())
    rows = []
    for b_i, budget in enumerate(budgets):
        ep = episodes[b_i * s:(b_i + 1) * s]
        info = ep["episode"]
        extra = {}
        if reference and env.backend.has_closed_form:
            ref = dummy_reference_rewards(env, ep)
            extra = {"expected_reward_mean": ref["expected_reward_mean"],
                     "optimal_expected_reward_mean": ref["optimal_reward_mean"],
                     "random_expected_reward_mean": ref["random_reward_mean"]}
        row = summarize_choices(
            name, budget, info["accuracy"], info["latency_ms"], ep["reward"],
            {h: ep["action", h] for h in ACTION_HEADS}, env.knob_space, families, **extra,
        )
        # The env's own count (against the float32 budget it stores).
        row["violation_rate"] = float(info["violation"].double().mean())
        rows.append(row)
    return rows


def controller_budget_sweep(env, actor, sample_index: torch.Tensor, budgets: Sequence[float]) -> list[dict]:
    """Greedy controller on the same samples at every budget -> one row per budget (policy
    "controller"). Cheap enough for every validation of a training run on the dummy backend;
    the actor's train/eval mode is restored."""
    was_training = getattr(actor, "training", False)
    if hasattr(actor, "eval"):
        actor.eval()
    try:
        return env_policy_rows(env, actor, "controller", torch.as_tensor(sample_index).long(), budgets, greedy=True)
    finally:
        if was_training:
            actor.train()


def random_policy_rows(env, sample_index: torch.Tensor, budgets: Sequence[float], seed: int = 0,
                       reference: bool = False) -> list[dict]:
    policy = RandomPolicy(env.knob_space, env.backend.d_model, seed=seed)
    return env_policy_rows(env, policy, "random", sample_index, budgets, greedy=False, reference=reference)
