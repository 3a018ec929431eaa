"""The two controller stages' predictors (the design's Knob1 and Knob2/Knob3 heads)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from policies.budget_encoder import ElapsedCode


def _mlp(in_dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU())


class Knob1PredictorBudgetLanguage(nn.Module):
    """Stage 1: language feature + budget feature -> tier logits, insertion logits."""

    def __init__(self, language_dim: int, budget_dim: int, hidden_dim: int, num_tiers: int, num_insertions: int):
        super().__init__()
        # The language feature is a mean of token embeddings whose scale depends on the model.
        self.language_norm = nn.LayerNorm(language_dim)
        self.trunk = _mlp(language_dim + budget_dim, hidden_dim)
        self.tier_head = nn.Linear(hidden_dim, num_tiers)
        self.insertion_head = nn.Linear(hidden_dim, num_insertions)

    def forward(self, language_feature: torch.Tensor, budget_feature: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(torch.cat([self.language_norm(language_feature), budget_feature], dim=-1))
        return {"tier": self.tier_head(h), "insertion": self.insertion_head(h)}


STAGE2_INPUTS = ("token", "token+elapsed", "elapsed")


class Knob2Knob3Predictor(nn.Module):
    """Stage 2: its inputs + insertion embedding -> top-k logits, num_blocks logits.

    inputs (policy.stage2_inputs): "token" = the latency token (the design's); "token+elapsed" =
    the token and the elapsed code (`ElapsedCode` of the request's measured elapsed and remaining
    time); "elapsed" = the elapsed code alone (no latency token is read).
    """

    def __init__(self, d_model: int, hidden_dim: int, num_insertions: int, num_top_k: int, num_blocks: int,
                 inputs: str = "token", budget_range_ms: Sequence[float] | None = None):
        super().__init__()
        if inputs not in STAGE2_INPUTS:
            raise ValueError(f"policy.stage2_inputs={inputs!r} is not known; expected one of {list(STAGE2_INPUTS)}")
        self.inputs = inputs
        self.reads_token = inputs in ("token", "token+elapsed")
        in_dim = hidden_dim
        if self.reads_token:
            # Hidden states grow with depth; normalising makes the input scale independent of p.
            self.token_norm = nn.LayerNorm(d_model)
            in_dim += d_model
        self.elapsed_code = None
        if inputs != "token":
            if budget_range_ms is None:
                raise ValueError(f"policy.stage2_inputs={inputs!r} needs budget_range_ms (the elapsed code's scale)")
            self.elapsed_code = ElapsedCode(budget_range_ms)
            in_dim += self.elapsed_code.dim
        self.insertion_embedding = nn.Embedding(num_insertions, hidden_dim)
        self.trunk = _mlp(in_dim, hidden_dim)
        self.top_k_head = nn.Linear(hidden_dim, num_top_k)
        self.num_blocks_head = nn.Linear(hidden_dim, num_blocks)

    def forward(self, latency_token: torch.Tensor | None = None, insertion_index: torch.Tensor | None = None,
                elapsed_ms: torch.Tensor | None = None, remaining_ms: torch.Tensor | None = None,
                ) -> dict[str, torch.Tensor]:
        """Inputs this option does not read are ignored; a missing one it reads is an error."""
        needed = {"insertion_index": insertion_index}
        if self.reads_token:
            needed["latency_token"] = latency_token
        if self.elapsed_code is not None:
            needed.update(elapsed_ms=elapsed_ms, remaining_ms=remaining_ms)
        missing = [k for k, v in needed.items() if v is None]
        if missing:
            raise ValueError(f"Stage 2 with stage2_inputs={self.inputs!r} needs {missing}")
        # The env's insertion observation is (..., 1); the embedding wants one index per row.
        rows = (latency_token if self.reads_token else elapsed_ms).shape[:-1]
        features = [self.insertion_embedding(insertion_index.reshape(rows))]
        if self.reads_token:  # first, as the token-only layout always had it
            features.insert(0, self.token_norm(latency_token))
        if self.elapsed_code is not None:
            features.append(self.elapsed_code(elapsed_ms, remaining_ms))
        h = self.trunk(torch.cat(features, dim=-1))
        return {"top_k": self.top_k_head(h), "num_blocks": self.num_blocks_head(h)}
