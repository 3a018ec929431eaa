"""envs/shield.py: the latency shield's projection rules, its bad input, and the env executing the
projected plan (on the dummy backend, whose closed-form profile is the shield's table)."""
import csv
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agents.baselines import dummy_closed_form_profile, load_profile
from agents.config import config_from_dict
from agents.evaluation import run_episodes, summarize
from agents.factory import (check_follow_shield_scale, check_latency_shield, check_shield_allocation,
                            check_shield_budget_bins, check_shield_quantile, check_shield_tracking,
                            check_shield_violation_rate, check_shield_violation_target, make_actor, make_backend_from_config, make_family_table,
                            make_latency_shield, make_loss, make_lookup_profile, shield_from_profile,
                            REQUEST_MIX_BATCH, REQUEST_MIX_SAMPLES)
from agents.factory import make_env as make_run_env
from agents.warm_start import measure_request_mix, request_mix_values
from envs import make_env
from envs.knobs import KnobSpace
from envs.shield import RISK_POOLS, SPEED_MIN_EPISODES, STAGE2_RISKS, TIER_MIN_EPISODES, LatencyShield
from helpers import load_runner
from train_runs import TINY, tiny_config, train_main

KS = KnobSpace(tiers=("low", "high"), insertion_positions=(1, 2), top_k_values=(4, 8), num_blocks_values=(12, 16))
# p95 ms per (tier, top-k, blocks): low 10/14 (k 4), 12/16 (k 8); high 20/24, 22/30
TABLE = torch.tensor([[[10.0, 14.0], [12.0, 16.0]], [[20.0, 24.0], [22.0, 30.0]]])


def _shield(table=TABLE, insertion_index=0, tracking_rate=0.0):
    return LatencyShield(KS, table, insertion_index, tracking_rate)


def test_stage1_keeps_a_tier_that_fits_and_steps_down_to_the_highest_that_does():
    s = _shield(insertion_index=1)
    assert s.stage1(1, 0, 25.0) == (1, 1)  # fits; the insertion is always the table's
    assert s.stage1(1, 1, 15.0) == (0, 1)  # high's cheapest (20) overshoots: low
    assert s.stage1(0, 0, 50.0) == (0, 1)  # never up: the policy's tier is a ceiling
    assert s.stage1(1, 0, 5.0) == (0, 1)  # nothing fits: the cheapest tier


def test_stage2_keeps_a_fitting_plan_else_the_largest_fitting_one_below_it():
    s = _shield()
    assert s.stage2(1, 1, 1, 30.0) == (1, 1)  # fits as chosen
    assert s.stage2(1, 1, 1, 25.0) == (0, 1)  # (k 4, 16) at 24 is the largest below 30 that fits
    assert s.stage2(1, 1, 1, 22.5) == (1, 0)  # (k 8, 12) at 22 beats (k 4, 12) at 20
    assert s.stage2(1, 0, 1, 21.0) == (0, 0)  # only pairs at or below the chosen one in both knobs
    assert s.stage2(1, 1, 1, 5.0) == (0, 0)  # none fits: the tier's cheapest
    assert s.stage2(0, 0, 0, 11.0) == (0, 0)
    assert math.isnan(s.last_risk) and math.isnan(s.last_price)  # a table shield predicts no risk


def test_untimed_plans_never_fit_and_the_state_dict_round_trips():
    table = TABLE.clone()
    table[1, 0, 1] = math.inf
    s = _shield(table)
    assert s.stage2(1, 1, 1, 25.0) == (1, 0)  # (k 4, 16) is not timed: (k 8, 12)
    again = LatencyShield(KS, torch.tensor(s.state_dict()["p95_ms"]), s.state_dict()["insertion_index"])
    assert torch.equal(again.p95_ms, s.p95_ms)


@pytest.mark.parametrize("table, index, match", [
    (TABLE[:, :, :1], 0, r"shape \(2, 2, 1\): expected \(2, 2, 2\)"),
    (TABLE.clone().index_fill_(0, torch.tensor([0]), float("nan")), 0, "NaN or negative"),
    (-TABLE, 0, "NaN or negative"),
    (TABLE.clone().index_fill_(0, torch.tensor([1]), math.inf), 0, r"no plan of tier\(s\) \['high'\]"),
    (TABLE, 2, r"insertion_index=2: expected an index in \[0, 1\]"),
])
def test_bad_tables_fail_clearly(table, index, match):
    with pytest.raises(ValueError, match=match):
        LatencyShield(KS, table, index)


def _largest_plan():
    ks = KnobSpace()
    return {h: torch.tensor([[len(v) - 1]]) for h, v in (("tier", ks.tiers), ("insertion", ks.insertion_positions),
                                                         ("top_k", ks.top_k_values), ("num_blocks", ks.num_blocks_values))}


def _always(plan, d_model):
    """A policy that asks for `plan` (knob indices, every row alike) at both stages, in 0.1 ms each."""
    def act(td):
        n = td.batch_size[0]
        for h in plan:
            td.set(("action", h), plan[h][:1].expand(n, 1).clone())
        td.set(("action", "budget_token"), torch.zeros(n, d_model))
        td.set(("action", "controller_ms"), torch.full((n, 1), 0.1))
        return td
    return act


def test_the_env_executes_the_shielded_plan_and_records_it():
    env = make_env("dummy", batch_size=16, group_size=1, seed=0)
    ks = env.knob_space
    shield = shield_from_profile(dummy_closed_form_profile(env.backend, "val"), ks)
    lo, hi = env.backend.budget_range_ms
    index, budgets = torch.arange(16), torch.full((16,), lo)
    plan = _largest_plan()
    bare = run_episodes(env, _always(plan, env.backend.d_model), index, budgets)
    assert not bare["episode", "shielded"].any() and (bare["action", "top_k"] == len(ks.top_k_values) - 1).all()
    env.shield = shield
    shielded = run_episodes(env, _always(plan, env.backend.d_model), index, budgets)
    info, action = shielded["episode"], shielded["action"]
    assert info["shielded"].all() and summarize(shielded)["shield_rate"] == 1.0
    assert info["shield_cut"].all() and summarize(shielded)["shield_cut_rate"] == 1.0  # the budget cut it
    for h in ("tier", "insertion", "top_k", "num_blocks"):
        assert torch.equal(action[h], info[f"{h}_index"].long())
    top = [len(v) - 1 for v in (ks.tiers, ks.insertion_positions, ks.top_k_values, ks.num_blocks_values)]
    tier, p = shield.stage1(top[0], top[1], lo)
    k, n = shield.stage2(tier, top[2], top[3], lo)
    assert (action["tier"] == tier).all() and (action["insertion"] == p).all()
    assert (action["top_k"] == k).all() and (action["num_blocks"] == n).all()
    # the plan that ran is the cheaper one: the backend was asked for it
    assert info["latency_ms"].mean() < bare["episode", "latency_ms"].mean()
    assert info["violation"].mean() < bare["episode", "violation"].mean()
    # with room to spare the largest plan runs as asked, at the table's insertion (the only one it timed)
    roomy = run_episodes(env, _always(plan, env.backend.d_model), index, torch.full((16,), hi * 10))
    assert (roomy["action", "insertion"] == shield.insertion_index).all() and roomy["episode", "shielded"].all()
    assert not roomy["episode", "shield_cut"].any()  # only the insertion was pinned
    for h in ("tier", "top_k", "num_blocks"):
        assert (roomy["action", h] == plan[h]).all()
    plan["insertion"] = torch.tensor([[shield.insertion_index]])
    roomy = run_episodes(env, _always(plan, env.backend.d_model), index, torch.full((16,), hi * 10))
    assert not roomy["episode", "shielded"].any()


class _SlowShield(LatencyShield):
    """A shield whose every decision takes at least `pause_ms`."""
    pause_ms = 20.0

    def stage1(self, *args, **kwargs):
        time.sleep(self.pause_ms / 1e3)
        return super().stage1(*args, **kwargs)

    def stage2(self, *args, **kwargs):
        time.sleep(self.pause_ms / 1e3)
        return super().stage2(*args, **kwargs)


def test_the_shields_decisions_count_in_each_stages_controller_time_and_the_latency():
    env = make_env("dummy", batch_size=4, group_size=1, seed=0)
    profile = shield_from_profile(dummy_closed_form_profile(env.backend, "val"), env.knob_space)
    env.shield = _SlowShield(env.knob_space, profile.p95_ms, profile.insertion_index)
    lo, hi = env.backend.budget_range_ms
    out = run_episodes(env, _always(_largest_plan(), env.backend.d_model), torch.arange(4), torch.full((4,), hi))
    info, pause = out["episode"], _SlowShield.pause_ms
    assert (info["stage1_controller_ms"] >= 0.1 + pause).all() and (info["stage2_controller_ms"] >= 0.1 + pause).all()
    parts = sum(info[k] for k in ("preprocess_ms", "vision_ms", "prefill_ms", "decode_ms", "controller_ms"))
    assert torch.allclose(info["latency_ms"], parts, rtol=1e-5) and (info["latency_ms"] >= 2 * pause).all()


def test_make_latency_shield_adds_the_controllers_own_time_to_the_profile():
    cfg = config_from_dict({**TINY, "policy": {**TINY["policy"], "latency_shield": True}})
    backend = make_backend_from_config(cfg)
    actor, _ = make_actor(cfg, backend)
    shield = make_latency_shield(cfg, backend, actor)
    bare = shield_from_profile(dummy_closed_form_profile(backend, "val"), backend.knob_space)
    extra = shield.p95_ms - bare.p95_ms
    assert (extra > 0).all() and torch.allclose(extra, extra.flatten()[0].expand_as(extra))
    assert make_latency_shield(config_from_dict(TINY), backend, actor) is None
    strict = {**TINY["policy"], "latency_shield": True, "latency_shield_tracking": 0.05, "latency_shield_quantile": 0.98}
    tracked = make_latency_shield(config_from_dict({**TINY, "policy": strict}), backend, actor)
    assert (tracked.quantile, tracked.tracking_rate, shield.quantile) == (0.98, 0.05, 0.95)  # the settings reach it
    assert shield.violation_target is None and (shield.margin == 1).all()


def test_the_violation_target_setting_gives_the_shield_a_margin_per_equal_part_of_the_budget_range():
    policy = {**TINY["policy"], "latency_shield": True, "latency_shield_violation_target": 0.03,
              "latency_shield_budget_bins": 4, "latency_shield_violation_rate": 0.3}
    cfg = config_from_dict({**TINY, "policy": policy})
    backend = make_backend_from_config(cfg)
    shield = make_latency_shield(cfg, backend, make_actor(cfg, backend)[0])
    lo, hi = backend.budget_range_ms
    assert (shield.violation_target, shield.violation_rate) == (0.03, 0.3)
    assert shield.budget_edges_ms.tolist() == pytest.approx([lo + (hi - lo) * i / 4 for i in (1, 2, 3)])
    assert [shield.budget_bin(b) for b in (lo, (lo + hi) / 2 + 1e-6, hi, hi * 2)] == [0, 2, 3, 3]


@pytest.mark.parametrize("field, value, expected", [
    ("latency_shield_violation_target", 0.0, r"expected a number in \(0, 1\)"),
    ("latency_shield_violation_target", "low", r"expected a number in \(0, 1\)"),
    ("latency_shield_budget_bins", 0, "expected an integer >= 1"),
    ("latency_shield_budget_bins", 2.5, "expected an integer >= 1"),
    ("latency_shield_violation_rate", 0.0, "expected a finite rate > 0"),
    ("latency_shield_violation_rate", True, "expected a finite rate > 0"),
    ("latency_shield_violation_rate", float("nan"), "expected a finite rate > 0"),
])
def test_bad_margin_config_settings_fail_naming_the_field(field, value, expected):
    cfg = config_from_dict({**TINY, "policy": {**TINY["policy"], "latency_shield": True, field: value}})
    check = {"latency_shield_violation_target": check_shield_violation_target,
             "latency_shield_budget_bins": check_shield_budget_bins,
             "latency_shield_violation_rate": check_shield_violation_rate}[field]
    with pytest.raises(ValueError, match=rf"policy.{field}={value!r}: {expected}"):
        check(cfg)


def test_the_shields_table_never_passes_a_plan_while_it_cuts_a_cheaper_one(tmp_path):
    # A measured p95 below a cheaper plan's (k 8 with 16 blocks under k 4 with 16 blocks, as 40-request
    # p95s read on 2026-12-04): read raw, a 15 ms budget would pass (k 8, 16) and cut (k 4, 16).
    p95 = {("low", 4, 12): 10.0, ("low", 4, 16): 16.0, ("low", 8, 12): 12.0, ("low", 8, 16): 14.0,
           ("high", 4, 12): 20.0, ("high", 4, 16): 24.0, ("high", 8, 12): 22.0, ("high", 8, 16): 30.0}
    configs = [{"tier": t, "top_k": k, "num_blocks": n, "insertion": 1, "accuracy_mean": 0.5,
                "latency_mean_ms": v, "latency_p95_ms": v} for (t, k, n), v in p95.items()]
    (tmp_path / "profile.json").write_text(json.dumps({"configs": configs}))
    raw = shield_from_profile(load_profile(tmp_path, KS)[0], KS)
    assert raw.stage2(0, 1, 1, 15.0) == (1, 1)  # the inconsistency the envelope removes
    shield = shield_from_profile(make_lookup_profile(SimpleNamespace(results_dir=tmp_path, knob_space=KS)), KS)
    assert float(shield.p95_ms[0, 1, 1]) == 16.0
    assert shield.stage2(0, 1, 1, 15.0) == (1, 0)  # (k 8, 12 blocks): the largest plan below that fits
    assert shield.stage2(0, 0, 1, 16.0) == (0, 1)


def test_a_non_boolean_setting_fails_naming_the_field():
    cfg = config_from_dict({**TINY, "policy": {**TINY["policy"], "latency_shield": "yes"}})
    with pytest.raises(ValueError, match=r"policy.latency_shield='yes': expected true or false"):
        check_latency_shield(cfg)


def test_a_shielded_training_run_logs_its_shield_rate_and_evaluates_through_it(tmp_path):
    config = tiny_config(tmp_path, policy={**TINY["policy"], "latency_shield": True, "latency_shield_tracking": 0.2,
                                           "follow_shield_scale": True, "latency_shield_violation_target": 0.03,
                                           "latency_shield_budget_bins": 2}, train={"num_epochs": 1})
    out = tmp_path / "run"
    train_main("--config", config, "--output_dir", out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/shield_rate", "train/shield_cut_rate"):
        rates = [r[key] for r in rows if key in r]
        assert rates and all(0.0 <= x <= 1.0 for x in rates)
    assert any("val/shield_rate" in r for r in rows)
    # the controller read times divided by the tracking shield's scale, which every episode moved
    scales = [r["train/time_scale"] for r in rows if "train/time_scale" in r]
    assert scales and all(math.isfinite(x) and x > 0 for x in scales) and any(x != 1.0 for x in scales)
    # the margin per half of the budget range, which the training episodes moved
    margins = [[r[f"train/shield_margin_bin{b}"] for b in (0, 1)] for r in rows if "train/shield_margin_bin0" in r]
    assert margins and all(0.8 <= m <= 1.5 for row in margins for m in row) and margins[-1] != [1.0, 1.0]
    final = json.loads((out / "final_eval.json").read_text())
    # the random floor as it is, and its same draws through the shield
    assert final["uniform_random"]["shield_rate"] == 0.0
    shielded = final["uniform_random_shielded"]
    assert shielded["num_episodes"] == final["uniform_random"]["num_episodes"] and shielded["shield_rate"] > 0


def test_a_tracking_shield_learns_the_machines_p95_from_what_ran():
    s = _shield(tracking_rate=0.05)
    g = torch.Generator().manual_seed(0)
    # the machine now runs 1.3x the table with 10% noise: its p95 sits near 1.3 * 1.16 x the table
    for _ in range(4000):
        s.observe(1, 1, 1, float(30.0 * 1.3 * torch.exp(0.1 * torch.randn((), generator=g))), 100.0)
    assert 1.35 < float(s.scale[1]) < 1.7 and float(s.scale[0]) == 1.0  # only the observed tier moves
    assert s.stage2(1, 1, 1, 31.0) != (1, 1)  # 30 ms no longer fits 31 ms
    fixed = _shield()
    fixed.observe(1, 1, 1, 1000.0, 100.0)
    assert float(fixed.scale[1]) == 1.0 and fixed.state_dict()["tracking_rate"] == 0.0


@pytest.mark.parametrize("quantile", [0.95, 0.98])
def test_a_tracking_shields_table_is_exceeded_by_one_minus_its_quantile(quantile):
    s = LatencyShield(KS, TABLE, 0, tracking_rate=0.05, quantile=quantile)
    g = torch.Generator().manual_seed(1)
    draws = 30.0 * 1.3 * torch.exp(0.1 * torch.randn(40000, generator=g))
    exceeded = []
    for i, x in enumerate(draws.tolist()):
        if i >= 10000:  # past the transient: would this episode have exceeded the table it ran under?
            exceeded.append(x > float(s.p95_ms[1, 1, 1] * s.scale[1]))
        s.observe(1, 1, 1, x, 100.0)
    rate = sum(exceeded) / len(exceeded)
    assert abs(rate - (1 - quantile)) < 0.01, rate
    assert s.state_dict()["quantile"] == quantile


def test_a_bad_shield_quantile_fails_naming_the_field():
    for q in (0.0, 1.0, 1.5, float("nan"), "high", True):
        cfg = config_from_dict({**TINY, "policy": {**TINY["policy"], "latency_shield": True,
                                                   "latency_shield_quantile": q}})
        with pytest.raises(ValueError, match=r"policy.latency_shield_quantile=.*expected a number in \(0, 1\)"):
            check_shield_quantile(cfg)
        with pytest.raises(ValueError, match=r"latency shield quantile=.*expected a number in \(0, 1\)"):
            LatencyShield(KS, TABLE, 0, 0.05, q)


def test_the_env_feeds_a_tracking_shield_each_episodes_latency():
    env = make_env("dummy", batch_size=8, group_size=1, seed=0)
    tight = dummy_closed_form_profile(env.backend, "val")
    shield = shield_from_profile(tight, env.knob_space, tracking_rate=0.1)
    shield.p95_ms *= 0.5  # a table that underestimates the machine: the scale must rise
    env.shield = shield
    lo, _ = env.backend.budget_range_ms
    run_episodes(env, _always(_largest_plan(), env.backend.d_model), torch.arange(8), torch.full((8,), lo * 2))
    assert float(shield.scale.max()) > 1.0


def test_a_bad_follow_shield_scale_fails_naming_the_field():
    cfg = config_from_dict({**TINY, "policy": {**TINY["policy"], "follow_shield_scale": "yes"}})
    with pytest.raises(ValueError, match=r"policy.follow_shield_scale='yes': expected true or false"):
        check_follow_shield_scale(cfg)


@pytest.mark.parametrize("rate", [-0.1, float("nan"), "fast"])
def test_bad_tracking_rates_fail_naming_the_field(rate):
    cfg = config_from_dict({**TINY, "policy": {**TINY["policy"], "latency_shield": True,
                                               "latency_shield_tracking": rate}})
    with pytest.raises(ValueError, match=r"policy.latency_shield_tracking=.*expected a finite rate >= 0"):
        check_shield_tracking(cfg)
    if not isinstance(rate, str):
        with pytest.raises(ValueError, match="tracking_rate"):
            LatencyShield(KS, TABLE, 0, rate)


def test_the_shields_pinned_insertion_is_left_out_of_the_loss_unless_asked_to_keep_it():
    shielded = {**TINY, "policy": {**TINY["policy"], "latency_shield": True}}
    backend = make_backend_from_config(config_from_dict(TINY))
    actor, _ = make_actor(config_from_dict(TINY), backend)
    assert make_loss(config_from_dict(shielded), actor).pinned_heads == ("insertion",)
    assert make_loss(config_from_dict(TINY), actor).pinned_heads == ()
    kept = {**shielded, "loss": {**TINY["loss"], "exclude_pinned_insertion": False}}
    assert make_loss(config_from_dict(kept), actor).pinned_heads == ()
    bad = {**shielded, "loss": {**TINY["loss"], "exclude_pinned_insertion": "no"}}
    with pytest.raises(ValueError, match=r"loss.exclude_pinned_insertion='no': expected true or false"):
        make_loss(config_from_dict(bad), actor)


def _plan_at_the_edge(shield, budget, draws):
    """Episodes of the largest plan the shield lets through at `budget` (high tier, so the edge is a
    choice), each with a drawn ratio of its table time; -> the fraction that exceeded the budget."""
    violated = []
    for ratio in draws:
        k, n = shield.stage2(1, 1, 1, budget)
        latency = float(shield.p95_ms[1, k, n]) * ratio
        violated.append(latency > budget)
        shield.observe(1, k, n, latency, budget)
    return sum(violated) / len(violated)


def test_a_violation_target_steers_each_budget_bins_violation_rate_to_it():
    g = torch.Generator().manual_seed(2)
    draws = torch.exp(0.08 * torch.randn(6000, generator=g)).tolist()  # a plan's latency / its table time
    budget = 30.5  # high/k8/N16 (30 ms) sits at the edge: half of its episodes exceed
    fixed = _shield()
    assert _plan_at_the_edge(fixed, budget, draws) > 0.3
    steered = LatencyShield(KS, TABLE, 0, violation_target=0.02, budget_edges_ms=[25.0, 40.0])
    rate = _plan_at_the_edge(steered, budget, draws)
    assert abs(rate - 0.02) < 0.01, rate
    assert steered.budget_bin(budget) == 1 and float(steered.margin[1]) > 1.0  # the margin moved the plan down
    assert steered.margin[[0, 2]].tolist() == [1.0, 1.0]  # the other bins saw no episode
    loose = LatencyShield(KS, TABLE, 0, violation_target=0.02, budget_edges_ms=[25.0, 40.0])
    assert _plan_at_the_edge(loose, 45.0, draws[:500]) == 0.0  # far below its budget: the margin only falls
    assert float(loose.margin[2]) == pytest.approx(max(math.exp(-0.1 * 0.02 * 500), 0.8))
    state = steered.state_dict()
    assert state["violation_target"] == 0.02 and state["budget_edges_ms"] == [25.0, 40.0] and len(state["margin"]) == 3


def test_bad_margin_settings_fail_naming_the_field():
    for target in (0.0, 1.0, float("nan"), "low", True):
        with pytest.raises(ValueError, match=r"violation_target=.*expected a number in \(0, 1\)"):
            LatencyShield(KS, TABLE, violation_target=target)
    for rate in (0.0, -1.0, float("inf"), "fast"):
        with pytest.raises(ValueError, match=r"violation_rate=.*expected a finite rate > 0"):
            LatencyShield(KS, TABLE, violation_target=0.02, violation_rate=rate)
    for edges in ([40.0, 25.0], [25.0, 25.0], [float("nan")]):
        with pytest.raises(ValueError, match=r"budget_edges_ms=.*expected finite, strictly increasing edges"):
            LatencyShield(KS, TABLE, violation_target=0.02, budget_edges_ms=edges)


# Values of two requests over TABLE's plans (tier, top-k, blocks): one whose questions gain nothing from
# a larger plan, one whose questions need 16 blocks (the test bed's coarse and knowledge questions).
FLAT = torch.full((2, 2, 2), 1.0)
BLOCKS = torch.tensor([[[0.5, 1.0], [0.5, 1.0]], [[0.5, 1.0], [0.5, 1.0]]])
VALUES = {(0, 0, 0): FLAT, (0, 0, 1): BLOCKS}


def _value_shield(**kw):
    return LatencyShield(KS, TABLE, 0, violation_target=0.02, values=VALUES, **kw)


def test_a_value_shield_spends_the_risk_where_the_request_gains_from_it():
    s = _value_shield()
    s.price[:] = 4.0
    # at 14.2 ms low/k4/N16 (14 ms) is 1.4% below the budget: the prior's top twentieth exceeds it
    assert float(s.violation_probability(torch.tensor([14.0]), 14.2)) == 0.05
    assert float(s.violation_probability(torch.tensor([10.0]), 14.2)) == 0.0
    assert s.stage2(0, 0, 1, 14.2) == (0, 1)  # 1.0 - 4 x 0.05 beats 0.5
    assert (s.last_risk, s.last_price) == (0.05, 4.0)  # what the decision read for the plan it returned
    # the same plan asked with flat values: nothing to gain, so the plan that surely fits
    flat = LatencyShield(KS, TABLE, 0, violation_target=0.02, values={(0, 0, 1): FLAT})
    flat.price[:] = 4.0
    assert flat.stage2(0, 0, 1, 14.2) == (0, 0)
    # a request without values of its own reads the mean of all (0.75 at 12 blocks, 1.0 at 16)
    assert s.stage2(0, 1, 1, 14.2) == (0, 1)
    # a higher price buys safety: at 40 the gain of 0.5 no longer pays for the risk
    s.price[:] = 40.0
    assert s.stage2(0, 0, 1, 14.2) == (0, 0)
    assert (s.last_risk, s.last_price) == (0.0, 40.0)
    # a certain violation never beats a plan that surely fits, even at the lowest price and a gain of 1
    s = LatencyShield(KS, TABLE, 0, violation_target=0.02,
                      values={(0, 0, 1): torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])})
    s.price[:] = 1.0
    s.ratios = torch.tensor([0.9, 1.0], dtype=torch.float64)
    assert s.stage2(0, 0, 1, 11.0) == (0, 0)


def test_the_price_start_sets_every_bins_price_until_its_episodes_move_it():
    # at 14.2 ms low/k4/N16 risks 5%: at the default start (2) its gain of 0.5 pays for it, from 40 it does not
    assert _value_shield().stage2(0, 0, 1, 14.2) == (0, 1)
    s = _value_shield(price_start=40.0, budget_edges_ms=[25.0, 40.0])
    assert s.price.tolist() == [40.0, 40.0, 40.0]
    assert s.stage2(0, 0, 1, 14.2) == (0, 0) and s.last_price == 40.0
    s.observe(0, 0, 0, 10.0, 14.2)  # an episode in time lowers its own bin's price only
    assert s.price[0] == pytest.approx(40.0 * math.exp(-0.1 * 0.02)) and s.price[1:].tolist() == [40.0, 40.0]
    for start in (0.5, 101.0, float("nan"), "high", True):
        with pytest.raises(ValueError, match=r"price_start=.*expected a price in \[1, 100\]"):
            _value_shield(price_start=start)


def test_an_elapsed_stage2_risk_cuts_the_requests_that_ran_slow_and_keeps_the_fast_ones():
    # 400 episodes of low/k4/N16 (14 ms): each request's speed sets both its time before Stage 2 (5 ms x
    # speed) and its latency (0.85 x table x speed), within 2%
    rng = np.random.default_rng(0)
    speeds = np.exp(0.15 * rng.standard_normal(400))
    shields = {risk: _value_shield(stage2_risk=risk) for risk in STAGE2_RISKS}
    for shield in shields.values():
        for i, speed in enumerate(speeds):
            if i == SPEED_MIN_EPISODES - 1:  # one short of a line: Stage 2 reads the pool as Stage 1
                pooled = shield.stage2_violation_probability(0, 6.5, 14.2)
                assert np.array_equal(pooled, shield.violation_probability(TABLE[0], 14.2).numpy())
            shield.observe(0, 0, 1, 0.85 * 14.0 * speed * math.exp(0.02 * rng.standard_normal()), 50.0,
                           elapsed_ms=5.0 * speed)
        shield.price[:] = 4.0
    elapsed = shields["elapsed"]
    fast, slow = (elapsed.stage2_violation_probability(0, 5.0 * v, 14.2)[0, 1] for v in (0.8, 1.3))
    pooled = float(shields["pooled"].violation_probability(torch.tensor([14.0]), 14.2))
    assert fast == 0.0 and slow > 0.9 and 0.05 < pooled < 0.25
    # the pooled risk keeps 16 blocks for every request (1 - 4 x risk > 0.5); the elapsed one cuts the slow
    for v, plan in ((0.8, (0, 1)), (1.3, (0, 0))):
        assert elapsed.stage2(0, 0, 1, 14.2, elapsed_ms=5.0 * v) == plan
        assert shields["pooled"].stage2(0, 0, 1, 14.2, elapsed_ms=5.0 * v) == (0, 1)
    assert elapsed.stage2(0, 0, 1, 14.2) == (0, 1)  # no time given: the pool, as Stage 1
    assert elapsed.state_dict()["stage2_risk"] == "elapsed" and 0.8 < elapsed.speed_slope < 1.2
    assert shields["pooled"].speed_slope is None


def test_bad_stage2_risk_settings_fail_naming_the_field():
    with pytest.raises(ValueError, match=r"stage2_risk='soon': expected one of \['pooled', 'elapsed'\]"):
        _value_shield(stage2_risk="soon")
    with pytest.raises(ValueError, match=r"stage2_risk='elapsed': .* only with values"):
        LatencyShield(KS, TABLE, 0, violation_target=0.02, stage2_risk="elapsed")


def test_a_tier_risk_pool_reads_each_tiers_own_episodes_once_it_has_enough():
    # 63 low-tier episodes at 1.2x their table, then 200 high-tier ones at 0.9x: the shared pool mixes them
    shields = {pool: _value_shield(risk_pool=pool, stage2_risk="elapsed") for pool in RISK_POOLS}
    for shield in shields.values():
        for _ in range(TIER_MIN_EPISODES - 1):
            shield.observe(0, 0, 0, 1.2 * 10.0, 50.0, elapsed_ms=3.0)
        for i in range(200):
            shield.observe(1, 0, 0, 0.9 * 20.0, 50.0, elapsed_ms=4.0 + 0.01 * i)
    shared, tier = shields["shared"], shields["tier"]
    # at 1.1x a plan's table: the shared pool's 63 of 283 (the prior's 20 included) exceed it in every tier;
    # by tier, the high tier's own none, and the low tier (one short of enough episodes) reads the shared pool
    assert shared.violation_probability(TABLE, 1.1 * 20.0)[1, 0, 0] == pytest.approx(63 / 283)
    assert tier._episode_tables(22.0)["risk"][1, 0, 0] == 0.0
    assert tier._episode_tables(11.0)["risk"][0, 0, 0] == pytest.approx(63 / 283)
    assert shared.stage2_violation_probability(1, 4.5, 22.0)[0, 0] > 0.2
    assert tier.stage2_violation_probability(1, 4.5, 22.0)[0, 0] == 0.0  # the high tier's own residuals
    assert tier.state_dict()["risk_pool"] == "tier"
    with pytest.raises(ValueError, match=r"risk_pool='tiers': expected one of \['shared', 'tier'\]"):
        _value_shield(risk_pool="tiers")
    with pytest.raises(ValueError, match=r"risk_pool='tier': .* only with values"):
        LatencyShield(KS, TABLE, 0, violation_target=0.02, risk_pool="tier")


def test_without_the_ceiling_a_known_request_only_names_its_values():
    values = {(0, 0, 0): BLOCKS, (1, 0, 0): torch.tensor([[[0.2, 0.2], [0.2, 0.2]], [[1.0, 1.0], [1.0, 1.0]]])}
    capped = LatencyShield(KS, TABLE, 0, violation_target=0.02, values=values)
    free = LatencyShield(KS, TABLE, 0, violation_target=0.02, values=values, value_ceiling=False)
    assert capped.stage2(0, 0, 0, 50.0) == (0, 0)  # at or below the request
    assert free.stage2(0, 0, 0, 50.0) == (0, 1)  # its values say 16 blocks (k 4 or 8 alike: the cheaper)
    assert free.stage2(0, 1, 0, 50.0) == (0, 1)  # a request without values: Stage 1's (BLOCKS), any pair
    assert capped.stage1(0, 0, 50.0) == (0, 0) and free.stage1(0, 0, 50.0) == (0, 0)  # low requests: no gain up
    assert free.stage1(1, 0, 50.0) == (1, 0)
    assert free.state_dict()["value_ceiling"] is False


def test_a_lifted_ceiling_lets_a_request_run_up_to_it_and_no_further():
    # a request for low/k4/N12 made by questions that need 16 blocks and the high tier
    needs_more = torch.tensor([[[0.5, 0.8], [0.5, 0.8]], [[0.5, 1.0], [0.5, 1.0]]])
    values = {(0, 0, 0): needs_more}
    own = LatencyShield(KS, TABLE, 0, violation_target=0.02, values=values)
    blocks = LatencyShield(KS, TABLE, 0, violation_target=0.02, values=values, value_ceilings={(0, 0, 0): (0, 0, 1)})
    high = LatencyShield(KS, TABLE, 0, violation_target=0.02, values=values, value_ceilings={(0, 0, 0): (1, 0, 1)})
    assert own.stage1(0, 0, 50.0) == (0, 0) and own.stage2(0, 0, 0, 50.0) == (0, 0)
    assert blocks.stage1(0, 0, 50.0) == (0, 0) and blocks.stage2(0, 0, 0, 50.0) == (0, 1)  # 16 blocks, still k 4
    assert high.stage1(0, 0, 50.0) == (1, 0) and high.stage2(1, 0, 0, 50.0, requested_tier=0) == (0, 1)
    assert high.stage1(0, 0, 21.0) == (0, 0)  # high/k4/N16 (24 ms) surely over: low, 16 blocks (14 ms)
    assert high.stage2(0, 0, 0, 21.0) == (0, 1)
    assert high.state_dict()["value_ceilings"] == {"0,0,0": [1, 0, 1]}
    assert own.state_dict()["value_ceilings"] == {"0,0,0": [0, 0, 0]}
    for ceilings, bad in (({(0, 0, 0): (0, 0, 2)}, r"\(0, 0, 0\): \(0, 0, 2\)"),  # outside the table
                          ({(0, 1, 0): (1, 1, 1)}, r"\(0, 1, 0\): \(1, 1, 1\)"),  # a request the values lack
                          ({(0, 0, 1): (0, 0, 0)}, r"\(0, 0, 1\): \(0, 0, 0\)")):  # below the request
        with pytest.raises(ValueError, match=r"value_ceilings: " + bad + r".*at or above it in every knob"):
            LatencyShield(KS, TABLE, 0, violation_target=0.02, values={**values, (0, 0, 1): needs_more},
                          value_ceilings=ceilings)


def test_without_the_ceiling_an_unknown_request_takes_stage1s_values_over_every_pair():
    s = LatencyShield(KS, TABLE, 0, violation_target=0.02, values={(0, 0, 1): BLOCKS, (1, 0, 0): FLAT},
                      value_ceiling=False)
    # (0, 0, 0) names no values: low's requests (BLOCKS) rule, so 16 blocks, above the pair asked
    assert s.stage2(0, 0, 0, 100.0, requested_tier=0) == (0, 1)
    # asked at the high tier, FLAT's cheapest pair
    assert s.stage2(1, 1, 1, 100.0, requested_tier=1) == (0, 0)
    # with the ceiling the unknown request is its own ceiling
    assert _value_shield().stage2(0, 0, 0, 100.0, requested_tier=0) == (0, 0)


def test_a_value_shields_stage1_reads_the_values_of_the_requests_made_at_that_tier():
    high_flat = {(1, 0, 0): torch.tensor([[[0.2, 0.2], [0.2, 0.2]], [[1.0, 1.0], [1.0, 1.0]]]), (0, 0, 1): BLOCKS}
    s = LatencyShield(KS, TABLE, 1, violation_target=0.02, values=high_flat)
    assert s.stage1(1, 0, 21.0) == (1, 1)  # high/k4/N12 (20 ms) fits with 5% risk: worth 0.8
    assert s.stage1(1, 0, 15.0) == (0, 1)  # surely over: low
    assert s.stage1(0, 0, 50.0) == (0, 1)  # never up


def test_a_value_shields_stage1_weighs_each_request_by_the_questions_that_make_it():
    high_favoured = torch.tensor([[[0.2, 0.2], [0.2, 0.2]], [[1.0, 1.0], [1.0, 1.0]]])
    low_favoured = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    values = {(1, 0, 0): high_favoured, (1, 1, 1): low_favoured}  # both made at the high tier
    even = LatencyShield(KS, TABLE, 0, violation_target=0.02, values=values)
    assert even.stage1(1, 0, 50.0)[0] == 0  # low 0.6 vs high 0.5: every plan fits
    weighted = LatencyShield(KS, TABLE, 0, violation_target=0.02, values=values,
                             value_weights={(1, 0, 0): 3, (1, 1, 1): 1})
    assert weighted.stage1(1, 0, 50.0)[0] == 1  # low 0.4 vs high 0.75
    assert weighted.state_dict()["value_weights"] == {"1,0,0": 3.0, "1,1,1": 1.0}
    for weights in ({(1, 0, 0): 0, (1, 1, 1): 1}, {(1, 0, 0): 1}, {(1, 0, 0): 1, (1, 1, 1): math.nan}):
        with pytest.raises(ValueError, match=r"value_weights: expected a finite weight > 0 for each request"):
            LatencyShield(KS, TABLE, 0, violation_target=0.02, values=values, value_weights=weights)


def test_a_value_shields_price_steers_each_bins_violation_rate_and_its_pool_learns_the_spread():
    g = torch.Generator().manual_seed(2)
    draws = torch.exp(0.08 * torch.randn(6000, generator=g)).tolist()
    largest = torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 1.0]]])  # only high/k8/N16 gains
    s = LatencyShield(KS, TABLE, 0, violation_target=0.02, values={(1, 1, 1): largest}, budget_edges_ms=[25.0, 40.0])
    budget, violated = 30.5, []  # high/k8/N16 (30 ms) sits at the edge: about 40% of its episodes exceed
    for d in draws:
        tier, _ = s.stage1(1, 0, budget)
        k, n = s.stage2(tier, 1, 1, budget)
        latency = float(s.p95_ms[tier, k, n]) * d
        violated.append(latency > budget)
        s.observe(tier, k, n, latency, budget)
    rate = sum(violated) / len(violated)
    assert abs(rate - 0.02) < 0.01, rate
    assert s.budget_bin(budget) == 1 and float(s.price[1]) != 2.0 and s.price[[0, 2]].tolist() == [2.0, 2.0]
    assert s.margin.tolist() == [1.0, 1.0, 1.0]  # the price steers, not the margin
    assert len(s.ratios) == 512 and float(s.ratios.std()) == pytest.approx(0.08, rel=0.2)  # the draws' spread
    state = s.state_dict()
    assert state["values"] == {"1,1,1": largest.tolist()} and len(state["price"]) == 3


def test_the_expected_price_spends_a_bins_target_that_the_steered_price_leaves_unspent():
    # the high tier gains 0.01 for the request; at 21 ms high/k4/N12 (20 ms) exceeds the budget only
    # when a ratio of the pool does (1 of 100: 1% risk), the larger high plans on every ratio
    gain = torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[0.51, 0.51], [0.51, 0.51]]])
    pool = torch.ones(100).index_fill_(0, torch.tensor([0]), 2.0)
    steered, expected = (LatencyShield(KS, TABLE, 0, violation_target=0.02, values={(1, 1, 1): gain},
                                       value_ceiling=False, expected_price=e) for e in (False, True))
    for s in (steered, expected):
        s.ratios = pool.clone()
    assert float(steered.violation_probability(torch.tensor([20.0]), 21.0)) == 0.01
    # steered at its start (2): 0.51 - 2 x 1% < 0.5, so the low tier; the request's best plan risks 1%, under
    # the 2% target, so the expected price is the grid's lowest and the high tier runs
    assert steered.stage1(1, 0, 21.0)[0] == 0 and steered.bin_price(21.0) == 2.0
    assert expected.bin_price(21.0) == pytest.approx(1e-3) and expected.stage1(1, 0, 21.0)[0] == 1
    assert expected.stage2(1, 1, 1, 21.0) == (0, 0)  # high/k4/N12: the larger ones surely violate
    # violations lower the bin's expected target like they raise the steered price, until the 1% plan no
    # longer meets it and the expected price rises to where the low tier wins again
    for _ in range(10):
        expected.observe(1, 0, 0, 25.0, 21.0)
    expected.ratios = pool.clone()
    assert float(expected.expected_target[0]) == pytest.approx(0.02 * math.exp(0.1 * (0.02 - 1)) ** 10)
    assert expected.bin_price(21.0) == pytest.approx(1.0, rel=0.3) and expected.stage1(1, 0, 21.0)[0] == 0
    state = expected.state_dict()
    assert state["expected_price"] is True and state["expected_target"] == expected.expected_target.tolist()
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match=r"expected_price=.*expected a boolean, true only with values"):
            LatencyShield(KS, TABLE, 0, violation_target=0.02, values={(1, 1, 1): gain}, expected_price=bad)
    with pytest.raises(ValueError, match=r"expected_price=True: expected a boolean, true only with values"):
        LatencyShield(KS, TABLE, 0, violation_target=0.02, expected_price=True)


def test_the_expected_price_reads_each_request_within_its_ceiling():
    # with the ceiling the request (low/k4/N12) may run nothing larger, so its expected risk is 0 at any price
    gain = torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[0.51, 0.51], [0.51, 0.51]]])
    s = LatencyShield(KS, TABLE, 0, violation_target=0.02, values={(0, 0, 0): gain}, expected_price=True)
    s.ratios = torch.full((100,), 2.0)  # every plan but the cheapest low one exceeds 21 ms
    assert s.bin_price(21.0) == pytest.approx(1e-3) and s.stage2(0, 0, 0, 21.0) == (0, 0)


def test_bad_values_fail_clearly():
    with pytest.raises(ValueError, match="values need a violation_target"):
        LatencyShield(KS, TABLE, values=VALUES)
    for values, match in (({}, "values are empty"),
                          ({(0, 0, 2): FLAT}, r"request \(0, 0, 2\): expected a \(tier, top-k, blocks\) index"),
                          ({(0, 0, 0): FLAT[:1]}, r"expected a \(2, 2, 2\) table"),
                          ({(0, 0, 0): FLAT.clone().index_fill_(0, torch.tensor([1]), math.nan)},
                           "a timed, known plan in every tier"),
                          ({(0, 0, 0): FLAT.clone().index_fill_(0, torch.tensor([1]), math.inf)},
                           "table of accuracies")):
        with pytest.raises(ValueError, match=match):
            LatencyShield(KS, TABLE, violation_target=0.02, values=values)


@pytest.mark.parametrize("policy, match", [
    ({"latency_shield_allocation": "risk"}, r"latency_shield_allocation='risk': expected one of \['margin', 'value'\]"),
    ({"latency_shield_allocation": "value", "warm_start": "family_request"},
     r"needs policy.latency_shield_violation_target .* got None"),
    ({"latency_shield_allocation": "value", "latency_shield_violation_target": 0.02, "warm_start": "lookup"},
     r"and policy.warm_start='family_request' .* got 'lookup'"),
    ({"latency_shield_value_ceiling": "yes"}, r"policy.latency_shield_value_ceiling='yes': expected true or false"),
    ({"latency_shield_request_mix": "counted"},
     r"policy.latency_shield_request_mix='counted': expected one of \['taught', 'measured'\]"),
    ({"latency_shield_request_mix": "measured"},
     r"latency_shield_request_mix='measured' weighs .* policy.latency_shield_allocation='margin' has none"),
    ({"latency_shield_expected_price": "yes"}, r"policy.latency_shield_expected_price='yes': expected true or false"),
    ({"latency_shield_expected_price": True},
     r"latency_shield_expected_price=True prices .* policy.latency_shield_allocation='margin' has none"),
    ({"latency_shield_stage2_risk": "soon"},
     r"policy.latency_shield_stage2_risk='soon': expected one of \['pooled', 'elapsed'\]"),
    ({"latency_shield_stage2_risk": "elapsed"},
     r"latency_shield_stage2_risk='elapsed' reads .* policy.latency_shield_allocation='margin' has none"),
    ({"latency_shield_risk_pool": "tiers"},
     r"policy.latency_shield_risk_pool='tiers': expected one of \['shared', 'tier'\]"),
    ({"latency_shield_risk_pool": "tier"},
     r"latency_shield_risk_pool='tier' reads .* policy.latency_shield_allocation='margin' has none"),
    ({"latency_shield_price_start": 0.5}, r"policy.latency_shield_price_start=0.5: expected a price in \[1, 100\]"),
    ({"latency_shield_price_start": float("nan")}, r"policy.latency_shield_price_start=nan: expected a price in"),
    ({"latency_shield_price_start": "high"}, r"policy.latency_shield_price_start='high': expected a price in"),
    ({"latency_shield_price_start": 8.0},
     r"latency_shield_price_start=8.0 starts .* policy.latency_shield_allocation='margin' has none"),
])
def test_bad_allocation_settings_fail_naming_the_field(policy, match):
    cfg = config_from_dict({**TINY, "policy": {**TINY["policy"], "latency_shield": True, **policy}})
    with pytest.raises(ValueError, match=match):
        check_shield_allocation(cfg)


def test_a_value_shield_needs_the_runs_family_requests():
    policy = {**TINY["policy"], "latency_shield": True, "latency_shield_violation_target": 0.02,
              "latency_shield_allocation": "value", "warm_start": "family_request"}
    cfg = config_from_dict({**TINY, "policy": policy})
    backend = make_backend_from_config(cfg)
    actor = make_actor(cfg, backend)[0]
    with pytest.raises(ValueError, match="needs the run's family requests"):
        make_latency_shield(cfg, backend, actor)
    family = next(iter(make_family_table(backend)))
    top = backend.knob_space
    plan = f"{top.tiers[-1]},{top.top_k_values[-1]},{top.num_blocks_values[-1]}"
    shield = make_latency_shield(cfg, backend, actor, requests=[{family: plan}])
    key = (len(top.tiers) - 1, len(top.top_k_values) - 1, len(top.num_blocks_values) - 1)
    assert list(shield.values) == [key] and not shield.expected_price
    assert shield.price.tolist() == [2.0] * len(shield.price)  # policy.latency_shield_price_start's default
    priced = config_from_dict({**TINY, "policy": {**policy, "latency_shield_expected_price": True,
                                                  "latency_shield_price_start": 40}})
    priced = make_latency_shield(priced, backend, actor, requests=[{family: plan}])
    assert priced.expected_price and priced.price.tolist() == [40.0] * len(priced.price)


def test_a_measured_request_mix_gives_values_to_the_requests_the_controller_makes():
    policy = {**TINY["policy"], "latency_shield": True, "latency_shield_violation_target": 0.02,
              "latency_shield_allocation": "value", "warm_start": "family_request",
              "latency_shield_request_mix": "measured"}
    cfg = config_from_dict({**TINY, "policy": policy})
    backend = make_backend_from_config(cfg)
    actor = make_actor(cfg, backend)[0]
    top = backend.knob_space
    largest = f"{top.tiers[-1]},{top.top_k_values[-1]},{top.num_blocks_values[-1]}"
    taught = [{next(iter(make_family_table(backend))): largest}]
    shield = make_latency_shield(cfg, backend, actor, requests=taught)
    mix = measure_request_mix(actor, make_run_env(cfg, backend, "train", REQUEST_MIX_BATCH, 1),
                              REQUEST_MIX_SAMPLES // REQUEST_MIX_BATCH)
    assert set(shield.values) == set(mix)  # the requests made, not the one taught
    # every request the family taught the largest plan makes may run up to it
    made_by_taught = [r for r, c in mix.items() if taught[0].keys() & c.keys()]
    assert made_by_taught and all(shield.value_ceilings[r] == (len(top.tiers) - 1, len(top.top_k_values) - 1,
                                                               len(top.num_blocks_values) - 1) for r in made_by_taught)
    expected = request_mix_values(mix, make_family_table(backend), top)
    assert all(torch.equal(shield.values[k].isnan(), v.isnan()) and torch.allclose(shield.values[k].nan_to_num(),
               v.nan_to_num()) for k, v in expected.items())


@pytest.mark.parametrize("request_mix, expected_price, stage2_risk",
                         [("taught", False, "pooled"), ("measured", True, "elapsed")])
def test_a_value_shielded_run_keeps_its_family_requests_and_logs_its_prices(tmp_path, request_mix, expected_price,
                                                                             stage2_risk):
    policy = {**TINY["policy"], "latency_shield": True, "latency_shield_violation_target": 0.03,
              "latency_shield_allocation": "value", "warm_start": "family_request", "warm_start_samples": 32,
              "warm_start_steps": 5, "latency_shield_budget_bins": 2, "latency_shield_request_mix": request_mix,
              "latency_shield_expected_price": expected_price, "latency_shield_stage2_risk": stage2_risk}
    out = tmp_path / "run"
    train_main("--config", tiny_config(tmp_path, policy=policy, train={"num_epochs": 1}), "--output_dir", out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    prices = [[r[f"train/shield_price_bin{b}"] for b in (0, 1)] for r in rows if "train/shield_price_bin0" in r]
    assert prices and all(1.0 <= p <= 100.0 for row in prices for p in row)
    assert not any("train/shield_margin_bin0" in r for r in rows)
    targets = [[r[f"train/shield_expected_target_bin{b}"] for b in (0, 1)] for r in rows
               if "train/shield_expected_target_bin0" in r]
    assert bool(targets) == expected_price and all(0.003 <= t <= 0.3 for row in targets for t in row)
    assert any("train/shield_speed_slope" in r for r in rows) == (stage2_risk == "elapsed")
    meta = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["policy_meta"]
    families = make_family_table(make_backend_from_config(config_from_dict({**TINY, "policy": policy})))
    assert set(meta["family_requests"][0]) == set(families)
    # the evaluation rebuilds the run's value shield from them
    result = load_runner("evaluate").main(["--checkpoint", str(out), "--output_dir", str(tmp_path / "eval"),
                                            "--num_samples", "4", "--num_budgets", "2", "--policies", "controller"])
    table = result["meta"]["latency_shield"]["tables"]["controller"]
    assert table["values"] and len(table["price"]) == 2 and table["expected_price"] == expected_price
    assert table["stage2_risk"] == stage2_risk
    # each episode holds the risk and price its Stage-2 decision read; the rows the mean predicted rate
    episodes = list(csv.DictReader((tmp_path / "eval" / "episodes.csv").open()))
    assert episodes and all(0.0 <= float(e["shield_risk"]) <= 1.0 and 1e-3 <= float(e["shield_price"]) <= 100.0
                            for e in episodes)
    assert all(0.0 <= r["shield_risk_mean"] <= 1.0 for r in result["rows"] if r["policy"] == "controller")
    assert any(r["train/shield_risk"] >= 0.0 for r in rows if "train/shield_risk" in r)
    # measured: each request weighs the evaluation's 256 questions that made it; taught: one per family
    assert sum(table["value_weights"].values()) == (REQUEST_MIX_SAMPLES if request_mix == "measured" else len(families))


def test_a_shields_values_are_fixed_at_construction():
    # what the decisions read off the values is derived once, so a reassignment could only go stale
    s = _value_shield()
    with pytest.raises(AttributeError):
        s.values = {(0, 0, 1): FLAT}
