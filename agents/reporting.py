"""Reporting of a budget sweep: eval.json, eval.csv, eval.md (the tables a reader takes in: accuracy
and violations per policy and budget, each controller's knob choices per question family) and the
figures (accuracy, latency and violation rate vs budget; each controller's knob choices vs budget),
from the rows of agents.budget_sweep."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping, Sequence

from envs.budget_env import ACTION_HEADS
from envs.files import atomic_writer, write_json

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


# --------------------------------------------------------------------------- outputs
def flat_row(row: Mapping) -> dict:
    """A row for CSV: nested per-family accuracy and knob choices become columns."""
    flat = {k: v for k, v in row.items() if not isinstance(v, Mapping)}
    for fam, v in (row.get("accuracy_by_family") or {}).items():
        flat[f"accuracy_family_{fam}"] = v
    for fam, v in (row.get("violation_rate_by_family") or {}).items():
        flat[f"violation_family_{fam}"] = v
    for fam, v in (row.get("family_choice") or {}).items():
        flat[f"config_family_{fam}"] = v
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


def write_outputs(rows: Sequence[Mapping], meta: Mapping, output_dir: str | Path,
                  rows_outside_training_range: Sequence[Mapping] = ()) -> dict[str, Path]:
    """eval.json, eval.csv and the PNG plots of `rows` in output_dir, and the rows of budgets outside
    the training range apart (eval.json's rows_outside_training_range, eval_outside_range.csv);
    returns the paths written."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "csv": out / "eval.csv", "markdown": out / "eval.md"}
    write_json(paths["json"], {"rows": list(rows), "rows_outside_training_range": list(rows_outside_training_range),
                               "meta": dict(meta)})
    write_csv(rows, paths["csv"])
    with atomic_writer(paths["markdown"], "w") as fh:
        fh.write(markdown_tables(rows, meta.get("paired_differences"), meta.get("budget_feasibility"),
                                 {name: r["budgets_outside"] for name, r in meta.get("controller_trained_ranges", {}).items()}))
    if rows_outside_training_range:
        paths["csv_outside_range"] = out / "eval_outside_range.csv"
        write_csv(rows_outside_training_range, paths["csv_outside_range"])
    if not rows:
        return paths
    figures = [(key, PLOTS[key], fig) for key, fig in (
        ("accuracy", accuracy_vs_budget_figure(rows)),
        ("latency", latency_vs_budget_figure(rows)),
        ("violation", violation_vs_budget_figure(rows)),
    )]
    controllers = sorted({r["policy"] for r in rows if is_controller(r["policy"])})
    figures += [("knobs" if c == "controller" else f"knobs:{c}", knob_plot_name(c), knob_choices_figure(rows, c))
                for c in controllers]
    for key, name, fig in figures:
        paths[key] = out / name
        fig.savefig(paths[key], dpi=110)
    return paths


def markdown_tables(rows: Sequence[Mapping], paired: Mapping[str, Mapping] | None = None,
                    feasibility: Sequence[Mapping] | None = None,
                    extrapolated: Mapping[str, Sequence[float]] | None = None) -> str:
    """Accuracy (violation rate) per budget and policy, with the mean over budgets, a column of the
    controllers' mean +- standard deviation when there are several, and the budgets that no measured
    static configuration met on 95% of the samples (budget_sweep.budget_feasibility) named under it,
    with a mean over the others; each controller group against lookup-calibrated over the feasible
    budgets (_headroom_table), and again over those inside the range each of its checkpoints trained at
    when `extrapolated` ({controller: the budgets it read outside that range}) names some: the issue reports
    extrapolation apart; their shields' predicted violation rates against the measured ones
    (_risk_table); the paired differences; then per controller its knob choices by
    question family (modal tier, mean top-k, mean blocks: accuracy) where rows have them."""
    import statistics

    by_policy = _by_policy(rows)
    if not by_policy:
        return ""
    budgets = sorted({r["budget_ms"] for r in rows})
    controllers = [p for p in by_policy if is_controller(p)]
    others = [p for p in by_policy if not is_controller(p) and not p.startswith("static:")]
    cell = {(r["policy"], r["budget_ms"]): r for r in rows}
    spread = {g: members for g, members in controller_groups(controllers).items() if len(members) >= 2}

    def cell_text(policies, chosen) -> str:
        """Each policy's accuracy and violation rate averaged over the chosen budgets; over several
        policies their mean +- standard deviation."""
        per = [[cell[p, b] for b in chosen if (p, b) in cell] for p in policies]
        acc = [statistics.fmean(r["accuracy_mean"] for r in rs) for rs in per if rs]
        viol = [100 * statistics.fmean(r["violation_rate"] for r in rs) for rs in per if rs]
        if len(acc) < 2:
            return f"{acc[0]:.3f} ({viol[0]:.1f}%)" if acc else ""
        return (f"{statistics.fmean(acc):.3f} +- {statistics.stdev(acc):.3f} "
                f"({statistics.fmean(viol):.1f}% +- {statistics.stdev(viol):.1f})")

    infeasible = {f["budget_ms"] for f in feasibility or () if not f["feasible"]}
    feasible = [b for b in budgets if b not in infeasible]
    means = {"**mean**": budgets}
    if feasible and len(feasible) < len(budgets):
        means[f"**mean, {len(feasible)} feasible budgets**"] = feasible
    columns = [f"{g} ({len(members)}), mean +- std" for g, members in spread.items()] + controllers + others
    lines = ["| budget (ms) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, chosen in [*((f"{b:.1f}", [b]) for b in budgets), *means.items()]:
        cells = ([cell_text(members, chosen) for members in spread.values()]
                 + [cell_text([p], chosen) for p in controllers + others])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    out = ["## Accuracy (violation rate) per budget", "", *lines, ""]
    for f in feasibility or ():
        if not f["feasible"] and f["budget_ms"] in budgets:
            out += [f"At {f['budget_ms']:.1f} ms no measured static configuration stayed within the budget on "
                    f"95% of the samples (the least violating, {f['least_violating_config']}, exceeded it on "
                    f"{100 * f['violation_rate']:.1f}%): no policy can hold 5% violations there on this machine "
                    f"in this run.", ""]
    groups = controller_groups(controllers)
    out += _headroom_table(cell, groups, feasible, len(budgets))
    for name, members in groups.items():
        outside = {b for p in members for b in (extrapolated or {}).get(p, ())}
        if outside & set(feasible):
            inside = [b for b in feasible if b not in outside]
            out += [f"{name}: {', '.join(f'{b:.1f}' for b in sorted(outside))} ms lay outside the range some of its "
                    f"checkpoints trained at (they extrapolate there).", ""]
            out += _headroom_table(cell, {name: members}, inside, len(budgets),
                                   f"the {len(inside)} feasible budgets inside the range each of its checkpoints "
                                   f"trained at ({name})")
    out += _risk_table(cell, groups, budgets)
    out += _paired_table(paired_comparisons(rows, controllers) if paired is None else paired)
    for policy in controllers:
        rs = [r for r in by_policy[policy] if r.get("choices_by_family")]
        if not rs:
            continue
        families = sorted(rs[0]["choices_by_family"])
        out += [f"## {policy}: knob choices by question family (modal tier, mean top-k, mean blocks: accuracy)", "",
                "| budget (ms) | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
        for r in rs:
            out.append(f"| {r['budget_ms']:.1f} | " + " | ".join(
                _family_knobs(r["choices_by_family"][f], r["accuracy_by_family"][f]) for f in families) + " |")
        out.append("")
    return "\n".join(out)


def _headroom_table(cell: Mapping[tuple, Mapping], groups: Mapping[str, Sequence[str]], feasible: Sequence[float],
                    num_budgets: int, where: str | None = None) -> list[str]:
    """Markdown lines of each controller group against lookup-calibrated over the feasible budgets (the
    bar a controller is held to: what it gains over the best static configuration that fitted each
    budget on the calibration, as a share of the family oracle's gain, and its violations): the gain
    as mean +- standard deviation over the group's checkpoints, the worst budget of the group's mean,
    the largest violation rate of any checkpoint at a budget and each checkpoint's mean violation rate.
    Empty without lookup-calibrated and the family oracle at every feasible budget. `where` names the
    budgets read (default: every budget, or the feasible ones)."""
    import statistics

    base, oracle = "lookup-calibrated", "family-oracle"
    if not feasible or not groups or not all((p, b) in cell for p in (base, oracle) for b in feasible):
        return []

    def mean(policy: str, key: str) -> float:
        return statistics.fmean(cell[policy, b][key] for b in feasible)

    base_accuracy = mean(base, "accuracy_mean")
    headroom = 100 * (mean(oracle, "accuracy_mean") - base_accuracy)
    if where is None:
        where = "every budget" if len(feasible) == num_budgets else f"the {len(feasible)} feasible budgets"
    lines = [f"## Against {base} over {where}", "",
             f"Headroom ({oracle} − {base}): {headroom:+.1f} points; {base} violated "
             f"{100 * mean(base, 'violation_rate'):.2f}% of them, "
             f"{oracle} {100 * mean(oracle, 'violation_rate'):.2f}%.", "",
             f"| controllers | accuracy − {base} (points), mean +- std | share of the headroom "
             f"| worst budget (points) | largest violation rate at a budget | mean violation rate (each checkpoint) |",
             "|---" * 6 + "|"]
    for name, members in groups.items():
        if not all((p, b) in cell for p in members for b in feasible):
            continue
        gains = [100 * (mean(p, "accuracy_mean") - base_accuracy) for p in members]
        spread = f" +- {statistics.stdev(gains):.1f}" if len(gains) > 1 else ""
        share = f"{statistics.fmean(gains) / headroom:.0%}" if headroom > 0 else "no headroom"
        worst = min((100 * (statistics.fmean(cell[p, b]["accuracy_mean"] for p in members)
                            - cell[base, b]["accuracy_mean"]), b) for b in feasible)
        largest = max((100 * cell[p, b]["violation_rate"], b) for p in members for b in feasible)
        violations = [100 * mean(p, "violation_rate") for p in members]
        lines.append(f"| {name} ({len(members)}) | {statistics.fmean(gains):+.1f}{spread} | {share} | "
                     f"{worst[0]:+.1f} ({worst[1]:.1f} ms) | {largest[0]:.1f}% ({largest[1]:.1f} ms) | "
                     f"{statistics.fmean(violations):.2f}% ({' / '.join(f'{v:.2f}' for v in violations)}) |")
    return [*lines, ""]


def _risk_table(cell: Mapping[tuple, Mapping], groups: Mapping[str, Sequence[str]], budgets: Sequence[float]) -> list[str]:
    """Markdown lines of each controller group's violation rate as its value shield predicted it for the
    plans that ran (the rows' shield_risk_mean) and as measured, per budget and over all, averaged over
    the group's checkpoints: how far the shield's risk model was off. Empty without a value shield."""
    import statistics

    groups = {g: m for g, m in groups.items() if all("shield_risk_mean" in cell.get((p, b), {}) for p in m for b in budgets)}
    if not groups:
        return []

    def rates(members, chosen) -> str:
        predicted, measured = (100 * statistics.fmean(cell[p, b][k] for p in members for b in chosen)
                               for k in ("shield_risk_mean", "violation_rate"))
        return f"{predicted:.2f}% / {measured:.2f}%"

    lines = ["## The latency shield's predicted violation rate against the measured one (predicted / measured)", "",
             "| budget (ms) | " + " | ".join(f"{g} ({len(m)})" for g, m in groups.items()) + " |",
             "|---" * (len(groups) + 1) + "|"]
    for label, chosen in [*((f"{b:.1f}", [b]) for b in budgets), ("**mean**", budgets)]:
        lines.append(f"| {label} | " + " | ".join(rates(m, chosen) for m in groups.values()) + " |")
    return [*lines, ""]


def _paired_table(paired: Mapping[str, Mapping]) -> list[str]:
    """Markdown lines of the paired differences (paired_comparisons) against lookup-calibrated when it ran,
    and between the controller groups: mean over budgets +- its standard error over samples."""
    base = "lookup-calibrated"
    against = {name[: -len(f" - {base}")]: d for name, d in paired.items()
               if name.endswith(f" - {base}") and not name.startswith("static:")}  # as the accuracy table

    def line(label: str, d: Mapping) -> str:
        return (f"| {label} | {100 * d['accuracy']['mean']:+.1f} +- {100 * d['accuracy']['se']:.1f} | "
                f"{100 * d['violation']['mean']:+.1f} +- {100 * d['violation']['se']:.1f} |")

    lines = []
    if against:
        lines += [f"## Minus {base}, paired on the same samples and budgets (mean over budgets +- standard error "
                  f"over samples)", "", "| policy | accuracy (points) | violation rate (points) |", "|---|---|---|",
                  *(line(f"{name} (mean of the seeds)" if name.startswith("controllers") else name, d)
                    for name, d in against.items()), ""]
    between = (("controllers@", "the evaluation settings of the same checkpoints"),
               ("controllers[", "the training configs (each group its seeds)"))
    for prefix, what in between:
        pairs = {name: d for name, d in paired.items() if name.startswith(prefix) and f" - {prefix}" in name}
        if pairs:
            lines += [f"## Between {what} (paired, mean over budgets +- standard error over samples)", "",
                      "| settings | accuracy (points) | violation rate (points) |", "|---|---|---|",
                      *(line(name, d) for name, d in pairs.items()), ""]
    return lines


def _family_knobs(choices: Mapping[str, Mapping[str, float]], accuracy: float) -> str:
    tier, share = max(choices["tier"].items(), key=lambda kv: kv[1])
    k = sum(int(v) * f for v, f in choices["top_k"].items())
    n = sum(int(v) * f for v, f in choices["num_blocks"].items())
    return f"{tier}{'' if share > 0.995 else f' ({share:.0%})'}, k {k:.1f}, N {n:.1f}: {accuracy:.2f}"


# --------------------------------------------------------------------------- plots
def is_controller(policy: str) -> bool:
    """A trained controller's rows: "controller", or controller:<run> when several are evaluated
    (controller:<run>@<variant> behind one of several evaluation settings)."""
    return policy == "controller" or policy.startswith("controller:")


def knob_plot_name(policy: str) -> str:
    """controller_knobs_vs_budget.png, or controller_knobs_vs_budget_<run>.png for controller:<run>."""
    if policy == "controller":
        return PLOTS["knobs"]
    run = "".join(c if c.isalnum() or c in "-_." else "_" for c in policy.split(":", 1)[1])
    return f"controller_knobs_vs_budget_{run}.png"


def _by_policy(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(r["policy"], []).append(r)
    return {p: sorted(rs, key=lambda r: r["budget_ms"]) for p, rs in groups.items()}


def _style(policy: str) -> dict:
    if is_controller(policy):
        return {"linewidth": 2.4, "marker": "o", "zorder": 5}
    if policy in ("oracle", "family-oracle"):
        return {"linewidth": 1.6, "marker": "^" if policy == "oracle" else "v", "linestyle": "--"}
    if policy.startswith("static:"):
        return {"linewidth": 1.0, "marker": ".", "alpha": 0.7, "linestyle": ":"}
    return {"linewidth": 1.5, "marker": "s", "markersize": 4}


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure  # no pyplot: no global state, works under any backend

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _metric_figure(rows, key: str, ylabel: str, title: str):
    """One line per policy; a group of several controllers evaluated alike (controller_groups: seeds)
    is one line of their mean (controller_spread), each seed thin in its colour, so that six seeds stay
    readable. key: one of SPREAD_METRICS."""
    fig, ax = _figure()
    by = _by_policy(rows)
    controllers = [p for p in by if is_controller(p)]
    groups = {g: m for g, m in controller_groups(controllers).items() if len(m) >= 2}
    spread = controller_spread(rows, controllers) or []
    for group, members in groups.items():
        mean = sorted((r["budget_ms"], r[key]) for r in spread if r["group"] == group)
        (line,) = ax.plot(*zip(*mean), label=f"{group} (mean of {len(members)})", **_style(members[0]))
        for p in members:
            ax.plot([r["budget_ms"] for r in by[p]], [r[key] for r in by[p]], color=line.get_color(),
                    linewidth=0.8, alpha=0.35)
    grouped = {p for members in groups.values() for p in members}
    for policy, rs in by.items():
        if policy not in grouped:
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


# --------------------------------------------------------------------------- seeds and spread
SPREAD_METRICS = ("accuracy_mean", "violation_rate")


def paired_comparisons(rows: Sequence[Mapping], controllers: Sequence[str]) -> dict[str, dict]:
    """Paired differences (paired_difference) over the budgets in the training range, each named
    "<policies> - <baseline>": every controller, each group of several (controller_groups, averaged
    per episode) and every other policy against lookup-calibrated; the controllers against the family
    oracle; each variant group against the first (the same checkpoints behind two settings), and each
    training config's group against the first. Empty without per-sample rows of a baseline."""
    inside = [r for r in rows if r.get("in_training_range", True) and "per_sample" in r]
    present = {r["policy"] for r in inside}
    groups = {name: [name] for name in controllers if name in present}
    grouped = controller_groups(list(groups))
    groups.update({g: members for g, members in grouped.items() if len(members) > 1})
    others = {p: [p] for p in sorted(present - set(controllers) - {"lookup-calibrated"})}
    out = {}
    for baseline, compared in (("lookup-calibrated", {**groups, **others}), ("family-oracle", groups)):
        if baseline in present:
            out.update({f"{name} - {baseline}": paired_difference(inside, policies, baseline)
                        for name, policies in compared.items()})
    variants = [g for g in grouped if "@" in g]
    trainings = [g for g in grouped if g.startswith("controllers[") and "@" not in g]
    for alike in (variants, trainings):
        for name in alike[1:]:
            out[f"{name} - {alike[0]}"] = paired_difference(inside, grouped[name], grouped[alike[0]])
    return out


def controller_groups(controllers: Sequence[str]) -> dict[str, list[str]]:
    """The controller policies evaluated alike, in order: "controllers" for plain ones (e.g. the seeds
    of one training config), "controllers[<settings>]" for controller:<run>[<settings>] (the seeds of
    one of several training configs, evaluate.py's config_labels), and "@<variant>" after either for
    controller:<run>...@<variant> (the checkpoints run behind one evaluation setting, e.g. evaluate.py's
    shield quantile q0.95)."""
    groups: dict[str, list[str]] = {}
    for name in controllers:
        run, _, variant = name.partition("@")
        settings = run[run.index("["):] if run.endswith("]") and "[" in run else ""
        groups.setdefault(f"controllers{settings}" + (f"@{variant}" if variant else ""), []).append(name)
    return groups


def controller_spread(rows, controllers: list[str]) -> list[dict] | None:
    """Per group of several controller policies (seeds; controller_groups): mean and
    standard deviation over them of accuracy and violation rate per budget (seed_spread),
    each row naming its group; None without such a group."""
    groups = {g: members for g, members in controller_groups(controllers).items() if len(members) >= 2}
    if not groups:
        return None
    spread = seed_spread({g: [{"rows": [{**r, "policy": "controller"} for r in rows if r["policy"] == name]}
                              for name in members] for g, members in groups.items()})
    return [{"group": g, **row} for g, group_rows in spread.items() for row in group_rows]


def paired_difference(rows: Sequence[Mapping], policies: Sequence[str], baseline: str | Sequence[str]) -> dict:
    """Accuracy and violation rate of `policies` (averaged over them per episode, e.g. one
    configuration's seeds) minus `baseline`'s (one policy, or several averaged alike), on the same
    samples at the same budgets (rows' `per_sample` values, in the run's sample order): per budget and
    over all budgets, the mean difference and its standard error over the samples. Over all budgets
    each sample's differences are averaged first: one sample's episodes at several budgets are not
    independent."""
    import statistics

    bases = [baseline] if isinstance(baseline, str) else list(baseline)
    cell = {(r["policy"], r["budget_ms"]): r["per_sample"] for r in rows if "per_sample" in r}
    budgets = sorted(b for p, b in cell if p == bases[0])
    missing = [p for p in [*policies, *bases] if not all((p, b) in cell for b in budgets)]
    if not budgets or missing:
        raise ValueError(f"paired_difference: no per-sample rows of {missing or bases} at every budget "
                         f"of {bases[0]!r}")

    def mean_se(values: list[float]) -> dict:
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
        return {"mean": statistics.fmean(values), "se": se}

    out = {"policies": list(policies), "baseline": baseline, "per_budget": [], "num_samples": None}
    per_sample = {}
    for b in budgets:
        n = len(cell[bases[0], b]["accuracy"])
        if any(len(cell[p, b]["accuracy"]) != n for p in [*policies, *bases]):
            raise ValueError(f"paired_difference: {policies} and {baseline!r} ran different samples at {b} ms")
        entry = {"budget_ms": b}
        for m in ("accuracy", "violation"):
            d = [statistics.fmean(cell[p, b][m][i] for p in policies)
                 - statistics.fmean(cell[p, b][m][i] for p in bases) for i in range(n)]
            entry[m] = mean_se(d)
            per_sample.setdefault(m, []).append(d)
        out["per_budget"].append(entry)
        out["num_samples"] = n
    for m, by_budget in per_sample.items():
        out[m] = mean_se([statistics.fmean(col) for col in zip(*by_budget)])
    return out


def seed_spread(groups: Mapping[str, Sequence[Mapping]], reference: str | None = None,
                policy: str = "controller") -> dict:
    """Mean and standard deviation over seeds of each group's eval.json rows, per (policy, budget).

    groups: group name (e.g. a stage2_inputs option) -> the eval.json objects of its seeds, which
    must share their budgets. With `reference`, each other group's `policy` rows also get the
    difference of means to the reference group and whether it is a tie (|difference| <= the larger
    of the two standard deviations).
    """
    import statistics

    if not groups or any(len(evals) == 0 for evals in groups.values()):
        raise ValueError("seed_spread: every group needs at least one eval.json")
    out = {}
    for name, evals in groups.items():
        cells: dict[tuple, list[Mapping]] = {}
        budgets = None
        for e in evals:
            these = sorted({r["budget_ms"] for r in e["rows"]})
            if budgets is not None and these != budgets:
                raise ValueError(f"group {name!r}: evaluations at different budgets ({budgets} vs {these}); "
                                 f"evaluate every seed at the same --budgets")
            budgets = these
            for r in e["rows"]:
                cells.setdefault((r["policy"], r["budget_ms"]), []).append(r)
        rows = []
        for (pol, budget), rs in sorted(cells.items()):
            row = {"policy": pol, "budget_ms": budget, "num_seeds": len(rs)}
            for m in SPREAD_METRICS:
                values = [float(r[m]) for r in rs]
                row[m] = statistics.fmean(values)
                row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(row)
        out[name] = rows
    if reference is not None:
        if reference not in out:
            raise ValueError(f"reference group {reference!r} is not one of {sorted(out)}")
        ref = {(r["policy"], r["budget_ms"]): r for r in out[reference]}
        for name, rows in out.items():
            for row in rows:
                base = ref.get((row["policy"], row["budget_ms"]))
                if name == reference or row["policy"] != policy or base is None:
                    continue
                for m in SPREAD_METRICS:
                    diff = row[m] - base[m]
                    row[f"{m}_minus_{reference}"] = diff
                    row[f"{m}_tie_with_{reference}"] = abs(diff) <= max(row[f"{m}_std"], base[f"{m}_std"])
    return out
