"""Hyper-parameters of the embedded VLM and the transformers configs built from them.

config.json of a model dir holds exactly `VLMConfig.to_dict()`: our own small set of fields,
not the transformers configs' full dumps, so a dir written with one transformers version loads
with another (the device runs 5.17, the package 5.24).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from transformers import CLIPVisionConfig, OlmoeConfig

MODEL_TYPE = "budgetvlm-molmoe"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# Molmo-style multi-crop tiers: each tier is a crop budget (Molmo's max_crops). An image gets a
# global view (the whole image resized, aspect kept, into one crop) plus a rows x cols tiling with
# rows * cols <= the budget, chosen per image by Molmo's rule (preprocess.select_tiling); budget 0
# means the global view only. So the number of vision tokens follows the image within a tier.
DEFAULT_TIER_MAX_CROPS = {"low": 0, "medium": 4, "high": 9}
# CLIP's normalisation constants (the tower is trained from scratch, but keeping CLIP's input
# convention lets a real CLIP checkpoint drop in).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# Size presets (the vocabulary fields come from the tokenizer). "molmoe-tiny" is the shipped
# model; "test" is a seconds-fast model of the same classes for unit tests and CPU smoke runs.
PRESETS = {
    "molmoe-tiny": dict(budget_token_scale=0.05),
    "test": dict(
        crop_size=16, patch_size=4, vision_hidden_size=32, vision_intermediate_size=64, vision_layers=1,
        vision_heads=2, d_model=32, num_layers=6, num_heads=2, num_experts=16, expert_intermediate_size=8,
        max_positions=128, budget_token_scale=0.05,
    ),
}


@dataclass(frozen=True)
class VLMConfig:
    """Everything needed to rebuild the model's modules (weights come from model.safetensors)."""

    vocab_size: int
    pad_token_id: int
    eos_token_id: int
    # vision tower (CLIP ViT) on crop_size x crop_size crops with patch_size patches
    crop_size: int = 64
    patch_size: int = 8
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 512
    vision_layers: int = 4
    vision_heads: int = 4
    pool: int = 2  # connector's pool x pool average pooling of the patch grid
    tier_max_crops: dict = field(default_factory=lambda: dict(DEFAULT_TIER_MAX_CROPS))
    # decoder (OLMoE)
    d_model: int = 128
    num_layers: int = 16
    num_heads: int = 4
    num_experts: int = 16
    expert_intermediate_size: int = 96
    top_k: int = 8
    max_positions: int = 512
    rope_theta: float = 10000.0
    # As OLMoE (and MolmoE-1B) ship: the kept experts' router weights are not renormalised, so a
    # smaller top-k than the model was trained at also shrinks the MoE output, as on the real model.
    norm_topk_prob: bool = False
    # The budget token (the controller's LayerNorm-scaled encoder output, per-element std ~1) is
    # multiplied by this before it enters the sequence, so that it sits at the token embeddings'
    # scale: unscaled it is ~20x their norm and swamps the residual stream of the position that
    # predicts the first answer token (the shipped model trained that way learned only slowly).
    budget_token_scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "tier_max_crops", {str(k): int(v) for k, v in dict(self.tier_max_crops).items()})
        if self.crop_size % self.patch_size:
            raise ValueError(f"crop_size={self.crop_size} must be a multiple of patch_size={self.patch_size}")
        if self.patches_per_side % self.pool:
            raise ValueError(f"patch grid {self.patches_per_side} is not divisible by pool={self.pool}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k}: expected 1..num_experts={self.num_experts}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if not self.tier_max_crops:
            raise ValueError("tier_max_crops is empty; expected e.g. {'low': 0, 'medium': 4, 'high': 9}")
        bad = {t: n for t, n in self.tier_max_crops.items() if n < 0}
        if bad:
            raise ValueError(f"tier_max_crops {bad}: expected crop budgets >= 0 (0 = global view only)")
        if self.max_vision_tokens + 1 >= self.max_positions:
            raise ValueError(f"max_positions={self.max_positions} leaves no room after the vision tokens")

    @property
    def patches_per_side(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def tokens_per_crop(self) -> int:
        return (self.patches_per_side // self.pool) ** 2

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(self.tier_max_crops)

    @property
    def max_vision_tokens(self) -> int:
        return (1 + max(self.tier_max_crops.values())) * self.tokens_per_crop

    @property
    def max_grid_side(self) -> int:
        """Longest side of any tiling (a 1 x max_crops strip)."""
        return max(1, max(self.tier_max_crops.values()))

    @property
    def num_crop_slots(self) -> int:
        """Slot 0 is the global view; grid cell (r, c) of any tiling is slot 1 + r * max_grid_side + c."""
        return 1 + self.max_grid_side ** 2

    def vision_config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.crop_size,
            patch_size=self.patch_size,
            num_channels=3,
            attn_implementation="sdpa",
        )

    def decoder_config(self) -> OlmoeConfig:
        return OlmoeConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.d_model,
            intermediate_size=self.expert_intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            num_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            norm_topk_prob=self.norm_topk_prob,
            max_position_embeddings=self.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            bos_token_id=None,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "VLMConfig":
        data = dict(data)
        model_type = data.pop("model_type", None)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{source}: model_type={model_type!r}, expected {MODEL_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        for name, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{source}: field {name}={value} is not finite")
        try:
            return cls(**data)
        except TypeError as err:  # a required field is missing
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def load(cls, model_dir: str | Path) -> "VLMConfig":
        path = Path(model_dir) / CONFIG_FILE
        return cls.from_dict(read_json_object(path, "model config"), source=str(path))

    def save(self, model_dir: str | Path) -> None:
        Path(model_dir, CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from `path`; errors name the file and what it should hold."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path}: expected a JSON object, got {type(data).__name__}")
    return data
