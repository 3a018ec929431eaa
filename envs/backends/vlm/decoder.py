"""An OLMoE decoder alone, with the interface the executor drives (for MolmoE-1B-shaped benchmarks).

`ElasticDecoder(OlmoeConfig)` holds a transformers `OlmoeForCausalLM` (its weights, random unless
loaded) and exposes what BudgetVLM exposes for its decoder part: embed / embed_budget / rope /
blocks[i](h, cos, sin, k, cache) / logits and a `cfg` with d_model, num_layers, top_k,
num_experts and max_positions, so block_plan, run_blocks and Executor.decode run it unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import OlmoeConfig, OlmoeForCausalLM

from envs.backends.vlm.elastic import ElasticBlock, fuse_norms, rope_tables


@dataclass(frozen=True)
class DecoderShape:
    d_model: int
    num_layers: int
    top_k: int
    num_experts: int
    max_positions: int


class ElasticDecoder(nn.Module):
    def __init__(self, config: OlmoeConfig, norm_topk_prob: bool = True):
        super().__init__()
        self.decoder = OlmoeForCausalLM(config)
        self.cfg = DecoderShape(config.hidden_size, config.num_hidden_layers, config.num_experts_per_tok,
                                config.num_experts, config.max_position_embeddings)
        # Plain list: the hookable wrappers must not re-register the layers' parameters.
        layers = self.decoder.model.layers
        self.__dict__["blocks"] = [ElasticBlock(layer, i, norm_topk_prob) for i, layer in enumerate(layers)]
        fuse_norms(self.decoder.model, ("norm",))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.model.embed_tokens(ids)

    def embed_budget(self, budget: torch.Tensor) -> torch.Tensor:
        return budget

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.decoder.model.rotary_emb, like, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.lm_head(self.decoder.model.norm(hidden))
