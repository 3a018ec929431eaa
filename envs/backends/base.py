"""The protocol the environment drives for one episode.

An episode on a backend is, in order:
    language_feature(sample)                   question-only feature for Stage 1 (no vision)
    ep = start_episode(sample, tier, budget_token)
                                               preprocess + vision encode + build the prefill
                                               sequence, with the budget token appended at its end
    run_to(ep, insertion)                      decoder blocks 0..p-1; returns the latency token
    elapsed_ms(ep)                             measured time spent so far (Stage 2's elapsed input)
    finish(ep, top_k, num_blocks)              remaining blocks (reusing the first p blocks' KV
                                               cache) + greedy decode with the same config, no
                                               budget token in decode; frees the episode's state
Each member of a GRPO group is executed alone (batch size 1), so latency is measured per request.
The episode state is an explicit object because the env interleaves members: it runs Stage 1 and
run_to for all B x G members, the policy then picks Stage-2 actions for all, then each finishes.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from envs.knobs import KnobSpace

SPLITS = ("train", "val", "test")
# Phases whose measured time the backend reports; the env adds the Stage-2 controller's own time.
BACKEND_PHASES = ("preprocess", "vision", "prefill", "decode")


@dataclass
class EpisodeResult:
    """What finish() returns for one executed request."""

    answer: str
    accuracy: float  # in [0, 1], the dataset's own metric
    timings_ms: dict[str, float]  # one entry per BACKEND_PHASES name
    extras: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """A VLM (or a stand-in) that executes one request under the controller's knobs."""

    knob_space: KnobSpace
    d_model: int  # width of the budget token and the latency token
    language_dim: int  # width of the language feature
    budget_range_ms: tuple[float, float]  # training budgets are drawn uniformly from this range
    # Optional capabilities, declared so that callers ask instead of probing attributes:
    has_closed_form: bool = False  # exact expected_rewards(sample, budget_ms, weights) and config_grid(sample)
    results_dir: Path | None = None  # where the backend's profile.json and importance.json live
    rng: torch.Generator | None = None  # the backend's own randomness, seeded by the env and checkpointed

    @abc.abstractmethod
    def dataset(self, split: str) -> Sequence[Any]:
        """The samples of a split (one of SPLITS)."""

    @abc.abstractmethod
    def language_feature(self, sample: Any) -> torch.Tensor:
        """Feature of the question alone, shape (language_dim,)."""

    @abc.abstractmethod
    def start_episode(self, sample: Any, tier: str, budget_token: torch.Tensor) -> Any:
        """Start an episode: preprocess at `tier`, encode vision, append the budget token.

        Returns an opaque per-episode state (prefill sequence, KV cache, timings so far) that
        run_to and finish receive; several episodes may be open at once.
        """

    @abc.abstractmethod
    def run_to(self, episode: Any, insertion: int) -> torch.Tensor:
        """Run blocks 0..insertion-1; return the last position's hidden state, shape (d_model,)."""

    @abc.abstractmethod
    def elapsed_ms(self, episode: Any) -> float:
        """Measured time the episode has spent so far (after run_to: preprocess + vision + prefill
        of blocks 0..p-1), on the same meter as finish's timings; Stage 2 may read it."""

    @abc.abstractmethod
    def finish(self, episode: Any, top_k: int, num_blocks: int) -> EpisodeResult:
        """Run the rest of the prefill and the greedy decode under (top_k, num_blocks)."""

    def describe(self) -> dict:
        """JSON-able facts about the backend, stored with results and checkpoints."""
        return {
            "backend": type(self).__name__,
            "d_model": self.d_model,
            "language_dim": self.language_dim,
            "budget_range_ms": list(self.budget_range_ms),
            "knob_space": self.knob_space.to_dict(),
        }


def check_split(split: str, field: str = "split") -> str:
    if split not in SPLITS:
        raise ValueError(f"{field}={split!r} is not a known split; expected one of {SPLITS}")
    return split
