import gymnasium
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers BudgetVLM-v0)


def test_gymnasium_make_and_check_env():
    env = gymnasium.make("BudgetVLM-v0", backend="dummy")
    check_env(env.unwrapped, skip_render_check=True)


def test_two_step_episode_through_gym():
    env = gymnasium.make("BudgetVLM-v0", backend="dummy")
    obs, _ = env.reset(seed=3, options={"budget_ms": 100.0, "sample_index": 4})
    assert obs["stage"] == 0 and obs["budget_ms"][0] == 100.0
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs["stage"] == 1 and reward == 0.0 and not terminated
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert terminated and not truncated
    assert set(info) >= {"accuracy", "latency_ms", "violation"}
