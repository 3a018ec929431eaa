"""The two-step TorchRL environment of the latency-budget controller.

Episode (per batch row; rows are B samples x G group members, each executed alone):
  reset  -> Stage-1 observation: language feature, budget (ms), stage = 0
  step 1 -> action (tier, insertion, budget_token, controller_ms): preprocess + vision + blocks
            0..p-1; Stage-2 observation: latency token, insertion, elapsed_ms (the measured time
            this request has spent: preprocess + vision + prefill of blocks 0..p-1 + Stage 1's
            controller time), remaining_ms (budget - elapsed, < 0 once over), stage = 1; reward 0
  step 2 -> action (top_k, num_blocks, controller_ms): rest of prefill + decode;
            terminal reward, done, and the episode's info under "episode"
With a latency shield (envs/shield.py) each step executes the nearest plan its table says fits
the budget; the episode info records the plan that ran. Each stage's controller time for the
request is measured by the policy (at batch size 1) and passed in as that step's `controller_ms`:
it is part of the request's latency but runs outside the env. The shield's decision at each step is
the controller's too, so the env times it and adds it to that stage's controller time (the value
shield's two decisions: 0.13-0.20 ms an episode on the 2-core VM, docs/BENCHMARKS.md 2c). The
latency is preprocess + vision + prefill + decode + both stages' controller time.

Resets draw each group's sample and budget from the env's generator. A caller fixes them only
through the explicit keys ("reset_to", "sample_index") and ("reset_to", "budget_ms") (see
`reset_to`): the observation keys of the same names are never read back, so an auto-reset that
forwards the last observation (a collector, `step_and_maybe_reset`) still draws fresh ones.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from envs.backends.base import Backend, EpisodeResult, check_split
from envs.data.sample import ImageLoadError
from envs.data.vqa import record_skipped
from envs.reward import RewardWeights, check_budget, compute_reward
from envs.shield import LatencyShield

ACTION_HEADS = ("tier", "insertion", "top_k", "num_blocks")
STAGE1_HEADS = ("tier", "insertion")
STAGE2_HEADS = ("top_k", "num_blocks")
EPISODE_INFO_KEYS = (
    "accuracy",
    "latency_ms",
    "preprocess_ms",
    "vision_ms",
    "prefill_ms",
    "decode_ms",
    "controller_ms",  # both stages
    "stage1_controller_ms",
    "stage2_controller_ms",
    "elapsed_ms",  # the measured time before Stage 2 (Stage 1's controller included), Stage 2's elapsed input
    "violation",
    # The plan that ran (knob indices): the action, unless the latency shield changed it (envs/shield.py).
    "tier_index",
    "insertion_index",
    "top_k_index",
    "num_blocks_index",
    "shielded",  # 1: the shield changed a knob of this episode (the insertion pin included)
    "shield_cut",  # 1: it lowered the tier, top-k or blocks to fit the budget
    # What the shield's Stage-2 decision read for the plan that ran (NaN: no shield, or one without values):
    "shield_risk",  # its P(latency > budget), to hold against the measured violation
    "shield_price",  # the price of a violation in accuracy
)
# How many other samples to try when a sample's image cannot be loaded.
_MAX_IMAGE_RETRIES = 32
RESET_TO = "reset_to"
RESET_TO_KEYS = ("sample_index", "budget_ms")


def reset_to(batch_size: int, sample_index=None, budget_ms=None) -> TensorDict:
    """The reset input that fixes each row's sample and/or budget: (batch_size,) or (batch_size, 1)
    values under ("reset_to", "sample_index") and ("reset_to", "budget_ms")."""
    values = {k: v for k, v in (("sample_index", sample_index), ("budget_ms", budget_ms)) if v is not None}
    return TensorDict({RESET_TO: TensorDict({k: torch.as_tensor(v).reshape(batch_size, 1) for k, v in values.items()},
                                            batch_size=[batch_size])}, batch_size=[batch_size])


class BudgetVLMEnv(EnvBase):
    """Batched two-step env over a Backend; batch_size = [batch_size * group_size]."""

    def __init__(
        self,
        backend: Backend,
        batch_size: int = 8,
        group_size: int = 5,
        split: str = "train",
        reward_weights: RewardWeights | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        samples: Sequence[Any] | None = None,
        shield: LatencyShield | None = None,
    ):
        """samples: serve these requests instead of the backend's `split` (e.g. one user request);
        shield: the latency shield the episodes' plans pass through (None: the actions run as given).
        `env.shield` may be set later (an evaluation gives each policy its own)."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        if int(group_size) < 1:
            raise ValueError(f"group_size={group_size}: expected >= 1")
        self.num_groups = int(batch_size)
        self.group_size = int(group_size)
        n = self.num_groups * self.group_size
        super().__init__(batch_size=torch.Size([n]), device=device)
        self.backend = backend
        self.split = check_split(split)
        self.samples = backend.dataset(split) if samples is None else list(samples)
        if len(self.samples) == 0:
            raise ValueError(f"backend {type(backend).__name__} has no samples in split {split!r}"
                             if samples is None else "samples=[]: expected at least one sample")
        self.reward_weights = reward_weights or RewardWeights()
        self.knob_space = backend.knob_space
        self.shield = shield
        self.budget_lo, self.budget_hi = backend.budget_range_ms
        self.skipped_samples = 0
        self._episodes: list[Any] = [None] * n
        # Each row's last finished EpisodeResult (answer text, extras), for callers that need more
        # than the numbers in the episode info.
        self.last_results: list[EpisodeResult | None] = [None] * n
        self._sample_index = torch.zeros(n, dtype=torch.long)
        self._budget = torch.zeros(n, dtype=torch.float32)
        # Stage-1 choices of each row's open episode, needed again at Stage 2.
        self._tier_index = torch.zeros(n, dtype=torch.long)
        self._insertion_index = torch.zeros(n, dtype=torch.long)
        self._stage1_controller_ms = torch.zeros(n)
        self._stage1_shielded = torch.zeros(n, dtype=torch.bool)
        self._requested_tier = torch.zeros(n, dtype=torch.long)  # Stage 1's chosen tier (the shield's request)
        self._stage1_cut = torch.zeros(n, dtype=torch.bool)
        self._elapsed_ms = torch.zeros(n)  # measured at the end of Stage 1, Stage 2's elapsed input
        self._group_id = torch.arange(n) // self.group_size
        self._language = torch.zeros(n, backend.language_dim)
        self._next_group_id = 0
        self.rng = torch.Generator()  # budget and sample draws; checkpointed by the runner
        self._make_specs()
        self._set_seed(seed)

    # ----------------------------------------------------------------- specs
    def _make_specs(self) -> None:
        n = self.batch_size
        ks = self.knob_space
        d, dl = self.backend.d_model, self.backend.language_dim
        self.observation_spec = Composite(
            language_feature=Unbounded(shape=(*n, dl)),
            budget_ms=Bounded(low=0.0, high=float("inf"), shape=(*n, 1)),
            stage=Categorical(2, shape=(*n, 1)),
            latency_token=Unbounded(shape=(*n, d)),
            insertion=Categorical(len(ks.insertion_positions), shape=(*n, 1)),
            elapsed_ms=Bounded(low=0.0, high=float("inf"), shape=(*n, 1)),
            remaining_ms=Unbounded(shape=(*n, 1)),
            group_id=Unbounded(shape=(*n, 1), dtype=torch.long),
            sample_index=Unbounded(shape=(*n, 1), dtype=torch.long),
            episode=Composite(
                {k: Unbounded(shape=(*n, 1)) for k in EPISODE_INFO_KEYS}, shape=n
            ),
            shape=n,
        )
        heads = ks.head_sizes
        self.action_spec = Composite(
            action=Composite(
                **{h: Categorical(heads[h], shape=(*n, 1)) for h in ACTION_HEADS},
                budget_token=Unbounded(shape=(*n, d)),
                controller_ms=Bounded(low=0.0, high=1e3, shape=(*n, 1)),
                shape=n,
            ),
            shape=n,
        )
        self.reward_spec = Unbounded(shape=(*n, 1))

    # ----------------------------------------------------------------- reset
    def _set_seed(self, seed: int | None) -> None:
        seed = 0 if seed is None else int(seed)
        self.rng.manual_seed(seed)
        if self.backend.rng is not None:
            self.backend.rng.manual_seed(seed + 1)

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        n = self.batch_size[0]
        mask = torch.ones(n, dtype=torch.bool)
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict["_reset"].reshape(n).cpu()
        rows = mask.nonzero().flatten()
        given = self._reset_overrides(tensordict)
        given_index, given_budget = given.get("sample_index"), given.get("budget_ms")

        if given_budget is not None:
            budgets = given_budget.reshape(n).float().cpu()
            check_budget(budgets[rows], "budget_ms")
        else:
            budgets = self._draw_group_values(
                lambda g: torch.empty(g).uniform_(self.budget_lo, self.budget_hi, generator=self.rng)
            )
        if given_index is not None:
            index = given_index.reshape(n).long().cpu()
            bad = (index[rows] < 0) | (index[rows] >= len(self.samples))
            if bool(bad.any()):
                raise ValueError(
                    f"sample_index={int(index[rows][bad][0])} is out of range; expected 0 <= index < "
                    f"{len(self.samples)} (split {self.split!r})"
                )
        else:
            index = self._draw_group_values(
                lambda g: torch.randint(len(self.samples), (g,), generator=self.rng)
            )
        if bool(mask.all()):  # a fresh batch of groups gets fresh group ids
            self._group_id = torch.arange(n) // self.group_size + self._next_group_id
            self._next_group_id += self.num_groups
        for i in rows.tolist():
            self._episodes[i] = None
            self._sample_index[i] = index[i]
            self._budget[i] = budgets[i]
            self._insertion_index[i] = 0
            self._stage1_controller_ms[i] = 0.0
            self._stage1_shielded[i] = self._stage1_cut[i] = False
            self._elapsed_ms[i] = 0.0
            self._language[i] = self._load_language(i)
        return self._observation(stage=torch.zeros(n, 1, dtype=torch.long))

    def _reset_overrides(self, tensordict: TensorDictBase | None) -> dict:
        if tensordict is None or RESET_TO not in tensordict.keys():
            return {}
        given = tensordict.get(RESET_TO)
        unknown = sorted(set(given.keys()) - set(RESET_TO_KEYS))
        if unknown:
            raise KeyError(f"unknown reset override(s) {[(RESET_TO, k) for k in unknown]}; expected "
                           f"{[(RESET_TO, k) for k in RESET_TO_KEYS]}")
        return {k: given.get(k) for k in given.keys()}

    def resume_state(self) -> dict:
        """What a resumed run needs to draw the same samples, budgets and group ids (plain values)."""
        return {"rng": self.rng.get_state(), "next_group_id": self._next_group_id,
                "skipped_samples": self.skipped_samples}

    def load_resume_state(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self._next_group_id = int(state["next_group_id"])
        self.skipped_samples = int(state["skipped_samples"])

    def _draw_group_values(self, draw) -> torch.Tensor:
        """One value per group, repeated for its G members (same sample and budget)."""
        return draw(self.num_groups).repeat_interleave(self.group_size)

    def _load_language(self, row: int) -> torch.Tensor:
        return self.backend.language_feature(self.samples[int(self._sample_index[row])]).float().cpu()

    def _observation(self, stage, latency_token=None, insertion=None, info=None) -> TensorDict:
        n = self.batch_size[0]
        budget = self._budget.reshape(n, 1)
        elapsed = self._elapsed_ms.reshape(n, 1)
        return TensorDict(
            language_feature=self._language.clone(),
            budget_ms=budget.clone(),
            elapsed_ms=elapsed.clone(),
            remaining_ms=budget - elapsed,
            stage=stage,
            latency_token=latency_token if latency_token is not None else torch.zeros(n, self.backend.d_model),
            insertion=insertion if insertion is not None else torch.zeros(n, 1, dtype=torch.long),
            group_id=self._group_id.reshape(n, 1).clone(),
            sample_index=self._sample_index.reshape(n, 1).clone(),
            episode=TensorDict(
                {k: (info[k] if info is not None else torch.zeros(n, 1)) for k in EPISODE_INFO_KEYS},
                batch_size=[n],
            ),
            batch_size=[n],
            device=self.device,
        )

    # ------------------------------------------------------------------ step
    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        n = self.batch_size[0]
        stage = tensordict["stage"].reshape(n).cpu()
        action = tensordict["action"].cpu()
        self._check_action(action)
        latency_token = torch.zeros(n, self.backend.d_model)
        reward = torch.zeros(n, 1)
        done = torch.zeros(n, 1, dtype=torch.bool)
        info = {k: torch.zeros(n, 1) for k in EPISODE_INFO_KEYS}
        for i in range(n):
            if int(stage[i]) == 0:
                latency_token[i] = self._run_stage1(i, action[i])
            else:
                result_info, reward[i, 0] = self._run_stage2(i, action[i])
                for k, v in result_info.items():
                    info[k][i, 0] = v
                done[i, 0] = True
        out = self._observation(stage=torch.ones(n, 1, dtype=torch.long), latency_token=latency_token,
                                insertion=self._insertion_index.reshape(n, 1).clone(), info=info)
        out.set("reward", reward.to(self.device))
        out.set("done", done.to(self.device))
        out.set("terminated", done.to(self.device))
        return out

    def _check_action(self, action: TensorDictBase) -> None:
        sizes = self.knob_space.head_sizes
        for head in ACTION_HEADS:
            value = action[head]
            bad = (value < 0) | (value >= sizes[head])
            if bool(bad.any()):
                raise ValueError(
                    f"action {head!r}={int(value[bad][0])} is outside its spec; expected an index in "
                    f"[0, {sizes[head] - 1}]"
                )
        token = action["budget_token"]
        if not bool(torch.isfinite(token).all()):
            raise ValueError("action 'budget_token' holds NaN or inf; expected finite values")
        ms = action["controller_ms"]
        if not bool((torch.isfinite(ms) & (ms >= 0)).all()):
            raise ValueError(f"action 'controller_ms'={ms[~(torch.isfinite(ms) & (ms >= 0))][0].item()}: expected a finite time >= 0")

    def _run_stage1(self, row: int, action: TensorDictBase):
        ks = self.knob_space
        tier_index, p_index = int(action["tier"]), int(action["insertion"])
        self._requested_tier[row] = tier_index
        shield_ms = 0.0
        if self.shield is not None:
            start = time.perf_counter()
            tier_index, p_index = self.shield.stage1(tier_index, p_index, float(self._budget[row]))
            shield_ms = (time.perf_counter() - start) * 1e3
            self._stage1_shielded[row] = (tier_index, p_index) != (int(action["tier"]), int(action["insertion"]))
            self._stage1_cut[row] = tier_index != int(action["tier"])
        tier = ks.tiers[tier_index]
        for _ in range(_MAX_IMAGE_RETRIES):
            sample = self.samples[int(self._sample_index[row])]
            try:
                episode = self.backend.start_episode(sample, tier, action["budget_token"].float())
                break
            except ImageLoadError as err:
                self._skip_sample(row, err)
        else:
            raise RuntimeError(f"{_MAX_IMAGE_RETRIES} samples in a row had unreadable images in split {self.split!r}")
        self._episodes[row] = episode
        self._stage1_controller_ms[row] = float(action["controller_ms"]) + shield_ms
        self._tier_index[row] = tier_index
        self._insertion_index[row] = p_index
        token = self.backend.run_to(episode, ks.insertion_positions[p_index])
        token = token.detach().float().cpu()  # the copy waits for the device, so elapsed is complete
        self._elapsed_ms[row] = self.backend.elapsed_ms(episode) + self._stage1_controller_ms[row]
        return token

    def _skip_sample(self, row: int, err: Exception) -> None:
        """Replace an unreadable sample by another one; counted (env.skipped_samples and the
        dataset-wide counter of envs.data) and logged once, never scored as a silent zero."""
        self.skipped_samples += 1
        record_skipped(self.samples[int(self._sample_index[row])], err)
        self._sample_index[row] = int(torch.randint(len(self.samples), (1,), generator=self.rng))
        self._language[row] = self._load_language(row)

    def _run_stage2(self, row: int, action: TensorDictBase):
        ks = self.knob_space
        episode = self._episodes[row]
        if episode is None:
            raise RuntimeError(f"row {row}: Stage-2 step without a Stage-1 step; call reset() first")
        chosen = int(action["top_k"]), int(action["num_blocks"])
        k_index, n_index = chosen
        shield_ms = 0.0
        if self.shield is not None:
            start = time.perf_counter()
            k_index, n_index = self.shield.stage2(int(self._tier_index[row]), *chosen, float(self._budget[row]),
                                                  requested_tier=int(self._requested_tier[row]),
                                                  elapsed_ms=float(self._elapsed_ms[row]))
            shield_ms = (time.perf_counter() - start) * 1e3
        cut = bool(self._stage1_cut[row]) or (k_index, n_index) != chosen
        shielded = bool(self._stage1_shielded[row]) or cut
        top_k, num_blocks = ks.top_k_values[k_index], ks.num_blocks_values[n_index]
        result = self.backend.finish(episode, top_k, num_blocks)
        self._episodes[row] = None
        self.last_results[row] = result
        stage1_ms, stage2_ms = float(self._stage1_controller_ms[row]), float(action["controller_ms"]) + shield_ms
        controller_ms = stage1_ms + stage2_ms
        t = result.timings_ms
        latency = t["preprocess"] + t["vision"] + t["prefill"] + t["decode"] + controller_ms
        budget = float(self._budget[row])
        if self.shield is not None:  # a tracking shield's table and margins follow what ran (envs/shield.py)
            self.shield.observe(int(self._tier_index[row]), k_index, n_index, float(latency), budget,
                                elapsed_ms=float(self._elapsed_ms[row]))
        complexity = ks.complexity(int(self._tier_index[row]), top_k, num_blocks)
        reward = compute_reward(
            torch.tensor(result.accuracy), torch.tensor(latency), torch.tensor(budget),
            torch.tensor(complexity), self.reward_weights,
        )
        info = {
            "accuracy": result.accuracy,
            "latency_ms": latency,
            "preprocess_ms": t["preprocess"],
            "vision_ms": t["vision"],
            "prefill_ms": t["prefill"],
            "decode_ms": t["decode"],
            "controller_ms": controller_ms,
            "stage1_controller_ms": stage1_ms,
            "stage2_controller_ms": stage2_ms,
            "elapsed_ms": float(self._elapsed_ms[row]),
            "violation": float(latency > budget),
            "tier_index": float(self._tier_index[row]),
            "insertion_index": float(self._insertion_index[row]),
            "top_k_index": float(k_index),
            "num_blocks_index": float(n_index),
            "shielded": float(shielded),
            "shield_cut": float(cut),
            "shield_risk": math.nan if self.shield is None else self.shield.last_risk,
            "shield_price": math.nan if self.shield is None else self.shield.last_price,
        }
        return info, float(reward)
