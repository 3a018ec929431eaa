"""agents.reporting.markdown_tables: eval.md's tables from budget-sweep rows; paired differences."""
import statistics

import pytest

from agents.reporting import (accuracy_vs_budget_figure, controller_groups, markdown_tables, paired_comparisons,
                              paired_difference)


def _row(policy, budget, acc, viol, families=None):
    row = {"policy": policy, "budget_ms": budget, "accuracy_mean": acc, "violation_rate": viol}
    if families:
        row["accuracy_by_family"] = {f: a for f, (a, _) in families.items()}
        row["choices_by_family"] = {f: c for f, (_, c) in families.items()}
    return row


def _choices(tier, k, n):
    return {"tier": tier, "insertion": {"1": 1.0}, "top_k": k, "num_blocks": n}


def test_accuracy_table_has_a_spread_column_and_a_mean_row():
    rows = [_row("controller:a", 10.0, 0.6, 0.0), _row("controller:a", 20.0, 0.8, 0.1),
            _row("controller:b", 10.0, 0.4, 0.1), _row("controller:b", 20.0, 0.8, 0.1),
            _row("lookup-calibrated", 10.0, 0.5, 0.02), _row("lookup-calibrated", 20.0, 0.7, 0.0),
            _row("static:low,4,12", 10.0, 0.1, 0.0)]
    lines = markdown_tables(rows).splitlines()
    assert lines[2] == ("| budget (ms) | controllers (2), mean +- std | controller:a | controller:b | "
                        "lookup-calibrated |")
    assert lines[4] == "| 10.0 | 0.500 +- 0.141 (5.0% +- 7.1) | 0.600 (0.0%) | 0.400 (10.0%) | 0.500 (2.0%) |"
    # the mean row averages each policy over the budgets, then the spread over the controllers
    assert lines[6] == "| **mean** | 0.650 +- 0.071 (7.5% +- 3.5) | 0.700 (5.0%) | 0.600 (10.0%) | 0.600 (1.0%) |"
    assert "static" not in "\n".join(lines)


def test_family_table_gives_modal_tier_mean_knobs_and_accuracy():
    fam = {"coarse": (1.0, _choices({"low": 1.0, "high": 0.0}, {"4": 1.0, "8": 0.0}, {"12": 0.5, "16": 0.5})),
           "detail": (0.25, _choices({"low": 0.4, "high": 0.6}, {"4": 0.5, "8": 0.5}, {"12": 0.0, "16": 1.0}))}
    text = markdown_tables([_row("controller", 30.0, 0.6, 0.0, fam)])
    assert "| budget (ms) | coarse | detail |" in text
    assert "| 30.0 | low, k 4.0, N 14.0: 1.00 | high (60%), k 6.0, N 16.0: 0.25 |" in text


def _paired_row(policy, budget, accuracy, violation):
    return {"policy": policy, "budget_ms": budget, "accuracy_mean": sum(accuracy) / len(accuracy),
            "violation_rate": sum(violation) / len(violation),
            "per_sample": {"accuracy": list(accuracy), "violation": list(violation)}}


def test_paired_difference_averages_each_sample_over_budgets_and_the_seeds():
    rows = [_paired_row("controller:a", 10.0, [1, 1, 0, 0], [0, 0, 0, 1]),
            _paired_row("controller:a", 20.0, [1, 1, 1, 0], [0, 0, 0, 0]),
            _paired_row("controller:b", 10.0, [1, 0, 0, 0], [0, 0, 0, 0]),
            _paired_row("controller:b", 20.0, [1, 1, 1, 1], [0, 0, 0, 0]),
            _paired_row("lookup-calibrated", 10.0, [1, 0, 1, 0], [0, 0, 0, 0]),
            _paired_row("lookup-calibrated", 20.0, [1, 1, 0, 0], [0, 1, 0, 0])]
    d = paired_difference(rows, ["controller:a", "controller:b"], "lookup-calibrated")
    # per sample, seeds averaged: at 10 ms (0, +0.5, -1, 0), at 20 ms (0, 0, +1, +0.5)
    ten, twenty = d["per_budget"]
    assert ten["accuracy"]["mean"] == pytest.approx(-0.125) and twenty["accuracy"]["mean"] == pytest.approx(0.375)
    # over budgets, per sample first: (0, 0.25, 0, 0.25): mean 0.125, se = sd / 2 = 0.1443 / 2
    assert d["accuracy"]["mean"] == pytest.approx(0.125)
    assert d["accuracy"]["se"] == pytest.approx(statistics.stdev([0, 0.25, 0, 0.25]) / 2)
    assert d["violation"]["mean"] == pytest.approx((0.125 - 0.25) / 2) and d["num_samples"] == 4
    table = markdown_tables(rows)
    assert "| controllers (mean of the seeds) | +12.5 +- 7.2 | -6.2 +- 15.7 |" in table
    with pytest.raises(ValueError, match="no per-sample rows of \\['random'\\]"):
        paired_difference(rows, ["random"], "lookup-calibrated")


def _two_groups_rows(names):
    """Rows at one budget of two groups of two checkpoints, names[0::2] and names[1::2], whose per-sample
    difference (second group's mean minus the first's) is (0.5, 1, 0.5, 0), and lookup-calibrated."""
    return [_paired_row(names[0], 10.0, [1, 0, 0, 0], [0, 0, 0, 0]),
            _paired_row(names[1], 10.0, [1, 1, 0, 0], [0, 0, 0, 1]),
            _paired_row(names[2], 10.0, [0, 0, 0, 0], [0, 0, 0, 0]),
            _paired_row(names[3], 10.0, [1, 1, 1, 0], [0, 0, 0, 0]),
            _paired_row("lookup-calibrated", 10.0, [1, 1, 0, 0], [0, 0, 0, 0])]


def test_controllers_behind_two_settings_are_grouped_and_compared_paired():
    names = ["controller:a@q0.98", "controller:a@q0.95", "controller:b@q0.98", "controller:b@q0.95"]
    assert controller_groups([*names, "controller:c"]) == {
        "controllers@q0.98": [names[0], names[2]], "controllers@q0.95": [names[1], names[3]],
        "controllers": ["controller:c"]}
    rows = _two_groups_rows(names)
    paired = paired_comparisons(rows, names)
    # per sample, q0.95's two checkpoints averaged minus q0.98's: (0.5, 1, 0.5, 0)
    between = paired["controllers@q0.95 - controllers@q0.98"]
    assert between["accuracy"]["mean"] == pytest.approx(0.5)
    assert between["accuracy"]["se"] == pytest.approx(statistics.stdev([0.5, 1, 0.5, 0]) / 2)
    assert between["violation"]["mean"] == pytest.approx(0.125)
    assert paired["controllers@q0.98 - lookup-calibrated"]["accuracy"]["mean"] == pytest.approx(-0.375)
    assert "controllers - lookup-calibrated" not in paired  # no plain group of several
    table = markdown_tables(rows)
    assert "| budget (ms) | controllers@q0.98 (2), mean +- std | controllers@q0.95 (2), mean +- std |" in table
    assert "| controllers@q0.95 - controllers@q0.98 | +50.0 +- 20.4 | +12.5 +- 12.5 |" in table
    assert "| controllers@q0.95 (mean of the seeds) | +12.5 +- 12.5 | +12.5 +- 12.5 |" in table
    # the accuracy figure draws each group as the mean of its checkpoints, the checkpoints unlabelled
    ax = accuracy_vs_budget_figure(rows).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["controllers@q0.98 (mean of 2)", "controllers@q0.95 (mean of 2)", "lookup-calibrated"]
    means = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert means["controllers@q0.95 (mean of 2)"] == pytest.approx([0.625])  # (0.5 + 0.75) / 2
    assert len(ax.get_lines()) == 2 + 4 + 1


def test_the_seeds_of_two_training_configs_are_grouped_per_config_and_compared_paired():
    a, b = "[policy.latency_shield_violation_target=0.02]", "[policy.latency_shield_violation_target=0.015]"
    names = [f"controller:nat_s42{a}", f"controller:t15_s42{b}", f"controller:nat_s43{a}", f"controller:t15_s43{b}"]
    assert controller_groups([*names, f"controller:t15_s44{b}@v0.01"]) == {
        f"controllers{a}": [names[0], names[2]], f"controllers{b}": [names[1], names[3]],
        f"controllers{b}@v0.01": [f"controller:t15_s44{b}@v0.01"]}
    rows = _two_groups_rows(names)
    paired = paired_comparisons(rows, names)
    # per sample, the second config's two seeds averaged minus the first's: (0.5, 1, 0.5, 0)
    between = paired[f"controllers{b} - controllers{a}"]
    assert between["accuracy"]["mean"] == pytest.approx(0.5) and between["violation"]["mean"] == pytest.approx(0.125)
    table = markdown_tables(rows)
    assert f"| budget (ms) | controllers{a} (2), mean +- std | controllers{b} (2), mean +- std |" in table
    assert "## Between the training configs (each group its seeds)" in table
    assert f"| controllers{b} - controllers{a} | +50.0 +- 20.4 | +12.5 +- 12.5 |" in table
    # without lookup-calibrated in the run, the configs are still paired
    alone = markdown_tables(rows[:4])
    assert "## Minus lookup-calibrated" not in alone and f"| controllers{b} - controllers{a} | +50.0" in alone


def test_the_shields_predicted_violation_rate_is_held_against_the_measured_one():
    rows = [{**_row("controller:a", 10.0, 0.5, 0.04), "shield_risk_mean": 0.02},
            {**_row("controller:a", 20.0, 0.8, 0.01), "shield_risk_mean": 0.01},
            {**_row("controller:b", 10.0, 0.5, 0.02), "shield_risk_mean": 0.03},
            {**_row("controller:b", 20.0, 0.8, 0.00), "shield_risk_mean": 0.02},
            _row("random", 10.0, 0.3, 0.5), _row("random", 20.0, 0.3, 0.4)]
    table = markdown_tables(rows)
    assert "| budget (ms) | controllers (2) |" in table
    assert "| 10.0 | 2.50% / 3.00% |" in table and "| 20.0 | 1.50% / 0.50% |" in table
    assert "| **mean** | 2.00% / 1.75% |" in table
    # no value shield, no table
    assert "predicted violation rate" not in markdown_tables([_row("controller", 10.0, 0.5, 0.04)])


def test_budgets_no_configuration_met_are_named_under_the_table():
    rows = [_row("controller", 10.0, 0.5, 0.2), _row("controller", 20.0, 0.8, 0.01)]
    feasibility = [{"budget_ms": 10.0, "least_violating_config": "low,4,12", "violation_rate": 0.123, "feasible": False},
                   {"budget_ms": 20.0, "least_violating_config": "low,4,12", "violation_rate": 0.0, "feasible": True}]
    text = markdown_tables(rows, feasibility=feasibility)
    assert ("At 10.0 ms no measured static configuration stayed within the budget on 95% of the samples (the "
            "least violating, low,4,12, exceeded it on 12.3%)") in text
    assert "At 20.0 ms" not in text and "At 10.0" not in markdown_tables(rows)


def _bar_rows():
    """Two controllers, lookup-calibrated and the family oracle at 10, 20 and 30 ms."""
    return [_row("controller:a", 10.0, 0.5, 0.30), _row("controller:a", 20.0, 0.8, 0.01),
            _row("controller:a", 30.0, 0.9, 0.03),
            _row("controller:b", 10.0, 0.5, 0.20), _row("controller:b", 20.0, 0.7, 0.05),
            _row("controller:b", 30.0, 0.9, 0.01),
            _row("lookup-calibrated", 10.0, 0.6, 0.10), _row("lookup-calibrated", 20.0, 0.7, 0.02),
            _row("lookup-calibrated", 30.0, 0.8, 0.04),
            _row("family-oracle", 10.0, 0.6, 0.10), _row("family-oracle", 20.0, 0.8, 0.02),
            _row("family-oracle", 30.0, 0.8, 0.00)]


def test_controllers_are_held_against_lookup_calibrated_over_the_feasible_budgets():
    rows = _bar_rows()
    feasibility = [{"budget_ms": 10.0, "least_violating_config": "low,4,12", "violation_rate": 0.1, "feasible": False},
                   *({"budget_ms": b, "least_violating_config": "low,4,12", "violation_rate": 0.0, "feasible": True}
                     for b in (20.0, 30.0))]
    text = markdown_tables(rows, feasibility=feasibility)
    # the 10 ms budget no configuration met is left out of the feasible mean and of the bar
    assert ("| **mean, 2 feasible budgets** | 0.825 +- 0.035 (2.5% +- 0.7) | 0.850 (2.0%) | 0.800 (3.0%) | "
            "0.750 (3.0%) | 0.800 (1.0%) |") in text
    assert "## Against lookup-calibrated over the 2 feasible budgets" in text
    assert ("Headroom (family-oracle − lookup-calibrated): +5.0 points; lookup-calibrated violated 3.00% of them, "
            "family-oracle 1.00%.") in text
    # gains +10 and +5 points over lookup-calibrated: 150% of the headroom; the worst budget is the group
    # mean's (20 ms: 0.75 - 0.70); the largest rate b's 5% at 20 ms; a 2.00%, b 3.00%
    assert ("| controllers (2) | +7.5 +- 3.5 | 150% | +5.0 (20.0 ms) | 5.0% (20.0 ms) | 2.50% (2.00 / 3.00) |") in text
    # every budget feasible: the bar is over all of them; without the family oracle there is no bar
    all_met = feasibility[1:] + [{**feasibility[0], "feasible": True}]
    everywhere = markdown_tables(rows[3:], feasibility=all_met)
    assert "## Against lookup-calibrated over every budget" in everywhere and "feasible budgets**" not in everywhere
    no_oracle = [r for r in rows if r["policy"] != "family-oracle"]
    assert "## Against" not in markdown_tables(no_oracle, feasibility=feasibility)


def test_the_bar_is_read_again_over_the_budgets_inside_every_checkpoints_trained_range():
    # every budget feasible; a read 30 ms outside the range it trained at
    rows = _bar_rows()
    text = markdown_tables(rows, extrapolated={"controller:a": [30.0], "controller:b": []})
    assert "## Against lookup-calibrated over every budget" in text
    assert "controllers: 30.0 ms lay outside the range some of its checkpoints trained at" in text
    inside = text[text.index("## Against lookup-calibrated over the 2 feasible budgets inside"):]
    # over 10 and 20 ms: headroom (0.6 + 0.8 - 0.6 - 0.7) / 2 = +5 points; gains a +0, b -5 points (share -50%);
    # worst budget the group mean's 10 ms (0.5 - 0.6); largest rate a's 30% at 10 ms; a 15.50%, b 12.50%
    assert ("Headroom (family-oracle − lookup-calibrated): +5.0 points; lookup-calibrated violated 6.00% of them, "
            "family-oracle 6.00%.") in inside
    assert "| controllers (2) | -2.5 +- 3.5 | -50% | -10.0 (10.0 ms) | 30.0% (10.0 ms) | 14.00% (15.50 / 12.50) |" in inside
    # no checkpoint outside its range: one reading only
    assert "inside the range" not in markdown_tables(rows, extrapolated={"controller:a": [], "controller:b": []})
