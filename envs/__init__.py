"""BudgetVLM environments: the two-step latency-budget controller env, its backends, a gym adapter."""
from __future__ import annotations

from typing import Mapping

import gymnasium

from envs.backends import Backend, make_backend
from envs.budget_env import ACTION_HEADS, EPISODE_INFO_KEYS, STAGE1_HEADS, STAGE2_HEADS, BudgetVLMEnv, reset_to
from envs.knobs import KnobSpace, select_blocks
from envs.reward import RewardWeights, compute_reward

_ENV_OPTIONS = ("batch_size", "group_size", "split", "seed", "device")


def make_env(backend: str | Backend = "dummy", reward: Mapping | RewardWeights | None = None, **overrides) -> BudgetVLMEnv:
    """Build the two-step env; env options (batch_size, group_size, split, seed, device) and the
    reward weights are taken from `overrides`, every other keyword goes to the backend."""
    env_kwargs = {k: overrides.pop(k) for k in _ENV_OPTIONS if k in overrides}
    if isinstance(backend, str):
        backend = make_backend(backend, **overrides)
    elif overrides:
        raise ValueError(f"backend options {sorted(overrides)} given with an already built backend")
    weights = reward if isinstance(reward, RewardWeights) else RewardWeights.from_dict(reward)
    return BudgetVLMEnv(backend, reward_weights=weights, **env_kwargs)


if "BudgetVLM-v0" not in gymnasium.registry:
    gymnasium.register(id="BudgetVLM-v0", entry_point="envs.gym_adapter:BudgetVLMGymEnv")

__all__ = [
    "ACTION_HEADS",
    "EPISODE_INFO_KEYS",
    "STAGE1_HEADS",
    "STAGE2_HEADS",
    "BudgetVLMEnv",
    "KnobSpace",
    "RewardWeights",
    "compute_reward",
    "make_backend",
    "make_env",
    "reset_to",
    "select_blocks",
]
