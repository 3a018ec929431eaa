"""A backend without a neural network whose optimal policy is known, for tests and smoke runs.

Each sample has hidden attributes: how much visual `detail` and how much `reasoning` its question
needs (both in [0, 1], drawn per family: coarse / detail / reasoning) and how many answer tokens
it decodes. Accuracy and latency are closed-form
functions of the knobs and these attributes:
  * detail is served by the tier (image resolution), reasoning by the compute after the insertion
    point (top-k and number of blocks), so both stages matter;
  * the language feature reveals detail well but reasoning only vaguely; the latency token
    reveals both (and the answer length), less noisily the deeper it is taken (larger p), and
    carries the budget token (as a residual stream would), so Stage 2 can read the budget;
  * latency has seeded multiplicative log-normal noise, so the budget must be met with a margin.
`expected_rewards` gives the expected reward of every configuration for a sample and budget, so
the optimal and the uniform-random policy's expected rewards are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from envs.backends.base import Backend, EpisodeResult, check_split
from envs.knobs import KnobSpace
from envs.reward import RewardWeights, compute_reward

FAMILIES = ("coarse", "detail", "reasoning")
_SPLIT_SEED_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_029}
# Gauss-Hermite nodes for the expectation over log-normal latency noise.
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(24)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()


@dataclass(frozen=True)
class DummySample:
    """One synthetic request; the attributes are hidden from the policy."""

    split: str
    index: int
    family: str
    detail: float
    reasoning: float
    answer_tokens: int
    language_noise: tuple[float, ...]  # what the question's wording does not reveal (fixed per sample)
    dataset: str = "dummy"

    @property
    def question_id(self) -> str:
        return f"{self.split}-{self.index}"


@dataclass
class _DummyEpisode:
    sample: DummySample
    tier_index: int
    budget_token: torch.Tensor
    insertion: int | None = None
    latency_factor: float = 1.0  # the episode's latency noise, drawn at run_to (elapsed_ms reads it)


class DummyBackend(Backend):
    """Closed-form stand-in for a MoE VLM (see module docstring)."""

    has_closed_form = True

    def __init__(
        self,
        knob_space: KnobSpace | Mapping | None = None,
        d_model: int = 64,
        language_dim: int = 32,
        budget_range_ms: Sequence[float] = (50.0, 180.0),
        num_samples: Mapping[str, int] | int | None = None,
        latency_noise: float = 0.05,
        seed: int = 0,
    ):
        self.knob_space = knob_space if isinstance(knob_space, KnobSpace) else KnobSpace.from_dict(knob_space)
        self.d_model = int(d_model)
        self.language_dim = int(language_dim)
        lo, hi = (float(v) for v in budget_range_ms)
        if not (0 < lo < hi < float("inf")):
            raise ValueError(f"budget_range_ms={list(budget_range_ms)}: expected 0 < lo < hi < inf")
        self.budget_range_ms = (lo, hi)
        if isinstance(num_samples, int) or num_samples is None:
            n = num_samples or 512
            num_samples = {"train": n, "val": max(n // 4, 1), "test": max(n // 2, 1)}
        for split, n in num_samples.items():
            check_split(split)
            if int(n) <= 0:
                raise ValueError(f"num_samples[{split!r}]={n}: expected a positive count")
        self.num_samples = {k: int(v) for k, v in num_samples.items()}
        if latency_noise < 0:
            raise ValueError(f"latency_noise={latency_noise}: expected >= 0")
        self.latency_noise = float(latency_noise)
        self.seed = int(seed)
        # Fixed random projections: the "frozen model" part of the stand-in.
        g = torch.Generator().manual_seed(self.seed + 7919)
        self._language_proj = torch.randn(self.language_dim, 3, generator=g)
        self._latency_proj = torch.randn(self.d_model, 5, generator=g)
        self._datasets: dict[str, list[DummySample]] = {}
        self.rng = torch.Generator().manual_seed(self.seed)

    # ----------------------------------------------------------------- data
    def dataset(self, split: str) -> list[DummySample]:
        check_split(split)
        if split not in self._datasets:
            n = self.num_samples.get(split, 0)
            rs = np.random.default_rng(self.seed * 7_777_777 + _SPLIT_SEED_OFFSET[split])
            self._datasets[split] = [self._draw_sample(rs, split, i) for i in range(n)]
        return self._datasets[split]

    def _draw_sample(self, rs: np.random.Generator, split: str, index: int) -> DummySample:
        # Three families, as in VQA: coarse questions need neither resolution nor compute,
        # detail questions need resolution, reasoning questions need compute. A policy that
        # knows only the budget must compromise between them.
        family = FAMILIES[int(rs.integers(len(FAMILIES)))]
        low, high = rs.uniform(0.0, 0.25), rs.uniform(0.65, 1.0)
        detail, reasoning = {"coarse": (low, rs.uniform(0, 0.25)), "detail": (high, low), "reasoning": (low, high)}[family]
        return DummySample(
            split=split,
            index=index,
            family=family,
            detail=float(detail),
            reasoning=float(reasoning),
            answer_tokens=int(rs.integers(1, 7)),
            language_noise=tuple(float(x) for x in rs.standard_normal(2 + self.language_dim)),
        )

    def language_feature(self, sample: DummySample) -> torch.Tensor:
        noise = torch.tensor(sample.language_noise)
        seen = torch.tensor([sample.detail + 0.05 * noise[0], sample.reasoning + 0.5 * noise[1], 1.0])
        return self._language_proj @ seen + 0.05 * noise[2:]

    # ------------------------------------------------------- closed forms
    def _tier_fraction(self, tier_index):
        n = len(self.knob_space.tiers)
        return tier_index / (n - 1) if n > 1 else 1.0

    def _model(self, sample: DummySample, tier, p, k, nb):
        """Expected accuracy and noise-free latency parts (ms) for knob values (broadcastable
        tensors: tier as a fraction of the tier range, p, k, N as values)."""
        ks = self.knob_space
        k_max, k_min = max(ks.top_k_values), min(ks.top_k_values)
        n_min, n_max = min(ks.num_blocks_values), max(ks.num_blocks_values)
        first_k = float(ks.first_block_top_k)

        resolution = 0.2 + 0.8 * tier
        mean_k = (p * first_k + (nb - p) * k) / nb  # blocks before p run at full top-k
        capacity = 0.5 * (mean_k - k_min) / max(k_max - k_min, 1) + 0.5 * (nb - n_min) / max(n_max - n_min, 1)
        accuracy = (
            0.97
            * torch.sigmoid(10 * (resolution - sample.detail) + 1.5)
            * torch.sigmoid(10 * (capacity - sample.reasoning) + 1.5)
        )
        # Work per block grows with the experts run; each phase scales with the blocks run.
        run_cost = p + (nb - p) * (0.4 + 0.6 * k / first_k)
        tokens = 24 + 152 * tier
        latency = {
            "preprocess": 0.5 + 3.0 * tier,
            "vision": 5.0 + 30.0 * tier,
            "prefill": 0.02 * tokens * run_cost,
            "decode": 0.9 * sample.answer_tokens * run_cost,
        }
        return accuracy, latency

    def config_grid(self, sample: DummySample):
        """Expected accuracy and noise-free latency parts over the (tier, p, k, N) grid."""
        ks = self.knob_space
        axes = [
            torch.tensor([self._tier_fraction(i) for i in range(len(ks.tiers))], dtype=torch.float64),
            torch.tensor(ks.insertion_positions, dtype=torch.float64),
            torch.tensor(ks.top_k_values, dtype=torch.float64),
            torch.tensor(ks.num_blocks_values, dtype=torch.float64),
        ]
        return self._model(sample, *torch.meshgrid(*axes, indexing="ij"))

    def _complexity_grid(self) -> torch.Tensor:
        ks = self.knob_space
        c = torch.tensor(
            [
                [[ks.complexity(t, kk, n) for n in ks.num_blocks_values] for kk in ks.top_k_values]
                for t in range(len(ks.tiers))
            ],
            dtype=torch.float64,
        )
        return c[:, None, :, :]  # insertion has no knob cost

    def expected_rewards(
        self, sample: DummySample, budget_ms: float, weights: RewardWeights = RewardWeights()
    ) -> torch.Tensor:
        """Expected reward of every config, shape (tiers, insertions, top_k values, num_blocks values).

        Expectation over the latency noise (Gauss-Hermite) and the accuracy draw; the Stage-2
        controller's own time (well under 1 ms) is not part of it.
        """
        accuracy, parts = self.config_grid(sample)
        latency = sum(parts.values())
        factors = torch.exp(self.latency_noise * torch.tensor(_GH_NODES, dtype=torch.float64))
        rewards = compute_reward(
            accuracy[..., None],
            latency[..., None] * factors,
            torch.tensor(float(budget_ms), dtype=torch.float64),
            self._complexity_grid()[..., None],
            weights,
        )
        return (rewards * torch.tensor(_GH_WEIGHTS, dtype=torch.float64)).sum(-1)

    # -------------------------------------------------------------- episode
    def start_episode(self, sample: DummySample, tier: str, budget_token: torch.Tensor) -> _DummyEpisode:
        if tier not in self.knob_space.tiers:
            raise ValueError(f"tier={tier!r} is not known; expected one of {self.knob_space.tiers}")
        if budget_token.shape != (self.d_model,):
            raise ValueError(f"budget_token has shape {tuple(budget_token.shape)}; expected ({self.d_model},)")
        return _DummyEpisode(sample, self.knob_space.tiers.index(tier), budget_token.detach().float().cpu())

    def run_to(self, episode: _DummyEpisode, insertion: int) -> torch.Tensor:
        if insertion not in self.knob_space.insertion_positions:
            raise ValueError(
                f"insertion={insertion} is not allowed; expected one of {self.knob_space.insertion_positions}"
            )
        episode.insertion = insertion
        s = episode.sample
        p_max = max(self.knob_space.insertion_positions)
        hidden = torch.tensor(
            [s.detail, s.reasoning, (s.answer_tokens - 3.5) / 2.5, self._tier_fraction(episode.tier_index), insertion / p_max]
        )
        noise = torch.randn(self.d_model, generator=self.rng) * (0.3 / insertion)
        episode.latency_factor = float(torch.exp(self.latency_noise * torch.randn((), generator=self.rng)))
        return self._latency_proj @ hidden + episode.budget_token + noise

    def elapsed_ms(self, episode: _DummyEpisode) -> float:
        """Preprocess + vision + prefill of blocks 0..p-1 (full top-k), with the episode's noise."""
        if episode.insertion is None:
            raise RuntimeError("elapsed_ms() called before run_to()")
        p = float(episode.insertion)
        # The model's phases with the first p blocks as the whole run (num_blocks = p).
        knobs = (self._tier_fraction(episode.tier_index), p, float(self.knob_space.first_block_top_k), p)
        _, parts = self._model(episode.sample, *(torch.tensor(v, dtype=torch.float64) for v in knobs))
        return float(parts["preprocess"] + parts["vision"] + parts["prefill"]) * episode.latency_factor

    def finish(self, episode: _DummyEpisode, top_k: int, num_blocks: int) -> EpisodeResult:
        ks = self.knob_space
        if episode.insertion is None:
            raise RuntimeError("finish() called before run_to(): the latency token was never taken")
        if top_k not in ks.top_k_values:
            raise ValueError(f"top_k={top_k} is not allowed; expected one of {ks.top_k_values}")
        if num_blocks not in ks.num_blocks_values:
            raise ValueError(f"num_blocks={num_blocks} is not allowed; expected one of {ks.num_blocks_values}")
        knobs = (self._tier_fraction(episode.tier_index), episode.insertion, top_k, num_blocks)
        accuracy, parts = self._model(episode.sample, *(torch.tensor(float(v), dtype=torch.float64) for v in knobs))
        expected_accuracy = float(accuracy)
        correct = float(torch.rand((), generator=self.rng) < expected_accuracy)
        return EpisodeResult(
            answer="correct" if correct else "wrong",
            accuracy=correct,
            timings_ms={name: float(t) * episode.latency_factor for name, t in parts.items()},
            extras={"expected_accuracy": expected_accuracy},
        )

    def describe(self) -> dict:
        return {**super().describe(), "latency_noise": self.latency_noise, "seed": self.seed}
