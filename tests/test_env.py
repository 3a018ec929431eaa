import math

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from envs import make_env, reset_to
from agents.rollout import collect_rollouts
from policies import HierarchicalController


def _actor(env):
    b = env.backend
    return HierarchicalController(b.knob_space, b.language_dim, b.d_model, b.budget_range_ms, hidden_dim=32)


def test_check_env_specs():
    check_env_specs(make_env("dummy", batch_size=2, group_size=3, seed=1))


def test_groups_share_sample_and_budget():
    env = make_env("dummy", batch_size=3, group_size=4, seed=0)
    td = env.reset()
    for key in ("sample_index", "budget_ms", "group_id"):
        v = td[key].reshape(3, 4)
        assert (v == v[:, :1]).all(), key
    assert td["group_id"].reshape(3, 4)[:, 0].unique().numel() == 3
    lo, hi = env.backend.budget_range_ms
    assert ((td["budget_ms"] >= lo) & (td["budget_ms"] <= hi)).all()
    assert (td["stage"] == 0).all()


def test_two_steps_then_done_with_episode_info():
    env = make_env("dummy", batch_size=2, group_size=2, seed=0)
    traj = collect_rollouts(env, _actor(env))
    assert traj.shape == (4, 2)
    assert not traj["next", "done"][:, 0].any() and traj["next", "done"][:, 1].all()
    assert (traj["next", "stage"] == 1).all()
    assert (traj["next", "reward"][:, 0] == 0).all()
    info = traj["next", "episode"][:, 1]
    parts = sum(info[k] for k in ("preprocess_ms", "vision_ms", "prefill_ms", "decode_ms", "controller_ms"))
    assert torch.allclose(info["latency_ms"], parts, rtol=1e-5)
    # the controller time is both stages' own, each measured for this request by the policy
    assert torch.allclose(info["stage1_controller_ms"], traj["action", "controller_ms"][:, 0], rtol=1e-6)
    assert torch.allclose(info["stage2_controller_ms"], traj["action", "controller_ms"][:, 1], rtol=1e-6)
    assert torch.allclose(info["controller_ms"], info["stage1_controller_ms"] + info["stage2_controller_ms"])
    assert ((info["violation"] == 1) == (info["latency_ms"] > traj["budget_ms"][:, 0])).all()
    assert (info["controller_ms"] > 0).all()
    # Stage 2 sees the latency token of Stage 1's insertion choice.
    assert (traj["next", "insertion"][:, 0] == traj["action", "insertion"][:, 0]).all()
    assert (traj["next", "latency_token"][:, 0].abs().sum(-1) > 0).all()


def test_fixed_samples_and_budgets_through_reset_to():
    env = make_env("dummy", batch_size=2, group_size=1, seed=0)
    td = env.reset(reset_to(2, sample_index=[5, 7], budget_ms=[60.0, 90.0]))
    assert td["sample_index"].flatten().tolist() == [5, 7]
    assert td["budget_ms"].flatten().tolist() == [60.0, 90.0]


def test_observation_keys_are_not_reset_overrides():
    env = make_env("dummy", batch_size=4, group_size=1, seed=0)
    first = env.reset()
    # Resetting from the last observation (what an auto-reset forwards) draws new samples and budgets.
    second = env.reset(first.clone())
    assert not torch.equal(second["sample_index"], first["sample_index"])
    assert not torch.equal(second["budget_ms"], first["budget_ms"])


def test_unknown_reset_override_is_named():
    env = make_env("dummy", batch_size=1, group_size=1)
    bad = TensorDict({"reset_to": TensorDict(budget=torch.tensor([[60.0]]), batch_size=[1])}, batch_size=[1])
    with pytest.raises(KeyError, match=r"unknown reset override\(s\) \[\('reset_to', 'budget'\)\]"):
        env.reset(bad)


@pytest.mark.parametrize("budget", [0.0, -5.0, math.nan, math.inf])
def test_bad_budget_is_rejected(budget):
    env = make_env("dummy", batch_size=1, group_size=1)
    with pytest.raises(ValueError, match="budget_ms"):
        env.reset(reset_to(1, budget_ms=[budget]))


def test_out_of_range_sample_index_is_rejected():
    env = make_env("dummy", batch_size=1, group_size=1, num_samples=10)
    with pytest.raises(ValueError, match=r"sample_index=10 is out of range; expected 0 <= index < 10"):
        env.reset(reset_to(1, sample_index=[10]))


def _episode_starts(traj):
    """(sample_index, budget_ms) of every row at every Stage-1 step of a trajectory."""
    stage1 = traj["stage"].reshape(traj.shape) == 0
    return traj["sample_index"].reshape(traj.shape)[stage1], traj["budget_ms"].reshape(traj.shape)[stage1]


def test_auto_reset_draws_fresh_samples_and_budgets_every_episode():
    env = make_env("dummy", batch_size=3, group_size=1, seed=0)
    actor = _actor(env)
    td = env.reset()
    steps = []
    for _ in range(8):  # 4 episodes
        td = actor(td)
        step, td = env.step_and_maybe_reset(td)
        steps.append(step)
    traj = torch.stack(steps, dim=1)
    index, budget = _episode_starts(traj)
    assert index.numel() == 12
    assert budget.unique().numel() == 12 and index.unique().numel() >= 10


def test_collector_draws_fresh_samples_and_budgets_every_episode():
    from torchrl.collectors import Collector

    env = make_env("dummy", batch_size=2, group_size=2, seed=0)
    collector = Collector(env, _actor(env), frames_per_batch=4 * 10, total_frames=4 * 10)
    batch = next(iter(collector))
    collector.shutdown()
    index, budget = _episode_starts(batch)
    assert index.numel() == 4 * 5  # 5 episodes of 4 rows
    # One budget per group (2 groups) per episode, all different.
    assert budget.unique().numel() == 2 * 5 and index.unique().numel() >= 8


def test_action_outside_spec_is_rejected():
    env = make_env("dummy", batch_size=1, group_size=1)
    td = env.reset()
    td = _actor(env)(td)
    td["action", "tier"] = torch.tensor([[3]])
    with pytest.raises(ValueError, match=r"action 'tier'=3 is outside its spec; expected an index in \[0, 2\]"):
        env.step(td)


def test_unknown_backend_and_option():
    with pytest.raises(ValueError, match="backend='nope' is not known"):
        make_env("nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        make_env("dummy", colour="red")


def test_same_seed_same_episodes():
    def run(env_seed):
        torch.manual_seed(0)  # same policy weights and action draws
        env = make_env("dummy", batch_size=2, group_size=2, seed=env_seed)
        b = env.backend
        # A fixed controller time: the measured one is the only unseeded part of an episode.
        actor = HierarchicalController(b.knob_space, b.language_dim, b.d_model, b.budget_range_ms, hidden_dim=32,
                                       fixed_controller_ms=0.5)
        return collect_rollouts(env, actor)

    a, b, c = run(3), run(3), run(4)
    assert (a["next", "episode", "controller_ms"][:, 1] == 1.0).all()
    for key, value in a["next", "episode"].items():  # NaN: what a run without a shield did not predict
        torch.testing.assert_close(value, b["next", "episode", key], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(a["next", "reward"], b["next", "reward"])
    assert not torch.equal(a["budget_ms"], c["budget_ms"])


def test_unreadable_image_is_skipped_and_counted(monkeypatch):
    from envs.data import ImageLoadError, skipped_count

    env = make_env("dummy", batch_size=1, group_size=2, seed=0)
    real_start = env.backend.start_episode
    bad = {"index": None}

    def flaky_start(sample, tier, token):
        if bad["index"] is None:
            bad["index"] = sample.index
        if sample.index == bad["index"]:
            raise ImageLoadError(f"image of sample {sample.index} cannot be decoded")
        return real_start(sample, tier, token)

    monkeypatch.setattr(env.backend, "start_episode", flaky_start)
    before = skipped_count()
    traj = collect_rollouts(env, _actor(env))
    assert env.skipped_samples == 2 and skipped_count() == before + 2
    assert (traj["next", "done"][:, 1]).all()
    assert (traj["next", "sample_index"][:, 0] != bad["index"]).all()
