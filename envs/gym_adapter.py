"""A gymnasium view of one BudgetVLM episode (batch 1, group 1), registered as BudgetVLM-v0.

Observation and action are Dicts. The episode has two steps: the first action's tier, insertion
and budget_token are used, the second's top_k, num_blocks and controller_ms (the caller's own
Stage-2 time, part of the latency); fields that do not act at a step are ignored there.
"""
from __future__ import annotations

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from tensordict import TensorDict

from envs.budget_env import ACTION_HEADS, EPISODE_INFO_KEYS, reset_to


class BudgetVLMGymEnv(gymnasium.Env):
    metadata = {"render_modes": []}

    def __init__(self, backend: str = "dummy", **overrides):
        from envs import make_env  # envs/__init__ registers this class, so import lazily

        overrides.update(batch_size=1, group_size=1)
        self.env = make_env(backend, **overrides)
        b = self.env.backend
        ks = self.env.knob_space
        sizes = ks.head_sizes
        self.observation_space = spaces.Dict(
            {
                "language_feature": spaces.Box(-np.inf, np.inf, (b.language_dim,), np.float32),
                "budget_ms": spaces.Box(0.0, np.inf, (1,), np.float32),
                "budget_norm": spaces.Box(-np.inf, np.inf, (1,), np.float32),
                "stage": spaces.Discrete(2),
                "latency_token": spaces.Box(-np.inf, np.inf, (b.d_model,), np.float32),
                "insertion": spaces.Discrete(sizes["insertion"]),
            }
        )
        self.action_space = spaces.Dict(
            {
                **{h: spaces.Discrete(sizes[h]) for h in ACTION_HEADS},
                "budget_token": spaces.Box(-10.0, 10.0, (b.d_model,), np.float32),
                "controller_ms": spaces.Box(0.0, 100.0, (1,), np.float32),
            }
        )
        self._td = None

    def _obs(self, td) -> dict:
        return {
            "language_feature": td["language_feature"][0].numpy().astype(np.float32),
            "budget_ms": td["budget_ms"][0].numpy().astype(np.float32),
            "budget_norm": td["budget_norm"][0].numpy().astype(np.float32),
            "stage": int(td["stage"][0, 0]),
            "latency_token": td["latency_token"][0].numpy().astype(np.float32),
            "insertion": int(td["insertion"][0, 0]),
        }

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
        act = TensorDict(
            {
                **{h: torch.as_tensor(int(action[h])).reshape(1, 1) for h in ACTION_HEADS},
                "budget_token": torch.as_tensor(np.asarray(action["budget_token"], dtype=np.float32)).reshape(1, -1),
                "controller_ms": torch.as_tensor(np.asarray(action["controller_ms"], dtype=np.float32)).reshape(1, 1),
            },
            batch_size=[1],
        )
        td = self._td.clone()
        td.set("action", act)
        out = self.env.step(td)["next"]
        terminated = bool(out["done"][0, 0])
        info = {k: float(out["episode", k][0, 0]) for k in EPISODE_INFO_KEYS} if terminated else {}
        self._td = None if terminated else out
        return self._obs(out), float(out["reward"][0, 0]), terminated, False, info
