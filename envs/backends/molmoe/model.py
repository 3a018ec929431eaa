"""MolmoE-1B in plain torch and transformers' OLMoE parts, with the elastic block execution.

    vision      the reference's CLIP-style ViT (its own parameter names), the selected ViT
                layers concatenated, pad embeddings by image mask, 2x2 attention pooling with
                the group mean as query, SwiGLU projector -> (crops, 144, d_model)
    wte         token embeddings: the published `embedding` and `new_embedding` tables joined
    layers      transformers `OlmoeDecoderLayer`s (MolmoE's block is OLMoE's: q/k RMSNorm over
                the full width before the head split, rotate-half RoPE, softmax-then-top-k
                routing without renormalisation, SwiGLU experts), run through
                envs.backends.vlm.elastic.ElasticBlock (per-block top-k, own KV cache)
    ln_f, lm_head

`embed_inputs` adds (does not substitute) each image feature to the embedding of the position
image_input_idx names, as the reference does. `load(model_dir)` reads a published checkpoint
directory; `prefill` / `generate` run the reference's forward for parity checks and for users
who want the model alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeDecoderLayer, OlmoeRMSNorm, OlmoeRotaryEmbedding

from envs.backends.molmoe.config import MolmoEConfig
from envs.backends.molmoe.preprocess import MolmoEInputs
from envs.backends.molmoe.tokenizer import MolmoETokenizer
from envs.backends.molmoe.weights import check_weights, read_weights, to_port_state, weight_files
from envs.backends.vlm.elastic import ElasticBlock, KVCache, fuse_norms, rope_tables


class DotProductAttention(nn.Module):
    """The reference's multi-head attention (wq/wk/wv/wo with biases), computed in float32."""

    def __init__(self, in_dim: int, cfg: MolmoEConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.image_num_heads, cfg.image_head_dim
        inner = self.heads * self.head_dim
        self.wq = nn.Linear(in_dim, inner)
        self.wk = nn.Linear(in_dim, cfg.image_num_key_value_heads * self.head_dim)
        self.wv = nn.Linear(in_dim, cfg.image_num_key_value_heads * self.head_dim)
        self.wo = nn.Linear(inner, cfg.image_emb_dim)
        self.groups = cfg.image_num_heads // cfg.image_num_key_value_heads

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(*x.shape[:2], -1, self.head_dim).transpose(1, 2).float()

        q, k, v = heads(self.wq(queries)), heads(self.wk(keys)), heads(self.wv(keys))
        if self.groups > 1:
            k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v).to(queries.dtype)
        return self.wo(out.transpose(1, 2).reshape(*queries.shape[:2], -1))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: MolmoEConfig):
        super().__init__()
        dim = cfg.image_emb_dim
        self.attention = DotProductAttention(dim, cfg)
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(dim, cfg.image_mlp_dim)
        self.feed_forward.w2 = nn.Linear(cfg.image_mlp_dim, dim)
        self.attention_norm = nn.LayerNorm(dim, eps=cfg.image_norm_eps)
        self.ffn_norm = nn.LayerNorm(dim, eps=cfg.image_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.attention_norm(x)
        x = x + self.attention(normed, normed)
        hidden = self.feed_forward.w1(self.ffn_norm(x))
        return x + self.feed_forward.w2(hidden * torch.sigmoid(1.702 * hidden))  # quick_gelu


class VisionTransformer(nn.Module):
    def __init__(self, cfg: MolmoEConfig):
        super().__init__()
        dim = cfg.image_emb_dim
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.image_num_pos, dim))
        self.patch_embedding = nn.Linear(cfg.image_patch_size ** 2 * 3, dim, bias=False)
        self.pre_ln = nn.LayerNorm(dim, eps=cfg.image_norm_eps)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.image_num_layers))

    def forward(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """(crops, patches, pixels) -> every block's output (crops, 1 + patches, dim), CLS first."""
        x = self.patch_embedding(patches)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.pre_ln(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)[None])
        outputs = []
        for block in self.transformer.resblocks:
            x = block(x)
            outputs.append(x)
        return outputs


class VisionBackbone(nn.Module):
    """ViT -> selected layers -> pad embeddings -> 2x2 attention pooling -> projector."""

    def __init__(self, cfg: MolmoEConfig):
        super().__init__()
        self.cfg = cfg
        self.image_vit = VisionTransformer(cfg)
        self.pad_embed = nn.Parameter(torch.zeros(2, cfg.vision_feature_dim))
        self.image_pooling_2d = DotProductAttention(cfg.vision_feature_dim, cfg)
        hidden = cfg.expert_hidden_size
        self.image_projector = nn.Module()
        self.image_projector.w1 = nn.Linear(cfg.image_emb_dim, hidden, bias=False)
        self.image_projector.w2 = nn.Linear(hidden, cfg.d_model, bias=False)
        self.image_projector.w3 = nn.Linear(cfg.image_emb_dim, hidden, bias=False)

    def vit_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every ViT block's output and the concatenated selected layers without CLS."""
        # A crop that is all -1 is batch padding in the reference: its features are zeroed. Tested
        # on the float32 pixels: in bfloat16 some real pixels round to exactly -1.
        real = (images != -1).flatten(1).all(dim=1)
        hidden = self.image_vit(images.to(self.image_vit.patch_embedding.weight.dtype))
        features = torch.cat([hidden[layer] for layer in self.cfg.vit_layers], dim=-1)[:, 1:]
        real = real.to(features.dtype)
        return hidden, features * real[:, None, None]

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """images (K, N, pixels) float32, image_masks (K, N) -> (K, tokens per crop, d_model) in the weights' dtype."""
        _, features = self.vit_features(images)
        all_pad = (image_masks == 0).to(features.dtype)[..., None]
        partial = ((image_masks < 1) & (image_masks != 0)).to(features.dtype)[..., None]
        features = features + self.pad_embed[0].to(features.dtype) * all_pad + self.pad_embed[1].to(features.dtype) * partial
        crops, side = features.shape[0], self.cfg.patches_per_side
        groups = features.reshape(crops, side // 2, 2, side // 2, 2, -1).permute(0, 1, 3, 2, 4, 5)
        groups = groups.reshape(crops * (side // 2) ** 2, 4, -1)
        pooled = self.image_pooling_2d(groups.mean(dim=1, keepdim=True), groups)
        pooled = pooled.reshape(crops, (side // 2) ** 2, -1)
        p = self.image_projector
        return p.w2(F.silu(p.w1(pooled)) * p.w3(pooled))


def olmoe_config(cfg: MolmoEConfig) -> OlmoeConfig:
    return OlmoeConfig(
        vocab_size=cfg.embedding_size, hidden_size=cfg.d_model, intermediate_size=cfg.expert_hidden_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        num_experts=cfg.moe_num_experts, num_experts_per_tok=cfg.moe_top_k, norm_topk_prob=False,
        rms_norm_eps=cfg.layer_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=False,
        pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )


class MolmoE(nn.Module):
    def __init__(self, cfg: MolmoEConfig):
        super().__init__()
        self.cfg = cfg
        decoder_cfg = olmoe_config(cfg)
        self.vision = VisionBackbone(cfg)
        self.wte = nn.Embedding(cfg.embedding_size + cfg.additional_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(OlmoeDecoderLayer(decoder_cfg, i) for i in range(cfg.n_layers))
        self.ln_f = OlmoeRMSNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
        with torch.device("cpu"):  # real inv_freq even when the weights are built on "meta"
            self.__dict__["rotary"] = OlmoeRotaryEmbedding(decoder_cfg)  # outside the state dict
        # Plain list: the hookable wrappers must not re-register the layers' parameters.
        self.__dict__["blocks"] = [ElasticBlock(layer, i, norm_topk_prob=False) for i, layer in enumerate(self.layers)]
        fuse_norms(self, ("ln_f",))

    def to(self, *args, **kwargs):
        # RoPE's inv_freq follows the device only: in bf16 its angles would lose precision.
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            self.__dict__["rotary"] = self.rotary.to(device)
        return super().to(*args, **kwargs)

    # ------------------------------------------------------------------ pieces
    def encode_images(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        return self.vision(images, image_masks)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids)

    def embed_inputs(self, inputs: MolmoEInputs, features: torch.Tensor) -> torch.Tensor:
        """(T, d_model): token embeddings with each kept image feature added at its position."""
        x = self.embed(inputs.input_ids.to(self.wte.weight.device))
        index = inputs.image_input_idx.reshape(-1).to(x.device)
        valid = index >= 0
        return x.index_add(0, index[valid], features.reshape(-1, features.shape[-1])[valid].to(x.dtype))

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin for positions (batch, length), in `like`'s dtype (elastic.rope_tables)."""
        return rope_tables(self.rotary, like, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))

    # ------------------------------------------------------------------ whole forward
    def default_plan(self) -> list[tuple[int, int]]:
        """Every block at the checkpoint's own top-k (the reference's forward)."""
        return [(b, self.cfg.moe_top_k) for b in range(self.cfg.n_layers)]

    @torch.inference_mode()
    def prefill(self, sequence: torch.Tensor, plan: Sequence[tuple[int, int]], cache: KVCache,
                outputs: list | None = None) -> torch.Tensor:
        """Run `plan` [(block, top_k)] over sequence (1, T, d) from position 0; returns the last
        block's output (1, T, d). outputs, if given, receives each block's output."""
        positions = torch.arange(sequence.shape[1], device=sequence.device)[None]
        cos, sin = self.rope(positions, sequence)
        hidden = sequence
        for block, k in plan:
            hidden = self.blocks[block](hidden, cos, sin, k, cache)
            if outputs is not None:
                outputs.append(hidden)
        return hidden

    @torch.inference_mode()
    def decode_step(self, token: int, position: int, plan: Sequence[tuple[int, int]], cache: KVCache) -> torch.Tensor:
        """Logits (vocab,) after feeding `token` at `position` through `plan`, growing the cache."""
        device = self.wte.weight.device
        hidden = self.embed(torch.tensor([[token]], device=device))
        cos, sin = self.rope(torch.tensor([[position]], device=device), hidden)
        for block, k in plan:
            hidden = self.blocks[block](hidden, cos, sin, k, cache)
        return self.logits(hidden)[0, -1]

    @torch.inference_mode()
    def generate(self, inputs: MolmoEInputs, max_new_tokens: int, plan: Sequence[tuple[int, int]] | None = None,
                 eos_id: int | None = None) -> tuple[list[int], torch.Tensor]:
        """Greedy ids (stopping after eos_id if given) and the last prefill position's logits."""
        plan = self.default_plan() if plan is None else list(plan)
        device = self.wte.weight.device
        features = self.encode_images(inputs.images.to(device), inputs.image_masks.to(device))
        sequence = self.embed_inputs(inputs, features)[None]
        cache: KVCache = {}
        last_logits = self.logits(self.prefill(sequence, plan, cache)[:, -1])[0]
        ids = [int(last_logits.argmax())]
        position = sequence.shape[1]
        while len(ids) < max_new_tokens and ids[-1] != eos_id:
            ids.append(int(self.decode_step(ids[-1], position, plan, cache).argmax()))
            position += 1
        return ids, last_logits.float()


def load(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
         ) -> tuple[MolmoE, MolmoETokenizer]:
    """Load a published MolmoE checkpoint directory (config.json, preprocessor_config.json,
    tokenizer.json, model.safetensors or the index and its shards), strictly: every file must
    exist and every weight key match the config, checked before any tensor is read."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    cfg = MolmoEConfig.load(model_dir)
    tokenizer = MolmoETokenizer.load(model_dir)
    if tokenizer.vocab_size > cfg.embedding_size + cfg.additional_vocab_size:
        raise ValueError(f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but the embeddings have "
                         f"{cfg.embedding_size + cfg.additional_vocab_size} rows")
    files = weight_files(model_dir)
    check_weights(cfg, files)
    state = to_port_state(cfg, read_weights(files, dtype))
    with torch.device("meta"):
        model = MolmoE(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).to(device).eval(), tokenizer  # inference only: weights stay frozen
