"""The controller's time scale: a policy trained on one machine reads budgets and measured times in
that machine's units on another (policies.controller.HierarchicalController.time_scale,
agents.factory.controller_time_scale, train.py's latency_scales, evaluate.py --time_rescale)."""
import math

import pytest
import torch

from agents.checkpoint import load_checkpoint
from agents.config import config_from_dict
from agents.factory import check_budget_range, controller_time_scale, machine_budget_range, make_backend_from_config
from agents.rollout import collect_rollouts
from agents.sweep_schedule import EnvPolicy
from envs import KnobSpace, make_env
from envs.shield import LatencyShield, following_time_scale
from helpers import load_runner
from policies import HierarchicalController
from train_runs import TINY, tiny_config, train_main


def _logits(actor, stage: int, td) -> torch.Tensor:
    network = actor.stage_actors[stage].module[0]
    with torch.no_grad():
        out = network.compute(*(td.get(k) for k in network.in_keys))
    return torch.cat([v for k, v in out.items() if k[0] == "logits"], dim=-1)


def test_each_stage_reads_its_times_divided_by_the_scale():
    env = make_env("dummy", batch_size=4, group_size=1, seed=0)
    b = env.backend
    torch.manual_seed(0)
    actor = HierarchicalController(b.knob_space, b.language_dim, b.d_model, b.budget_range_ms, hidden_dim=16,
                                   sinusoidal_dim=16, stage2_inputs="token+elapsed")
    traj = collect_rollouts(env, actor)
    stage1, stage2 = traj[:, 0].exclude("next"), traj[:, 1].exclude("next")
    assert actor.time_scale == 1.0
    before = [_logits(actor, 0, stage1), _logits(actor, 1, stage2)]
    actor.time_scale = 1.25  # this machine 25% slower: a 125 ms budget here is a 100 ms one where it trained
    slower1 = stage1.clone().set("budget_ms", stage1["budget_ms"] * 1.25)
    slower2 = stage2.clone()
    for key in ("elapsed_ms", "remaining_ms"):
        slower2.set(key, stage2[key] * 1.25)
    assert torch.allclose(_logits(actor, 0, slower1), before[0], atol=1e-5)
    assert torch.allclose(_logits(actor, 1, slower2), before[1], atol=1e-5)
    assert not torch.allclose(_logits(actor, 0, stage1), before[0], atol=1e-5)  # the same budget now reads less
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="controller time_scale=.*expected a finite ratio > 0"):
            actor.time_scale = bad


def test_time_scale_is_the_geometric_mean_of_the_tiers_ratios():
    reference = {"low": 1.0, "medium": 0.9, "high": 1.2}
    now = {"low": 1.1, "medium": 0.9, "high": 0.96}
    assert controller_time_scale(reference, now) == pytest.approx((1.1 * 1.0 * 0.8) ** (1 / 3))
    assert controller_time_scale(reference, {"low": 1.21}) == pytest.approx(1.21)  # the tiers both measured
    assert controller_time_scale(None, now) == 1.0  # a checkpoint that saved no scales
    assert controller_time_scale(reference, None) == 1.0  # a backend with no profile (the dummy)
    with pytest.raises(ValueError, match=r"latency_scales: expected finite scales > 0 per tier; got \['low: 0.0"):
        controller_time_scale({"low": 0.0}, {"low": 1.0})
    with pytest.raises(ValueError, match="high: 1.2 -> nan"):
        controller_time_scale(reference, {"high": math.nan})


def test_training_saves_its_start_up_scales_and_evaluation_rescales_by_them(tmp_path, monkeypatch):
    train = load_runner("train")
    monkeypatch.setattr(train, "measure_profile_drift", lambda backend: {"low": 1.0, "medium": 1.0, "high": 1.0})
    out = tmp_path / "run"
    train.main(["--config", str(tiny_config(tmp_path, train={"num_epochs": 1, "steps_per_epoch": 1})),
                "--output_dir", str(out)])
    ckpt = load_checkpoint(out)
    assert ckpt["latency_scales"] == {"low": 1.0, "medium": 1.0, "high": 1.0}

    evaluate = load_runner("evaluate")
    monkeypatch.setattr(evaluate, "measure_profile_drift", lambda backend: {"low": 1.1, "medium": 1.1, "high": 1.1})
    args = ["--checkpoint", str(out), "--num_samples", "2", "--num_budgets", "2", "--policies", "controller"]
    meta = evaluate.main([*args, "--output_dir", str(tmp_path / "on")])["meta"]
    assert meta["controller_time_scale"]["scales"] == {"controller": pytest.approx(1.1)}
    assert meta["controller_time_scale"]["after_the_run"] == {"controller": pytest.approx(1.1)}  # no shield here
    meta = evaluate.main([*args, "--output_dir", str(tmp_path / "off"), "--time_rescale", "off"])["meta"]
    assert meta["controller_time_scale"]["scales"] == {}


def test_a_dummy_run_saves_no_scales(tmp_path):
    out = tmp_path / "run"
    train_main("--config", tiny_config(tmp_path, train={"num_epochs": 1, "steps_per_epoch": 1}), "--output_dir", out)
    assert load_checkpoint(out)["latency_scales"] is None  # no profile to measure against: time scale 1


def test_the_controllers_time_scale_follows_its_shields_tracked_scale():
    ks = KnobSpace()
    shield = LatencyShield(ks, torch.full((3, 5, 5), 50.0), tracking_rate=0.1)
    env = type("Env", (), {"shield": None})()
    policy = type("Policy", (), {"time_scale": 1.0})()
    EnvPolicy("controller", policy, True, shield, time_scale=1.2).prepare(env, 100.0)
    assert env.shield is shield and policy.time_scale == pytest.approx(1.2)
    shield.observe(0, 0, 0, 80.0, 100.0)  # over the scaled p95: the low tier's scale rises by exp(0.1 * 0.95)
    assert shield.mean_scale() == pytest.approx(math.exp(0.1 * 0.95 / 3))
    EnvPolicy("controller", policy, True, shield, time_scale=1.2).prepare(env, 100.0)
    assert policy.time_scale == pytest.approx(1.2 * math.exp(0.1 * 0.95 / 3))
    EnvPolicy("random", policy, False, None).prepare(env, 100.0)  # no time scale: left as it is
    assert env.shield is None and policy.time_scale == pytest.approx(1.2 * math.exp(0.1 * 0.95 / 3))


def test_the_controller_reads_its_budget_divided_by_the_shields_margin_for_it():
    shield = LatencyShield(KnobSpace(), torch.full((3, 5, 5), 50.0), violation_target=0.02, budget_edges_ms=[100.0])
    shield.observe(0, 0, 0, 120.0, 110.0)  # a violation at 110 ms: that bin's margin rises by exp(0.1 * 0.98)
    assert following_time_scale(1.2, shield, 110.0) == pytest.approx(1.2 * math.exp(0.1 * 0.98))
    assert following_time_scale(1.2, shield, 90.0) == pytest.approx(1.2)  # the other bin's margin is 1
    env, policy = type("Env", (), {"shield": None})(), type("Policy", (), {"time_scale": 1.0})()
    EnvPolicy("controller", policy, True, shield, time_scale=1.2).prepare(env, 110.0)
    assert policy.time_scale == pytest.approx(1.2 * math.exp(0.1 * 0.98))


def test_a_machine_budget_range_run_trains_at_the_profiles_range_rescaled_to_its_machine(tmp_path, monkeypatch):
    train = load_runner("train")
    backend = make_backend_from_config(config_from_dict(TINY))  # the dummy: its closed form is its profile
    at_profile = machine_budget_range(backend, {"low": 1.0, "medium": 1.0, "high": 1.0})
    monkeypatch.setattr(train, "measure_profile_drift", lambda backend: {"low": 0.5, "medium": 0.5, "high": 0.5})
    out = tmp_path / "run"
    config = tiny_config(tmp_path, env={**TINY["env"], "budget_range": "machine"}, train={"num_epochs": 1})
    train.main(["--config", str(config), "--output_dir", str(out)])
    ckpt = load_checkpoint(out)
    # the range the envs drew the budgets from and the budget encoder spans: the rule's on this machine
    assert ckpt["policy_meta"]["budget_range_ms"] == pytest.approx([v * 0.5 for v in at_profile])
    # a resumed run keeps the range it trained at, whatever the machine reads now
    monkeypatch.setattr(train, "measure_profile_drift", lambda backend: {"low": 2.0, "medium": 2.0, "high": 2.0})
    train.main(["--output_dir", str(out), "--num_epochs", "2", "--resume"])
    assert load_checkpoint(out)["policy_meta"]["budget_range_ms"] == pytest.approx([v * 0.5 for v in at_profile])

    monkeypatch.setattr(train, "measure_profile_drift", lambda backend: {"low": 0.5, "medium": 0.5, "high": 0.5})
    train.main(["--config", str(tiny_config(tmp_path, train={"num_epochs": 1})), "--output_dir", str(tmp_path / "p")])
    assert load_checkpoint(tmp_path / "p")["policy_meta"]["budget_range_ms"] == list(backend.budget_range_ms)


def test_a_bad_budget_range_setting_fails_naming_the_field():
    with pytest.raises(ValueError, match=r"env.budget_range='fast': expected one of \['profile', 'machine'\]"):
        check_budget_range(config_from_dict({**TINY, "env": {**TINY["env"], "budget_range": "fast"}}))
