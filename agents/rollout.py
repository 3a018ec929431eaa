"""Collect one batch of two-step episodes from the env with the controller."""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type


def collect_rollouts(env, actor, reset_td: TensorDictBase | None = None, greedy: bool = False) -> TensorDictBase:
    """Run every env row for one episode; returns a (N, 2) TensorDict (step 1, step 2).

    reset_td may fix "sample_index" and "budget_ms" per row (evaluation on held-out samples).
    """
    mode = ExplorationType.DETERMINISTIC if greedy else ExplorationType.RANDOM
    with torch.no_grad(), set_exploration_type(mode):
        td = env.reset(reset_td)
        return env.rollout(2, policy=actor, tensordict=td, auto_reset=False, break_when_any_done=False)
