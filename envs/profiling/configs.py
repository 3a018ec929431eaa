"""Static configurations: tier x top-k x num_blocks at insertion p = 1 (the minimum).

Block 0 runs at knob_space.first_block_top_k, the other blocks kept by envs.knobs.select_blocks
(importance, 1, N, L) at top-k: the plan is the executor's block_plan, exactly what a batch-1
episode runs. The budget token is a zero vector (a static configuration has no controller);
`ZERO_BUDGET_NOTE` is stored in profile.json's meta.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from envs.backends.vlm.executor import Step, block_plan
from envs.knobs import KnobSpace
from envs.profiling.checks import check_subset

ZERO_BUDGET_NOTE = (
    "static configurations run with a zero budget token (a d_model-wide zero vector at the last "
    "prefill position), since no controller is involved"
)
PROFILE_INSERTION = 1  # the minimum p: the knobs act on every block after block 0


@dataclass(frozen=True)
class StaticConfig:
    tier: str
    top_k: int
    num_blocks: int
    insertion: int = PROFILE_INSERTION

    @property
    def name(self) -> str:
        return f"{self.tier}/k{self.top_k}/N{self.num_blocks}"

    def plan(self, importance: Mapping[int, float], knob_space: KnobSpace, model_top_k: int) -> tuple[Step, ...]:
        """The (block, top-k) steps this configuration runs (as the backend's run_to + finish do)."""
        return block_plan(importance, self.insertion, self.top_k, self.num_blocks, knob_space.num_layers,
                          model_top_k, knob_space.first_block_top_k)


def static_configs(
    knob_space: KnobSpace,
    tiers: Sequence[str] | None = None,
    top_k: Sequence[int] | None = None,
    num_blocks: Sequence[int] | None = None,
) -> list[StaticConfig]:
    """tier x top-k x num_blocks at p = 1 (optionally a subset of each knob's values)."""
    tiers = check_subset("tiers", tiers, knob_space.tiers)
    ks = check_subset("top_k", top_k, knob_space.top_k_values)
    ns = check_subset("num_blocks", num_blocks, knob_space.num_blocks_values)
    return [StaticConfig(t, k, n) for t in tiers for k in ks for n in ns]
