"""The embedded MolmoE-style VLM: CLIP ViT tower -> pooling connector -> OLMoE decoder.

`BudgetVLM` owns the transformers modules (their parameter names are the checkpoint's keys) and
exposes the elastic pieces that both inference and pretraining use:
    encode_images(crops, slots)      vision tower + connector -> vision tokens
    embed(ids)                       frozen-vocabulary token embeddings
    embed_budget(budget)             the budget token's sequence entry
    rope(positions)                  rotary cos/sin shared by all blocks
    blocks[i](h, cos, sin, k, cache) decoder block i at top-k k (envs.backends.vlm.elastic)
    logits(h)                        final norm + LM head
A model dir (config.json, model.safetensors, tokenizer.json) is read by `load_model`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionModel, OlmoeForCausalLM

from envs.backends.vlm.config import WEIGHTS_FILE, VLMConfig
from envs.backends.vlm.elastic import ElasticBlock, fuse_norms, rope_tables
from envs.backends.vlm.tokenizer import WordTokenizer


class VisionEncoder(nn.Module):
    """CLIP ViT per crop; drop CLS; pool x pool average pooling; MLP to d_model; + crop-slot embedding.

    The slot embedding tells the decoder which crop (global view or which grid cell) a token
    came from, like Molmo's image layout tokens but without spending sequence positions.
    """

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.tower = CLIPVisionModel(cfg.vision_config())
        self.connector = nn.Sequential(
            nn.Linear(cfg.vision_hidden_size, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model)
        )
        self.crop_slots = nn.Embedding(cfg.num_crop_slots, cfg.d_model)

    def forward(self, crops: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """crops (batch, crops, 3, S, S) normalised; slots (crops,) -> (batch, crops * tokens_per_crop, d_model)."""
        batch, num_crops = crops.shape[:2]
        side, cfg = self.cfg.patches_per_side, self.cfg
        patches = self.tower(pixel_values=crops.flatten(0, 1)).last_hidden_state[:, 1:]
        grid = patches.transpose(1, 2).reshape(batch * num_crops, cfg.vision_hidden_size, side, side)
        pooled = F.avg_pool2d(grid, cfg.pool).flatten(2).transpose(1, 2)
        tokens = self.connector(pooled).reshape(batch, num_crops, cfg.tokens_per_crop, cfg.d_model)
        tokens = tokens + self.crop_slots(slots)[None, :, None, :]
        return tokens.reshape(batch, num_crops * cfg.tokens_per_crop, cfg.d_model)


class BudgetVLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg)
        self.decoder = OlmoeForCausalLM(cfg.decoder_config())
        layers = self.decoder.model.layers
        # Plain list: the hookable wrappers must not re-register the layers' parameters.
        self.__dict__["blocks"] = [ElasticBlock(layer, i, cfg.norm_topk_prob) for i, layer in enumerate(layers)]
        fuse_norms(self.decoder.model, ("norm",))

    @property
    def lm_head(self) -> nn.Module:
        return self.decoder.lm_head

    def encode_images(self, crops: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self.vision(crops, slots)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.model.embed_tokens(ids)

    def embed_budget(self, budget: torch.Tensor) -> torch.Tensor:
        """The sequence entry of budget token(s) (..., d_model): scaled to the embeddings' scale."""
        return budget * self.cfg.budget_token_scale

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin for positions (batch, length), in `like`'s dtype (elastic.rope_tables)."""
        return rope_tables(self.decoder.model.rotary_emb, like, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.decoder.model.norm(hidden))

    def save(self, model_dir: str | Path, tokenizer: WordTokenizer, dtype: torch.dtype = torch.float16) -> None:
        """Write config.json, model.safetensors (in `dtype`) and tokenizer.json."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        if tokenizer.vocab_size != self.cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} words, model vocab_size={self.cfg.vocab_size}")
        self.cfg.save(model_dir)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(model_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save(model_dir)


def build_model(cfg: VLMConfig, seed: int | None = None) -> BudgetVLM:
    """A randomly initialised model (transformers' own init for the CLIP and OLMoE parts)."""
    if seed is not None:
        torch.manual_seed(seed)
    return BudgetVLM(cfg)


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[BudgetVLM, WordTokenizer]:
    """Load a model dir strictly: every file must exist and every weight must match the config."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    cfg = VLMConfig.load(model_dir)
    tokenizer = WordTokenizer.load(model_dir)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} words but config.json vocab_size={cfg.vocab_size}"
        )
    if (tokenizer.pad_id, tokenizer.eos_id) != (cfg.pad_token_id, cfg.eos_token_id):
        raise ValueError(
            f"{model_dir}: tokenizer.json pad/eos ids {(tokenizer.pad_id, tokenizer.eos_id)} differ from "
            f"config.json pad_token_id/eos_token_id {(cfg.pad_token_id, cfg.eos_token_id)}"
        )
    weights_path = model_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"model weights {weights_path} do not exist")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"model weights {weights_path} cannot be read: {err}") from None
    model = BudgetVLM(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"model weights {weights_path} do not match config.json: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"model weights {weights_path}: {name} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"model weights {weights_path}: {name} contains NaN or infinite values")
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval(), tokenizer
