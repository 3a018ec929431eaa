"""Selection rules of the baselines (agents/baselines.py), the sweep library (agents/budget_sweep.py) and its
reporting (agents/reporting.py)."""
import json
import math
from dataclasses import replace

import pytest
import torch

from agents.baselines import (
    LOOKUP_MEAN_FACTOR,
    PolicySpec,
    ProfileEntry,
    RandomPolicy,
    StaticChoice,
    all_static_configs,
    check_profile,
    dummy_closed_form_profile,
    latency_scales_between,
    load_profile,
    lookup_select,
    make_static,
    monotone_latencies,
    smooth_latencies,
    oracle_select,
    parse_policies,
    profile_from_table,
)
from agents.budget_sweep import (
    Calibration,
    ConfigTable,
    budget_feasibility,
    check_budgets,
    configs_needed,
    controller_budget_sweep,
    default_budgets,
    measure_config_table,
    table_policy_rows,
)
from agents.checkpoint import build_actor
from agents.reporting import accuracy_vs_budget_figure
from envs import BudgetVLMEnv, KnobSpace, RewardWeights, compute_reward
from envs.backends.dummy import DummyBackend

KS = KnobSpace()


def entry(tier, k, n, acc, mean, p95):
    return ProfileEntry(StaticChoice(tier, k, n, 1), acc, mean, p95)


# ------------------------------------------------------------------ lookup tables
def test_monotone_latencies_take_the_envelope_of_cheaper_plans_within_a_tier_and_insertion():
    profile = [
        entry("low", 4, 15, 0.9, 30.0, 41.2),
        entry("low", 4, 16, 0.9, 28.0, 34.7),  # measured below a plan with fewer blocks
        entry("low", 5, 12, 0.9, 20.0, 25.0),
        entry("low", 5, 16, 0.9, 29.0, 40.0),  # below (4, 15): raised to it; its mean 30.0 likewise
        entry("medium", 4, 12, 0.9, 50.0, 60.0),  # another tier: untouched by the low tier's values
        ProfileEntry(StaticChoice("low", 4, 16, 2), 0.9, 10.0, 12.0),  # another insertion: its own envelope
    ]
    out = monotone_latencies(profile)
    assert [(e.latency_mean_ms, e.latency_p95_ms) for e in out] == [
        (30.0, 41.2), (30.0, 41.2), (20.0, 25.0), (30.0, 41.2), (50.0, 60.0), (10.0, 12.0)]
    assert [e.config for e in out] == [e.config for e in profile]
    assert [e.accuracy_mean for e in out] == [e.accuracy_mean for e in profile]


def grid_profile(tier, mean_of, p95_of):
    return [entry(tier, k, n, 0.5, mean_of(k, n), p95_of(k, n)) for k in (4, 5, 6, 7, 8) for n in (12, 13, 14, 15, 16)]


def test_smooth_latencies_recover_a_bilinear_surface_and_its_p95_ratio():
    def mean_of(k, n):
        return 20.0 + 3.0 * n - 1.0 * k + 0.2 * k * n
    exact = grid_profile("low", mean_of, lambda k, n: 1.2 * mean_of(k, n))
    out = smooth_latencies(exact)
    assert [e.config for e in out] == [e.config for e in exact]
    assert all(math.isclose(o.latency_mean_ms, e.latency_mean_ms, rel_tol=1e-9) for o, e in zip(out, exact))
    assert all(math.isclose(o.latency_p95_ms, e.latency_p95_ms, rel_tol=1e-9) for o, e in zip(out, exact))


def test_smooth_latencies_undo_a_noisy_p95_that_the_envelope_alone_would_spread():
    def mean_of(k, n):
        return 20.0 + 3.0 * n + 0.2 * k * n
    # One 40-request p95 drawn 20% high (k 4, 13 blocks): the envelope carries it to every larger plan.
    noisy = grid_profile("low", mean_of, lambda k, n: mean_of(k, n) * (1.44 if (k, n) == (4, 13) else 1.2))
    envelope = {e.config.name: e.latency_p95_ms for e in monotone_latencies(noisy)}
    smooth = {e.config.name: e.latency_p95_ms for e in smooth_latencies(noisy)}
    assert envelope["low,4,14"] == pytest.approx(1.44 * mean_of(4, 13))  # above the plan's own 1.2 x 75.2
    assert smooth["low,4,14"] == pytest.approx(1.2 * mean_of(4, 14), rel=0.01)
    assert all(abs(smooth[n] / (1.2 * mean_of(int(n.split(",")[1]), int(n.split(",")[2]))) - 1) < 0.01 for n in smooth)
    table = smooth_latencies(noisy)  # still monotone in top-k and blocks
    assert all(o.latency_p95_ms <= e.latency_p95_ms + 1e-9 for e in table for o in table
               if o.config.top_k <= e.config.top_k and o.config.num_blocks <= e.config.num_blocks)


def test_smooth_latencies_keep_a_group_too_small_to_fit_and_fit_each_tier_alone():
    few = [entry("low", 4, 12, 0.5, 10.0, 12.0), entry("low", 8, 16, 0.5, 20.0, 26.0)]  # 2 plans, 4 coefficients
    def high(k, n):
        return 100.0 + 5.0 * n + 0.5 * k * n
    profile = few + grid_profile("high", high, lambda k, n: 1.1 * high(k, n))
    out = smooth_latencies(profile)
    assert [(e.latency_mean_ms, e.latency_p95_ms) for e in out[:2]] == [(10.0, 12.0), (20.0, 26.0)]
    assert out[2].latency_mean_ms == pytest.approx(high(4, 12))


def test_lookup_mean_uses_the_105_factor_and_p95_uses_the_budget():
    profile = [
        entry("high", 8, 16, 0.9, 104.0, 120.0),  # mean fits only thanks to the 1.05 slack at 100 ms
        entry("medium", 6, 14, 0.7, 90.0, 99.0),
        entry("low", 4, 12, 0.5, 50.0, 60.0),
    ]
    assert LOOKUP_MEAN_FACTOR == 1.05
    assert lookup_select(profile, 100.0, "mean") == (profile[0].config, True)
    assert lookup_select(profile, 99.0, "mean") == (profile[1].config, True)  # 104 > 1.05 * 99 = 103.95
    assert lookup_select(profile, 100.0, "p95") == (profile[1].config, True)
    assert lookup_select(profile, 98.9, "p95") == (profile[2].config, True)
    assert lookup_select(profile, 120.0, "p95") == (profile[0].config, True)


def test_lookup_ties_pick_the_faster_and_nothing_fits_falls_back_to_the_fastest():
    profile = [
        entry("high", 8, 16, 0.8, 95.0, 99.0),
        entry("medium", 8, 16, 0.8, 80.0, 98.0),  # same accuracy: faster mean, and faster p95
        entry("low", 4, 12, 0.5, 70.0, 97.5),
    ]
    assert lookup_select(profile, 100.0, "mean")[0] == profile[1].config
    assert lookup_select(profile, 100.0, "p95")[0] == profile[1].config
    assert lookup_select(profile, 10.0, "mean") == (profile[2].config, False)
    assert lookup_select(profile, 10.0, "p95") == (profile[2].config, False)
    with pytest.raises(ValueError, match="lookup rule 'p50'"):
        lookup_select(profile, 10.0, "p50")


# ------------------------------------------------------------------ oracle
def test_oracle_picks_most_accurate_fitting_ties_faster_none_fits_fastest():
    acc = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.2, 0.9, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0]])
    lat = torch.tensor([[50.0, 40.0, 10.0, 200.0], [10.0, 120.0, 60.0, 90.0], [300.0, 150.0, 400.0, 200.0]])
    col, fits = oracle_select(acc, lat, 100.0)
    # row 0: configs 0 and 1 fit with accuracy 1 -> the faster (1); config 3 is too slow
    # row 1: the 0.9 that fits (3, 90 ms), not the 0.9 at 120 ms; row 2: none fits -> fastest (1)
    assert col.tolist() == [1, 3, 1]
    assert fits.tolist() == [True, True, False]


def test_oracle_never_exceeds_a_budget_that_some_config_meets():
    g = torch.Generator().manual_seed(0)
    acc = (torch.rand(200, 30, generator=g) < 0.5).double()
    lat = torch.rand(200, 30, generator=g) * 200
    for budget in (5.0, 20.0, 80.0, 150.0):
        col, fits = oracle_select(acc, lat, budget)
        rows = torch.arange(200)
        chosen_lat, chosen_acc = lat[rows, col], acc[rows, col]
        fit = lat <= budget
        assert torch.equal(fits, fit.any(1))
        assert bool((chosen_lat[fits] <= budget).all())
        best = torch.where(fit, acc, torch.full_like(acc, -1)).max(1).values
        assert torch.equal(chosen_acc[fits], best[fits])
        # among the equally accurate fitting configs, the fastest
        tied = fit & (acc == best[:, None])
        fastest = torch.where(tied, lat, torch.full_like(lat, math.inf)).min(1).values
        assert torch.equal(chosen_lat[fits], fastest[fits])
        assert torch.equal(chosen_lat[~fits], lat[~fits].min(1).values)


# ------------------------------------------------------------------ parsing
def test_policy_names_and_static_specs():
    specs = parse_policies(["controller", "static:medium,6,14", "oracle", "controller"], KS)
    assert [s.kind for s in specs] == ["controller", "static", "oracle"]
    assert specs[1].config == StaticChoice("medium", 6, 14, 1)
    for spec, message in [
        ("static:low,4", "got 2 comma-separated"),
        ("static:ultra,4,12", "tier 'ultra' is not in the knob space"),
        ("static:low,x,12", "top_k 'x' is not an integer"),
        ("static:low,3,12", "top_k 3 is not in the knob space"),
        ("static:low,4,17", "num_blocks 17 is not in the knob space"),
        ("staticlow,4,12", "expected 'static:<tier>,<top_k>,<num_blocks>'"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_policies([spec], KS)
    with pytest.raises(ValueError, match="unknown policy 'greedy'"):
        parse_policies(["greedy"], KS)


def test_profile_file_checks(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no profile.json"):
        load_profile(tmp_path, KS)
    (tmp_path / "profile.json").write_text(json.dumps({"configs": [{"tier": "low", "top_k": 4, "num_blocks": 12,
                                                                   "accuracy_mean": 0.5, "latency_mean_ms": 10}]}))
    with pytest.raises(ValueError, match=r"configs\[0\] lacks field\(s\) \['latency_p95_ms'\]"):
        load_profile(tmp_path, KS)
    good = {"tier": "low", "top_k": 4, "num_blocks": 12, "accuracy_mean": 0.5, "latency_mean_ms": 10.0,
            "latency_p95_ms": 12.0}
    with pytest.raises(ValueError, match="tier 'xl' is not in the knob space"):
        check_profile({"configs": [{**good, "tier": "xl"}]}, KS, "p.json")
    with pytest.raises(ValueError, match="profiled more than once"):
        check_profile({"configs": [good, good]}, KS, "p.json")
    (tmp_path / "profile.json").write_text(json.dumps({"configs": [good], "budget_range_ms": [5, 50]}))
    entries, other = load_profile(tmp_path, KS)
    assert entries[0].config == StaticChoice("low", 4, 12, 1) and other["budget_range_ms"] == [5, 50]


def test_budget_checks():
    assert default_budgets((50.0, 180.0), 3) == [50.0, 115.0, 180.0]
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="expected a finite latency budget > 0 ms"):
            check_budgets([100.0, bad])


# ------------------------------------------------------------------ profiles and table rows
def test_dummy_closed_form_profile_matches_sampling():
    backend = DummyBackend(num_samples={"train": 8, "val": 16, "test": 8})
    profile = dummy_closed_form_profile(backend, "val")
    assert len(profile) == len(all_static_configs(backend.knob_space)) == 75
    # Monte Carlo check of the exact p95 / mean for one config
    e = profile[40]
    c = e.config
    table = measure_config_table(backend, backend.dataset("val"), list(range(16)) * 40, [c], warmup=0)
    lat = table.latency[:, 0]
    assert abs(float(torch.quantile(lat, 0.95)) / e.latency_p95_ms - 1) < 0.03
    assert abs(float(lat.mean()) / e.latency_mean_ms - 1) < 0.02
    assert e.latency_p95_ms > e.latency_mean_ms


def test_budget_feasibility_names_the_least_violating_configuration_per_budget():
    configs = [StaticChoice("low", 4, 12, 1), StaticChoice("high", 8, 16, 1)]
    lat = torch.tensor([[30.0, 90.0], [40.0, 150.0], [20.0, 80.0], [35.0, 95.0]], dtype=torch.float64)
    table = ConfigTable(torch.arange(4), configs, torch.ones(4, 2, dtype=torch.float64), lat)
    low, mid, high = budget_feasibility(table, [25.0, 38.0, 200.0])
    # 25 ms: low,4,12 exceeds it on 3 of 4 samples (the least); 38 ms: 1 of 4, still over 5%
    assert low == {"budget_ms": 25.0, "least_violating_config": "low,4,12", "violation_rate": 0.75, "feasible": False}
    assert mid["violation_rate"] == 0.25 and not mid["feasible"]
    assert high["violation_rate"] == 0.0 and high["feasible"]


def test_table_rows_use_the_measured_values_and_the_reward():
    configs = [StaticChoice("low", 4, 12, 1), StaticChoice("high", 8, 16, 1)]
    acc = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    lat = torch.tensor([[30.0, 90.0], [40.0, 150.0], [20.0, 80.0]], dtype=torch.float64)
    table = ConfigTable(torch.arange(3), configs, acc, lat)
    weights = RewardWeights()
    rows = table_policy_rows(PolicySpec("static:high,8,16", "static", configs[1]), table, [100.0], KS, weights,
                             ["a", "b", "a"])
    r = rows[0]
    assert r["accuracy_mean"] == pytest.approx(2 / 3) and r["latency_mean_ms"] == pytest.approx(320 / 3)
    assert r["violation_rate"] == pytest.approx(1 / 3)
    expected = compute_reward(acc[:, 1], lat[:, 1], torch.tensor(100.0, dtype=torch.float64),
                              torch.tensor(configs[1].complexity(KS), dtype=torch.float64), weights).mean()
    assert r["reward_mean"] == pytest.approx(float(expected))
    assert r["accuracy_by_family"] == {"a": 0.5, "b": 1.0}
    assert r["choices"]["tier"] == {"low": 0.0, "medium": 0.0, "high": 1.0}
    oracle = table_policy_rows(PolicySpec("oracle", "oracle"), table, [100.0], KS, weights)[0]
    # sample 0: high fits (acc 1); sample 1: low (high is too slow); sample 2: both 0 -> the faster low
    assert oracle["accuracy_mean"] == pytest.approx(2 / 3) and oracle["violation_rate"] == 0.0
    assert oracle["choices"]["tier"]["high"] == pytest.approx(1 / 3)
    # lookup on a profile built from the same table
    profile = profile_from_table(configs, acc, lat)
    lookup = table_policy_rows(PolicySpec("lookup-mean", "lookup-mean"), table, [60.0, 120.0], KS, weights,
                               profile=profile)
    assert [r["config"] for r in lookup] == ["low,4,12", "high,8,16"]
    needed = configs_needed([PolicySpec("lookup-mean", "lookup-mean")], configs, profile, [60.0, 120.0])
    assert needed == configs


def test_random_policy_and_controller_sweep_hook():
    backend = DummyBackend(num_samples={"train": 8, "val": 8, "test": 8})
    env = BudgetVLMEnv(backend, batch_size=8, group_size=1, split="val")
    from agents.evaluation import run_episodes

    eps = run_episodes(env, RandomPolicy(backend.knob_space, backend.d_model, seed=1), torch.arange(8).repeat(4),
                       torch.full((32,), 100.0), greedy=False)
    assert len(set(eps["action", "num_blocks"].tolist())) > 1
    meta = {"knob_space": backend.knob_space.to_dict(), "language_dim": backend.language_dim,
            "d_model": backend.d_model, "budget_range_ms": list(backend.budget_range_ms), "hidden_dim": 16,
            "sinusoidal_dim": 16}
    actor = build_actor(meta)
    actor.train()
    rows = controller_budget_sweep(env, actor, torch.arange(8), [60.0, 120.0, 170.0])
    assert actor.training
    assert [r["budget_ms"] for r in rows] == [60.0, 120.0, 170.0]
    assert all(r["policy"] == "controller" and r["num_episodes"] == 8 for r in rows)
    for r in rows:
        for head, dist in r["choices"].items():
            assert sum(dist.values()) == pytest.approx(1.0)
    from matplotlib.figure import Figure

    assert isinstance(accuracy_vs_budget_figure(rows), Figure)


def test_table_skips_unreadable_samples():
    from envs.data.sample import ImageLoadError

    class Flaky(DummyBackend):
        def start_episode(self, sample, tier, budget_token):
            if sample.index == 1:
                raise ImageLoadError("broken image")
            return super().start_episode(sample, tier, budget_token)

    backend = Flaky(num_samples={"train": 4, "val": 4, "test": 4})
    table = measure_config_table(backend, backend.dataset("test"), [0, 1, 2], all_static_configs(backend.knob_space)[:3])
    assert table.sample_index.tolist() == [0, 2] and table.skipped == [1]
    assert table.accuracy.shape == table.latency.shape == (2, 3)


def test_profile_insertion_is_kept_and_checked():
    good = {"tier": "low", "top_k": 4, "num_blocks": 12, "accuracy_mean": 0.5, "latency_mean_ms": 10.0,
            "latency_p95_ms": 12.0}
    assert check_profile({"configs": [{**good, "insertion": 3}]}, KS, "p.json")[0].config.insertion == 3
    assert check_profile({"configs": [good]}, KS, "p.json")[0].config.insertion == 1
    with pytest.raises(ValueError, match="insertion 9 is not in the knob space"):
        check_profile({"configs": [{**good, "insertion": 9}]}, KS, "p.json")


# ------------------------------------------------------------------ calibrated baselines
def _calibration_and_test():
    """Three configs; calibration (choices) and test (reading) tables that disagree on purpose."""
    configs = [StaticChoice("low", 4, 12, 1), StaticChoice("medium", 6, 14, 1), StaticChoice("high", 8, 16, 1)]
    # calibration: families a, a, b, b. low is best on a, high on b; medium best overall; high's p95 ~ 150
    cal_acc = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    cal_lat = torch.tensor([[30.0, 60.0, 150.0]] * 4, dtype=torch.float64)
    calibration = Calibration(ConfigTable(torch.arange(4), configs, cal_acc, cal_lat), ["a", "a", "b", "b"])
    # test: medium is useless here, high is perfect; latencies are what this run measured on test
    test_acc = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    test_lat = torch.tensor([[30.0, 60.0, 140.0], [32.0, 61.0, 160.0], [31.0, 59.0, 150.0]], dtype=torch.float64)
    return configs, calibration, ConfigTable(torch.arange(3), configs, test_acc, test_lat), ["a", "b", "b"]


def test_lookup_calibrated_chooses_on_calibration_and_reads_test():
    configs, calibration, test, fam = _calibration_and_test()
    spec = parse_policies(["lookup-calibrated"], KS)[0]
    assert spec.needs_calibration and not spec.needs_profile and spec.needs_table
    rows = table_policy_rows(spec, test, [100.0, 200.0, 20.0], KS, RewardWeights(), fam, calibration=calibration)
    assert [r["config"] for r in rows] == ["medium,6,14", "medium,6,14", "low,4,12"]
    assert rows[0]["accuracy_mean"] == 0.0  # medium is read on test, where it fails
    assert [r["fallback_rate"] for r in rows] == [0.0, 0.0, 1.0]  # 20 ms: nothing fits, the fastest
    with pytest.raises(ValueError, match="needs a calibration set"):
        table_policy_rows(spec, test, [100.0], KS, RewardWeights(), fam)


def test_family_oracle_chooses_per_family_through_the_headroom_rule():
    configs, calibration, test, fam = _calibration_and_test()
    spec = parse_policies(["family-oracle"], KS)[0]
    at_200, at_100, at_20 = table_policy_rows(spec, test, [200.0, 100.0, 20.0], KS, RewardWeights(), fam,
                                              calibration=calibration)
    assert at_200["family_choice"] == {"a": "low,4,12", "b": "medium,6,14"}  # ties: the faster
    assert at_200["accuracy_by_family"] == {"a": 1.0, "b": 0.0}
    assert at_200["choices"]["tier"] == {"low": 1 / 3, "medium": 2 / 3, "high": 0.0}
    assert at_100["family_choice"] == {"a": "low,4,12", "b": "medium,6,14"}
    assert at_20["family_choice"] == {"a": "low,4,12", "b": "low,4,12"} and at_20["fallback_rate"] == 1.0
    # the same choice as envs.headroom's own report
    from envs.headroom import budget_headroom

    choose = {c.name: {"a": float(calibration.table.accuracy[:2, j].mean()),
                       "b": float(calibration.table.accuracy[2:, j].mean())} for j, c in enumerate(configs)}
    report = budget_headroom(choose, choose, {c.name: float(calibration.table.latency[0, j]) for j, c in enumerate(configs)},
                             {"a": 1 / 3, "b": 2 / 3}, 200.0)
    assert report["family_choice"] == at_200["family_choice"]
    # per-family violations: high is not chosen, nothing exceeds 200 ms
    assert at_200["violation_rate_by_family"] == {"a": 0.0, "b": 0.0}
    missing = Calibration(calibration.table, ["a"] * 4)
    with pytest.raises(ValueError, match=r"calibration set has no question of family \['b'\]"):
        table_policy_rows(spec, test, [100.0], KS, RewardWeights(), fam, calibration=missing)
    with pytest.raises(ValueError, match="needs question families"):
        table_policy_rows(spec, test, [100.0], KS, RewardWeights(), None, calibration=calibration)


def test_rows_split_violations_by_family():
    configs = [StaticChoice("high", 8, 16, 1)]
    table = ConfigTable(torch.arange(4), configs, torch.ones(4, 1, dtype=torch.float64),
                        torch.tensor([[90.0], [110.0], [120.0], [80.0]], dtype=torch.float64))
    row = table_policy_rows(PolicySpec("static:high,8,16", "static", configs[0]), table, [100.0], KS,
                            RewardWeights(), ["x", "y", "y", "x"])[0]
    assert row["violation_rate"] == 0.5
    assert row["violation_rate_by_family"] == {"x": 0.0, "y": 1.0} and row["num_episodes_by_family"] == {"x": 2, "y": 2}
    # knob choices per family: the family oracle's detail questions take another tier than coarse ones
    configs, calibration, test, fam = _calibration_and_test()
    at_200 = table_policy_rows(parse_policies(["family-oracle"], KS)[0], test, [200.0], KS, RewardWeights(), fam,
                               calibration=calibration)[0]
    assert at_200["choices_by_family"]["a"]["tier"] == {"low": 1.0, "medium": 0.0, "high": 0.0}
    assert at_200["choices_by_family"]["b"]["tier"] == {"low": 0.0, "medium": 1.0, "high": 0.0}


def test_latency_scales_between_averages_the_ratio_per_tier():
    ks = KnobSpace()
    entries = [ProfileEntry(make_static(t, k, n, ks, "test"), 0.5, ms, ms * 1.2)
               for t, ms in (("low", 10.0), ("high", 40.0)) for k, n in ((4, 12), (8, 16))]
    measured = [replace(e, latency_mean_ms=e.latency_mean_ms * (1.5 if e.config.tier == "low" else 0.5 + 0.25 * i))
                for i, e in enumerate(entries)]
    scales = latency_scales_between(entries, measured)
    assert scales["low"] == pytest.approx(1.5) and scales["high"] == pytest.approx((1.0 + 1.25) / 2)
    with pytest.raises(ValueError, match="shares no configuration"):
        latency_scales_between(entries[:2], measured[2:])
