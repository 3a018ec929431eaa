import gymnasium
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env
from torchrl.data import Bounded, Categorical, Unbounded

import envs  # noqa: F401  (registers BudgetVLM-v0)
from envs.gym_adapter import spec_to_space


def test_gymnasium_make_and_check_env():
    env = gymnasium.make("BudgetVLM-v0", backend="dummy")
    check_env(env.unwrapped, skip_render_check=True)


def test_spaces_are_the_torchrl_specs():
    gym_env = gymnasium.make("BudgetVLM-v0", backend="dummy").unwrapped
    spec = gym_env.env.action_spec[0]["action"]
    act = gym_env.action_space
    assert set(act.spaces) == set(spec.keys())
    assert act["tier"] == spaces.Discrete(spec["tier"].n)
    assert float(act["controller_ms"].high[0]) == float(spec["controller_ms"].space.high[0])
    assert act["budget_token"].shape == (gym_env.env.backend.d_model,) and np.isinf(act["budget_token"].high).all()
    obs = gym_env.observation_space
    assert set(obs.spaces) == {"language_feature", "budget_ms", "stage", "latency_token", "insertion", "elapsed_ms",
                               "remaining_ms"}
    assert obs["elapsed_ms"].low[0] == 0 and np.isinf(obs["remaining_ms"].low[0])  # over budget: remaining < 0
    assert obs["budget_ms"].low[0] == 0 and obs["insertion"].n == len(gym_env.env.knob_space.insertion_positions)


def test_spec_to_space_bounds_and_bad_spec():
    box = spec_to_space(Bounded(low=-2.0, high=3.0, shape=(4,)))
    assert box == spaces.Box(-2.0, 3.0, (4,), np.float32)
    assert spec_to_space(Unbounded(shape=(2,))).dtype == np.float32
    assert spec_to_space(Categorical(5, shape=(1,))) == spaces.Discrete(5)
    with pytest.raises(ValueError, match=r"categorical spec of shape \(3,\)"):
        spec_to_space(Categorical(5, shape=(3,)))


def test_two_step_episode_through_gym():
    env = gymnasium.make("BudgetVLM-v0", backend="dummy")
    obs, _ = env.reset(seed=3, options={"budget_ms": 100.0, "sample_index": 4})
    assert obs["stage"] == 0 and obs["budget_ms"][0] == 100.0
    first = env.action_space.sample()
    obs, reward, terminated, truncated, info = env.step(first)
    assert obs["stage"] == 1 and reward == 0.0 and not terminated
    # Stage 2 sees the time this request has spent, the caller's Stage-1 time included
    assert obs["elapsed_ms"][0] > float(first["controller_ms"][0])
    assert obs["remaining_ms"][0] == pytest.approx(100.0 - obs["elapsed_ms"][0], abs=1e-4)
    second = env.action_space.sample()
    obs, reward, terminated, truncated, info = env.step(second)
    assert terminated and not truncated
    assert set(info) >= {"accuracy", "latency_ms", "violation"}
    # both steps' controller times are charged to the request
    assert info["controller_ms"] == pytest.approx(float(first["controller_ms"][0]) + float(second["controller_ms"][0]),
                                                  rel=1e-5)
