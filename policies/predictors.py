"""The two controller stages' predictors (the design's Knob1 and Knob2/Knob3 heads)."""
from __future__ import annotations

import torch
from torch import nn


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


class Knob2Knob3Predictor(nn.Module):
    """Stage 2: latency token + insertion embedding -> top-k logits, num_blocks logits."""

    def __init__(self, d_model: int, hidden_dim: int, num_insertions: int, num_top_k: int, num_blocks: int):
        super().__init__()
        # Hidden states grow with depth; normalising makes the input scale independent of p.
        self.token_norm = nn.LayerNorm(d_model)
        self.insertion_embedding = nn.Embedding(num_insertions, hidden_dim)
        self.trunk = _mlp(d_model + hidden_dim, hidden_dim)
        self.top_k_head = nn.Linear(hidden_dim, num_top_k)
        self.num_blocks_head = nn.Linear(hidden_dim, num_blocks)

    def forward(self, latency_token: torch.Tensor, insertion_index: torch.Tensor) -> dict[str, torch.Tensor]:
        # The env's insertion observation is (..., 1); the embedding wants one index per row.
        insertion_index = insertion_index.reshape(latency_token.shape[:-1])
        h = self.trunk(torch.cat([self.token_norm(latency_token), self.insertion_embedding(insertion_index)], dim=-1))
        return {"top_k": self.top_k_head(h), "num_blocks": self.num_blocks_head(h)}
