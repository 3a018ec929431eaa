"""A gymnasium view of one BudgetVLM episode (batch 1, group 1), registered as BudgetVLM-v0.

Observation and action are Dicts derived from the TorchRL env's specs (one source of truth for
bounds, shapes and dtypes): a one-value Categorical becomes a Discrete, a Bounded or Unbounded
spec a Box with the spec's bounds. Group ids and sample indices (GRPO bookkeeping) are left out of
the observation, and the finished episode's measurements go to `info`.

The episode has two steps: the first action's tier, insertion, budget_token and controller_ms (the
caller's own Stage-1 time) are used, the second's top_k, num_blocks and controller_ms (its Stage-2
time); both times count in the request's latency. Fields that do not act at a step are ignored.
The second observation's elapsed_ms / remaining_ms are the request's measured time so far (the
first action's controller_ms included) and the budget left.
"""
from __future__ import annotations

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical, Composite, TensorSpec, Unbounded

from envs.budget_env import EPISODE_INFO_KEYS, reset_to

# Observation entries a gym user does not act on.
HIDDEN_OBSERVATIONS = ("group_id", "sample_index", "episode")


def spec_to_space(spec: TensorSpec) -> spaces.Space:
    """One env row's TorchRL spec -> the gymnasium space with the same bounds, shape and dtype."""
    if isinstance(spec, Composite):
        return spaces.Dict({key: spec_to_space(value) for key, value in spec.items()})
    dtype = np.dtype(str(spec.dtype).removeprefix("torch."))
    if isinstance(spec, Categorical):
        if tuple(spec.shape) not in ((), (1,)):
            raise ValueError(f"categorical spec of shape {tuple(spec.shape)}: expected one value per row")
        return spaces.Discrete(spec.n)
    if isinstance(spec, Bounded):
        return spaces.Box(spec.space.low.numpy().astype(dtype), spec.space.high.numpy().astype(dtype),
                          tuple(spec.shape), dtype)
    if isinstance(spec, Unbounded):
        return spaces.Box(-np.inf, np.inf, tuple(spec.shape), dtype)
    raise TypeError(f"no gymnasium space for a {type(spec).__name__} spec")


def _to_gym(space: spaces.Space, value: torch.Tensor):
    if isinstance(space, spaces.Discrete):
        return int(value.reshape(-1)[0])
    return value.cpu().numpy().astype(space.dtype)


def _to_torch(space: spaces.Space, value) -> torch.Tensor:
    if isinstance(space, spaces.Discrete):
        return torch.as_tensor(int(value)).reshape(1, 1)
    return torch.as_tensor(np.asarray(value, dtype=space.dtype)).reshape(1, *space.shape)


class BudgetVLMGymEnv(gymnasium.Env):
    metadata = {"render_modes": []}

    def __init__(self, backend: str = "dummy", **overrides):
        from envs import make_env  # envs/__init__ registers this class, so import lazily

        overrides.update(batch_size=1, group_size=1)
        self.env = make_env(backend, **overrides)
        observation = self.env.observation_spec[0]
        self.observation_space = spaces.Dict(
            {k: spec_to_space(observation[k]) for k in observation.keys() if k not in HIDDEN_OBSERVATIONS}
        )
        self.action_space = spec_to_space(self.env.action_spec[0]["action"])
        self._td = None

    def _obs(self, td) -> dict:
        return {k: _to_gym(space, td[k][0]) for k, space in self.observation_space.spaces.items()}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.env.set_seed(int(seed))
        reset_td = None
        if options:
            reset_td = reset_to(1, sample_index=options.get("sample_index"), budget_ms=options.get("budget_ms"))
        self._td = self.env.reset(reset_td)
        return self._obs(self._td), {}

    def step(self, action):
        if self._td is None:
            raise RuntimeError("step() called before reset()")
        missing = set(self.action_space.spaces) - set(action)
        if missing:
            raise ValueError(f"action lacks {sorted(missing)}; expected keys {sorted(self.action_space.spaces)}")
        act = TensorDict({k: _to_torch(space, action[k]) for k, space in self.action_space.spaces.items()},
                         batch_size=[1])
        td = self._td.clone()
        td.set("action", act)
        out = self.env.step(td)["next"]
        terminated = bool(out["done"][0, 0])
        info = {k: float(out["episode", k][0, 0]) for k in EPISODE_INFO_KEYS} if terminated else {}
        self._td = None if terminated else out
        return self._obs(out), float(out["reward"][0, 0]), terminated, False, info
