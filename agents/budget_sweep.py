"""Evaluation over a sweep of latency budgets: the per-(policy, budget) rows (written and plotted by
agents.reporting).

Static configurations, the lookup tables and the oracles are derived from one measured
(sample x configuration) table of accuracy and latency: latency does not depend on the budget,
so every configuration runs once per sample and every budget reuses the table; lookup-calibrated
and family-oracle choose on a second table, the calibration set's (`Calibration`). The controller
and the random policy act on the budget, so they run through the env once per (sample, budget).
runners/evaluate.py measures all of it interleaved in time (agents.sweep_schedule).

Training hook (cheap, controller only):
    rows = controller_budget_sweep(val_env, actor, sample_index, budgets)
    writer.add_figure("val/accuracy_vs_budget", accuracy_vs_budget_figure(rows), step)  # agents.reporting
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from agents.baselines import (
    CALIBRATED_POLICIES,
    PolicySpec,
    ProfileEntry,
    StaticChoice,
    lookup_select,
    oracle_select,
    profile_from_table,
    smooth_latencies,
)
from agents.evaluation import dummy_reference_rewards, run_episodes
from envs.budget_env import ACTION_HEADS
from envs.headroom import budget_headroom, headroom_choices
from envs.knobs import KnobSpace
from envs.profiling.pareto import pareto_frontier
from envs.reward import RewardWeights, check_budget, compute_reward

# --------------------------------------------------------------------------- budgets
def check_budgets(budgets: Iterable[float], field: str = "budget") -> list[float]:
    """Budgets as floats; each must be finite and > 0 (the error names `field` and the first bad one)."""
    values = [float(b) for b in budgets]
    if not values:
        raise ValueError(f"{field} is empty; expected at least one latency budget in ms")
    for b in values:
        check_budget(b, field)
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


def config_table_to_json(table: ConfigTable) -> dict:
    """A measured table as eval.json keeps it (rows in measurement order, one per sample): each
    configuration's per-sample accuracy and latency, for analyses the run's policies did not make."""
    return {"configs": [c.name for c in table.configs], "insertion": [c.insertion for c in table.configs],
            "sample_index": table.sample_index.tolist(), "accuracy": table.accuracy.tolist(),
            "latency_ms": [[round(v, 3) for v in row] for row in table.latency.tolist()]}


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
    if kinds & {"oracle", *CALIBRATED_POLICIES}:  # every config, plus any profiled at another p a lookup picks
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
    violation: torch.Tensor | None = None, **extra,
) -> dict:
    """One (policy, budget) row from per-episode values; `actions` are index tensors per head.
    violation: per-episode flags when the caller has its own count (default latency > budget)."""
    acc, lat, rew = (t.double().reshape(-1) for t in (accuracy, latency, reward))
    viol = (lat > budget).double() if violation is None else violation.double().reshape(-1)
    values = knob_space.head_values
    n = acc.numel()

    def fractions(mask: torch.Tensor) -> dict:
        """Per head, the fraction of the masked episodes that chose each value."""
        out = {}
        for h in ACTION_HEADS:
            counts = torch.bincount(actions[h].reshape(-1).long()[mask], minlength=len(values[h]))
            out[h] = {str(v): float(counts[i]) / int(mask.sum()) for i, v in enumerate(values[h])}
        return out

    choices = fractions(torch.ones(n, dtype=torch.bool))
    row = {
        "policy": policy,
        "budget_ms": float(budget),
        "accuracy_mean": float(acc.mean()),
        "latency_mean_ms": float(lat.mean()),
        "latency_p50_ms": float(torch.quantile(lat, 0.5)),
        "latency_p95_ms": float(torch.quantile(lat, 0.95)),
        "violation_rate": float(viol.mean()),
        "reward_mean": float(rew.mean()),
        "num_episodes": n,
        "choices": choices,
        # in the order of the run's samples, the same for every policy: paired comparisons (agents.reporting)
        "per_sample": {"accuracy": acc.tolist(), "violation": viol.tolist(),
                       "latency_ms": [round(v, 3) for v in lat.tolist()]},
    }
    if families is not None and any(f is not None for f in families):
        masks = {f: torch.tensor([g == f for g in families]) for f in sorted({f for f in families if f is not None})}
        row["accuracy_by_family"] = {f: float(acc[m].mean()) for f, m in masks.items()}
        row["violation_rate_by_family"] = {f: float(viol[m].mean()) for f, m in masks.items()}
        row["num_episodes_by_family"] = {f: int(m.sum()) for f, m in masks.items()}
        row["choices_by_family"] = {f: fractions(m) for f, m in masks.items()}
    row.update(extra)
    return row


def families_of(samples: Sequence, sample_index: Iterable[int]) -> list | None:
    fam = [getattr(samples[int(i)], "family", None) for i in sample_index]
    return fam if any(f is not None for f in fam) else None


# --------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """The calibration set of one evaluation run: its measured config table (samples disjoint from
    the test samples, measured in the same run) and each row's question family."""

    table: ConfigTable
    families: list | None


def static_columns(table: ConfigTable, knob_space: KnobSpace) -> list[int]:
    """Columns of the static configurations (smallest insertion position), the oracles' choices."""
    p = min(knob_space.insertion_positions)
    return [j for j, c in enumerate(table.configs) if c.insertion == p]


def family_accuracy(table: ConfigTable, families: Sequence, columns: Sequence[int]) -> dict[str, dict[str, float]]:
    """{config name: {family: mean accuracy over the family's rows}} (envs.headroom's table form)."""
    masks = {f: torch.tensor([g == f for g in families]) for f in sorted(set(families))}
    return {table.configs[j].name: {f: float(table.accuracy[m, j].mean()) for f, m in masks.items()} for j in columns}


def family_oracle_choice(calibration: Calibration, test: ConfigTable, test_families: Sequence, budget: float,
                         knob_space: KnobSpace) -> tuple[dict[str, StaticChoice], bool, dict | None]:
    """Per question family, the static configuration with the best calibration accuracy on that
    family among those whose calibration p95 latency fits the budget (envs.headroom.budget_headroom;
    its accuracies are read on the test table). None fits: every family takes the configuration
    with the lowest calibration p95. Returns (family -> config, fits, the headroom report or None)."""
    if calibration.families is None or test_families is None:
        raise ValueError("policy 'family-oracle' needs question families; these samples carry none "
                         "(SynthVQA and the dummy have them, real VQA datasets do not)")
    missing = sorted(set(test_families) - set(calibration.families))
    if missing:
        raise ValueError(f"policy 'family-oracle': the calibration set has no question of family {missing}; "
                         f"pass a larger --calibration_samples")
    by_name, choose, p95 = calibration_tables(calibration, knob_space)
    shares = family_shares(test_families)
    # read on the configurations the test samples ran: all of them, or with the calibration measured first
    # (evaluate.py --calibration_phase first) the ones the choices can need (calibrated_choices)
    read = family_accuracy(test, test_families, [test.column(c) for c in by_name.values() if c in test.configs])
    report = budget_headroom(choose, read, p95, shares, budget)
    if report is None:
        fastest = min(p95, key=p95.get)
        return {f: by_name[fastest] for f in shares}, False, None
    return {f: by_name[name] for f, name in report["family_choice"].items()}, True, report


def family_shares(families: Sequence) -> dict:
    """Each question family's share of `families`."""
    return {f: sum(g == f for g in families) / len(families) for f in sorted(set(families))}


def calibration_tables(calibration: Calibration, knob_space: KnobSpace) -> tuple[dict, dict, dict]:
    """The calibration's static configurations by name, their accuracy per family and their p95 latency."""
    cols = static_columns(calibration.table, knob_space)
    by_name = {calibration.table.configs[j].name: calibration.table.configs[j] for j in cols}
    p95 = {calibration.table.configs[j].name: float(torch.quantile(calibration.table.latency[:, j], 0.95))
           for j in cols}
    return by_name, family_accuracy(calibration.table, calibration.families, cols), p95


def calibrated_choices(calibration: Calibration, test_families: Sequence | None, budgets: Sequence[float],
                       knob_space: KnobSpace) -> set[StaticChoice]:
    """Every configuration that lookup-calibrated, family-oracle and its headroom report's best
    static read on the test samples at `budgets`: all the test samples need to run when the
    calibration is measured before them."""
    chosen = {lookup_select(calibrated_profile(calibration, knob_space), b, "p95")[0] for b in budgets}
    if test_families is None or calibration.families is None:
        return chosen
    by_name, choose, p95 = calibration_tables(calibration, knob_space)
    for b in budgets:
        picked = headroom_choices(choose, p95, family_shares(test_families), b)
        names = [min(p95, key=p95.get)] if picked is None else [picked[0], *picked[1].values()]
        chosen.update(by_name[n] for n in names)
    return chosen


def frontier_candidates(calibration: Calibration, knob_space: KnobSpace) -> set[StaticChoice]:
    """The static configurations on their tier's Pareto frontier over the calibration set (accuracy up,
    smoothed p95 latency down, agents.baselines.smooth_latencies), overall and per question family:
    whatever factor each tier's latency drifts by later, lookup-calibrated and family-oracle choose
    among them (a choice off its tier's frontier loses to a cheaper plan of that tier at least as
    accurate). evaluate.py --calibration_phase two-pass re-measures only these, interleaved."""
    t, cols = calibration.table, static_columns(calibration.table, knob_space)
    p95 = {e.config: e.latency_p95_ms for e in smooth_latencies(calibrated_profile(calibration, knob_space))}
    per_family = family_accuracy(t, calibration.families, cols) if calibration.families is not None else {}
    views = [{t.configs[j]: float(t.accuracy[:, j].mean()) for j in cols}]  # overall, then each family's
    views += [{t.configs[j]: per_family[t.configs[j].name][f] for j in cols} for f in sorted(set(calibration.families or []))]
    out = set()
    for acc in views:
        for tier in dict.fromkeys(c.tier for c in acc):
            configs = [c for c in acc if c.tier == tier]
            rows = [{"accuracy": acc[c], "p95": p95[c]} for c in configs]
            out.update(configs[i] for i in pareto_frontier(rows, "accuracy", "p95"))
    return out


def budget_feasibility(table: ConfigTable, budgets: Sequence[float], limit: float = 0.05) -> list[dict]:
    """Per budget, the measured static configuration that exceeded it least often on the table's
    samples, that rate, and whether it is <= limit (feasible). A budget that no configuration met on
    95% of the test requests is one where no policy can hold 5% violations on this machine during this
    run (the VM slowed 1.27x between the first pass that set the budgets and the test rounds, RESULTS
    0-s16), so the violation target is read at the feasible budgets, and the others are named."""
    out = []
    for b in budgets:
        rates = (table.latency > float(b)).double().mean(0)
        j = int(rates.argmin())
        out.append({"budget_ms": float(b), "least_violating_config": table.configs[j].name,
                    "violation_rate": float(rates[j]), "feasible": bool(float(rates[j]) <= limit)})
    return out


def calibrated_profile(calibration: Calibration, knob_space: KnobSpace) -> list[ProfileEntry]:
    """The calibration table as a profile of the static configurations (mean accuracy, mean / p95 latency)."""
    t, cols = calibration.table, static_columns(calibration.table, knob_space)
    return profile_from_table([t.configs[j] for j in cols], t.accuracy[:, cols], t.latency[:, cols])


# --------------------------------------------------------------------------- table policies
def table_policy_rows(
    spec: PolicySpec, table: ConfigTable, budgets: Sequence[float], knob_space: KnobSpace,
    weights: RewardWeights, families: Sequence | None = None, profile: Sequence[ProfileEntry] | None = None,
    calibration: Calibration | None = None,
) -> list[dict]:
    """Rows of a static / lookup / oracle policy for every budget, from the measured (test) table;
    lookup-calibrated and family-oracle choose on `calibration` and are read on the table."""
    s = table.accuracy.shape[0]
    complexity = torch.tensor([c.complexity(knob_space) for c in table.configs], dtype=torch.float64)
    head_index = {h: torch.tensor([c.indices(knob_space)[h] for c in table.configs]) for h in ACTION_HEADS}
    if spec.kind in CALIBRATED_POLICIES and calibration is None:
        raise ValueError(f"policy {spec.name!r} needs a calibration set (calibration samples measured in this run)")
    calibrated = calibrated_profile(calibration, knob_space) if spec.kind == "lookup-calibrated" else None
    rows = []
    for budget in budgets:
        extra = {}
        if spec.kind == "static":
            col = torch.full((s,), table.column(spec.config), dtype=torch.long)
            extra["config"] = spec.config.name
        elif spec.kind in ("lookup-mean", "lookup-p95", "lookup-calibrated"):
            if spec.kind != "lookup-calibrated" and profile is None:
                raise ValueError(f"policy {spec.name!r} needs a profile")
            rule = "mean" if spec.kind == "lookup-mean" else "p95"
            config, fits = lookup_select(calibrated or profile, budget, rule)
            col = torch.full((s,), table.column(config), dtype=torch.long)
            extra.update(config=config.name, fallback_rate=0.0 if fits else 1.0)
        elif spec.kind == "family-oracle":
            choice, fits, _ = family_oracle_choice(calibration, table, families, budget, knob_space)
            col = torch.tensor([table.column(choice[f]) for f in families], dtype=torch.long)
            extra.update(family_choice={f: c.name for f, c in choice.items()}, fallback_rate=0.0 if fits else 1.0)
        elif spec.kind == "oracle":  # over the static configs (smallest p), as measured on each sample
            cols = torch.tensor(static_columns(table, knob_space))
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
    pair (one run_episodes call over all pairs) and summarize per budget (episode_rows)."""
    budgets = check_budgets(budgets)
    s = sample_index.numel()
    idx = sample_index.reshape(-1).repeat(len(budgets))
    bud = torch.tensor(budgets, dtype=torch.float32).repeat_interleave(s)
    episodes = run_episodes(env, policy, idx, bud, greedy=greedy)
    return episode_rows(env, name, episodes, sample_index, budgets, reference)


def _samples_per_budget(episodes, sample_index: torch.Tensor, budgets: Sequence[float]) -> int:
    """The number of samples of budget-major (budget, sample) terminal steps, or an error when the
    episodes are not one per sample and budget."""
    s = sample_index.numel()
    if episodes.shape[0] != s * len(budgets):
        raise ValueError(f"{episodes.shape[0]} episodes for {s} samples x {len(budgets)} budgets")
    return s


def episode_rows(env, name: str, episodes, sample_index: torch.Tensor, budgets: Sequence[float],
                 reference: bool = False) -> list[dict]:
    """One row per budget from terminal steps ordered budget-major (budget, sample). With
    reference=True on a backend with expected_rewards (the dummy), rows also get the
    expected/optimal/random rewards."""
    s = _samples_per_budget(episodes, sample_index, budgets)
    families = families_of(env.samples, sample_index.tolist())
    rows = []
    for b_i, budget in enumerate(budgets):
        ep = episodes[b_i * s:(b_i + 1) * s]
        info = ep["episode"]
        extra = {}
        risk = info["shield_risk"].double()
        if bool(torch.isfinite(risk).any()):  # the violation rate a value shield predicted for the plans that ran
            extra["shield_risk_mean"] = float(risk.nanmean())
        if reference and env.backend.has_closed_form:
            ref = dummy_reference_rewards(env, ep)
            extra.update({"expected_reward_mean": ref["expected_reward_mean"],
                          "optimal_expected_reward_mean": ref["optimal_reward_mean"],
                          "random_expected_reward_mean": ref["random_reward_mean"]})
        rows.append(summarize_choices(
            name, budget, info["accuracy"], info["latency_ms"], ep["reward"],
            {h: ep["action", h] for h in ACTION_HEADS}, env.knob_space, families,
            violation=info["violation"],  # the env's own count (against the float32 budget it stores)
            shield_rate=float(info["shielded"].double().mean()),  # episodes whose plan the latency shield changed
            shield_cut_rate=float(info["shield_cut"].double().mean()),  # ... lowering tier, top-k or blocks
            **extra,
        ))
    return rows


# episode info per record of episode_records: measured values, and 0/1 flags
EPISODE_RECORD_VALUES = ("latency_ms", "controller_ms", "elapsed_ms", "accuracy", "shield_risk", "shield_price")
EPISODE_RECORD_FLAGS = ("violation", "shielded", "shield_cut")


def episode_records(env, name: str, episodes, sample_index: torch.Tensor, budgets: Sequence[float]) -> list[dict]:
    """One record per episode of env policy `name` (terminal steps ordered budget-major (budget, sample),
    as episode_rows reads them): its budget, the sample's position in the run (`round`: the runs are
    interleaved one round per test sample, so rounds are time order), sample index and family, the plan
    that ran (the shield's, when it changed the policy's), EPISODE_RECORD_VALUES and EPISODE_RECORD_FLAGS:
    what a reader needs to see when, where and for whom a policy exceeded its budgets."""
    s = _samples_per_budget(episodes, sample_index, budgets)
    families = families_of(env.samples, sample_index.tolist())
    knobs = env.knob_space.head_values
    info = episodes["episode"]
    plan = {k: info[f"{k}_index"].reshape(-1).long().tolist() for k in knobs}
    values = {k: info[k].reshape(-1).tolist() for k in EPISODE_RECORD_VALUES}
    flags = {k: info[k].reshape(-1).long().tolist() for k in EPISODE_RECORD_FLAGS}
    records = []
    for e in range(episodes.shape[0]):
        b_i, r = divmod(e, s)
        records.append({"policy": name, "budget_ms": float(budgets[b_i]), "round": r,
                        "sample_index": int(sample_index[r]), "family": None if families is None else families[r],
                        **{k: knobs[k][plan[k][e]] for k in knobs},
                        **{k: values[k][e] for k in EPISODE_RECORD_VALUES},
                        **{k: flags[k][e] for k in EPISODE_RECORD_FLAGS}})
    return records


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
