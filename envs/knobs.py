"""The controller's knob space: tier, insertion position, top-k, total blocks.

Values are configurable per backend (a 24-block model has other ranges); the defaults are the
design's for a 16-block MoE decoder. Actions travel through the env as indices into these tuples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import math


@dataclass(frozen=True)
class KnobSpace:
    """Discrete values of every knob and the decoder depth they act on."""

    tiers: tuple[str, ...] = ("low", "medium", "high")
    insertion_positions: tuple[int, ...] = (1, 2, 3, 4, 5)
    top_k_values: tuple[int, ...] = (4, 5, 6, 7, 8)
    num_blocks_values: tuple[int, ...] = (12, 13, 14, 15, 16)
    num_layers: int = 16
    first_block_top_k: int = 8

    def __post_init__(self):
        for name in ("tiers", "insertion_positions", "top_k_values", "num_blocks_values"):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            if not values:
                raise ValueError(f"KnobSpace.{name} is empty; expected at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"KnobSpace.{name}={values} has repeated values")
        if list(self.top_k_values) != sorted(self.top_k_values) or self.top_k_values[0] < 1:
            raise ValueError(f"KnobSpace.top_k_values={self.top_k_values}: expected ascending positive ints")
        if list(self.num_blocks_values) != sorted(self.num_blocks_values):
            raise ValueError(f"KnobSpace.num_blocks_values={self.num_blocks_values}: expected ascending ints")
        if self.num_blocks_values[-1] > self.num_layers:
            raise ValueError(
                f"KnobSpace.num_blocks_values={self.num_blocks_values}: max exceeds num_layers={self.num_layers}"
            )
        if min(self.insertion_positions) < 1:
            raise ValueError(f"KnobSpace.insertion_positions={self.insertion_positions}: expected values >= 1")
        # Every combination must be valid for every p: the p blocks already run count towards N.
        if max(self.insertion_positions) > min(self.num_blocks_values):
            raise ValueError(
                f"KnobSpace.insertion_positions={self.insertion_positions}: max p must be <= "
                f"min(num_blocks_values)={min(self.num_blocks_values)} so every combination is valid"
            )

    @classmethod
    def from_dict(cls, cfg: Mapping | None) -> "KnobSpace":
        cfg = dict(cfg or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(cfg) - known
        if unknown:
            raise KeyError(f"unknown knob_space key(s) {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()})

    def to_dict(self) -> dict:
        return {
            "tiers": list(self.tiers),
            "insertion_positions": list(self.insertion_positions),
            "top_k_values": list(self.top_k_values),
            "num_blocks_values": list(self.num_blocks_values),
            "num_layers": self.num_layers,
            "first_block_top_k": self.first_block_top_k,
        }

    @property
    def head_values(self) -> dict[str, tuple]:
        """The values of each policy head's choices, in index order, keyed by action name."""
        return {
            "tier": self.tiers,
            "insertion": self.insertion_positions,
            "top_k": self.top_k_values,
            "num_blocks": self.num_blocks_values,
        }

    @property
    def head_sizes(self) -> dict[str, int]:
        """Number of choices of each policy head, keyed by action name."""
        return {head: len(values) for head, values in self.head_values.items()}

    def complexity(self, tier_index: int, top_k: int, num_blocks: int) -> float:
        """Mean of the three knob costs, each normalised to [0, 1] (0 = cheapest value)."""

        def norm(pos: int, n: int) -> float:
            return pos / (n - 1) if n > 1 else 0.0

        return (
            norm(tier_index, len(self.tiers))
            + norm(self.top_k_values.index(top_k), len(self.top_k_values))
            + norm(self.num_blocks_values.index(num_blocks), len(self.num_blocks_values))
        ) / 3.0


def select_blocks(
    importance: Mapping[int, float] | Sequence[float], insertion: int, num_blocks: int, num_layers: int
) -> list[int]:
    """Blocks to run, in order: 0..p-1 (already run) plus the N-p most important of p..L-1.

    Ties break towards the earlier block so the choice is deterministic.
    """
    if not 1 <= insertion <= num_blocks <= num_layers:
        raise ValueError(
            f"select_blocks: need 1 <= insertion ({insertion}) <= num_blocks ({num_blocks}) "
            f"<= num_layers ({num_layers})"
        )
    scores = {int(i): float(importance[i]) for i in range(num_layers)}
    for i, s in scores.items():
        if math.isnan(s):
            raise ValueError(f"importance score of block {i} is NaN")
    rest = sorted(range(insertion, num_layers), key=lambda i: (-scores[i], i))[: num_blocks - insertion]
    return list(range(insertion)) + sorted(rest)
