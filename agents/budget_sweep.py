"""Evaluation over a sweep of latency budgets: the per-(policy, budget) table, eval.json/csv, plots.

Static configurations, the lookup tables and the oracle are derived from one measured
(sample x configuration) table of accuracy and latency: latency does not depend on the budget,
so every configuration runs once per sample and every budget reuses the table. The controller
and the random policy act on the budget, so they run through the env once per (sample, budget).

Training hook (cheap, controller only):
    rows = controller_budget_sweep(val_env, actor, sample_index, budgets)
    writer.add_figure("val/accuracy_vs_budget", accuracy_vs_budget_figure(rows), step)
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
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
from envs.files import atomic_writer, write_json
from envs.knobs import KnobSpace
from envs.reward import RewardWeights, check_budget, compute_reward

ROW_FIELDS = (
    "policy", "budget_ms", "accuracy_mean", "latency_mean_ms", "latency_p50_ms", "latency_p95_ms",
    "violation_rate", "reward_mean", "num_episodes", "fallback_rate", "config",
)
PLOTS = {
    "accuracy": "accuracy_vs_budget.png",
    "latency": "latency_vs_budget.png",
    "violation": "violation_vs_budget.png",
    "knobs": "controller_knobs_vs_budget.png",
}


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
        if reference and hasattr(env.backend, "expected_rewards"):
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


# --------------------------------------------------------------------------- outputs
def flat_row(row: Mapping) -> dict:
    """A row for CSV: nested per-family accuracy and knob choices become columns."""
    flat = {k: v for k, v in row.items() if not isinstance(v, Mapping)}
    for fam, v in (row.get("accuracy_by_family") or {}).items():
        flat[f"accuracy_family_{fam}"] = v
    for head, dist in (row.get("choices") or {}).items():
        for value, frac in dist.items():
            flat[f"choice_{head}_{value}"] = frac
    return flat


def write_csv(rows: Sequence[Mapping], path: Path) -> None:
    flats = [flat_row(r) for r in rows]
    columns = [c for c in ROW_FIELDS if any(c in f for f in flats)]
    for f in flats:
        columns += [c for c in f if c not in columns]
    with atomic_writer(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        for f in flats:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in f.items()})


def write_outputs(rows: Sequence[Mapping], meta: Mapping, output_dir: str | Path) -> dict[str, Path]:
    """eval.json, eval.csv and the PNG plots in output_dir; returns the paths written."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "csv": out / "eval.csv"}
    write_json(paths["json"], {"rows": list(rows), "meta": dict(meta)})
    write_csv(rows, paths["csv"])
    for key, fig in (
        ("accuracy", accuracy_vs_budget_figure(rows)),
        ("latency", latency_vs_budget_figure(rows)),
        ("violation", violation_vs_budget_figure(rows)),
        ("knobs", knob_choices_figure(rows)),
    ):
        if fig is None:
            continue
        paths[key] = out / PLOTS[key]
        fig.savefig(paths[key], dpi=110)
    return paths


# --------------------------------------------------------------------------- plots
def _by_policy(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(r["policy"], []).append(r)
    return {p: sorted(rs, key=lambda r: r["budget_ms"]) for p, rs in groups.items()}


def _style(policy: str) -> dict:
    if policy == "controller":
        return {"linewidth": 2.4, "marker": "o", "zorder": 5}
    if policy == "oracle":
        return {"linewidth": 1.6, "marker": "^", "linestyle": "--"}
    if policy.startswith("static:"):
        return {"linewidth": 1.0, "marker": ".", "alpha": 0.7, "linestyle": ":"}
    return {"linewidth": 1.5, "marker": "s", "markersize": 4}


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure  # no pyplot: no global state, works under any backend

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _metric_figure(rows, key: str, ylabel: str, title: str):
    fig, ax = _figure()
    for policy, rs in _by_policy(rows).items():
        ax.plot([r["budget_ms"] for r in rs], [r[key] for r in rs], label=policy, **_style(policy))
    ax.set_xlabel("latency budget (ms)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig, ax


def accuracy_vs_budget_figure(rows: Sequence[Mapping], title: str = "accuracy vs latency budget"):
    """matplotlib Figure: mean accuracy per budget, one line per policy (for TensorBoard's add_figure)."""
    fig, _ = _metric_figure(rows, "accuracy_mean", "accuracy", title)
    return fig


def latency_vs_budget_figure(rows: Sequence[Mapping]):
    """Mean (solid) and p95 (thin) latency per policy, with the budget line y = x."""
    fig, ax = _figure()
    budgets = sorted({r["budget_ms"] for r in rows})
    for policy, rs in _by_policy(rows).items():
        x = [r["budget_ms"] for r in rs]
        (line,) = ax.plot(x, [r["latency_mean_ms"] for r in rs], label=f"{policy} (mean)", **_style(policy))
        ax.plot(x, [r["latency_p95_ms"] for r in rs], color=line.get_color(), linewidth=0.8, alpha=0.6,
                linestyle="-.")
    ax.plot(budgets, budgets, color="black", linestyle="--", linewidth=1.2, label="budget")
    ax.set_xlabel("latency budget (ms)")
    ax.set_ylabel("latency (ms); thin dash-dot = p95")
    ax.set_title("latency vs budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def violation_vs_budget_figure(rows: Sequence[Mapping]):
    fig, ax = _metric_figure(rows, "violation_rate", "violation rate (latency > budget)", "budget violations")
    ax.set_ylim(-0.02, 1.02)
    return fig


def knob_choices_figure(rows: Sequence[Mapping], policy: str = "controller"):
    """Stacked fractions of each knob value the policy chose, per budget, one panel per head
    (None if the policy has no rows)."""
    rs = _by_policy(rows).get(policy)
    if not rs:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.4), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    x = list(range(len(rs)))
    for ax, head in zip(axes, ACTION_HEADS):
        values = list(rs[0]["choices"][head])
        bottom = [0.0] * len(rs)
        for v in values:
            h = [r["choices"][head][v] for r in rs]
            ax.bar(x, h, bottom=bottom, label=v)
            bottom = [b + y for b, y in zip(bottom, h)]
        ax.set_xticks(x, [f"{r['budget_ms']:.0f}" for r in rs], fontsize="small")
        ax.set_xlabel("budget (ms)")
        ax.set_ylabel("fraction")
        ax.set_title(head)
        ax.legend(fontsize="x-small", ncols=min(len(values), 5), loc="upper left")
        ax.set_ylim(0, 1.25)
    fig.suptitle(f"{policy}: knob choices vs budget")
    return fig
