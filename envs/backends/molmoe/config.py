"""MolmoE's published config.json and preprocessor_config.json, read strictly.

`MolmoEConfig.load(dir)` reads the two files as the checkpoint publishes them (the remote code's
field names) and keeps the fields this port needs. Every variant the port does not implement
(another pooling, a tied LM head, norm-after blocks, ...) is refused with the field and its value,
so a checkpoint that would silently compute something else never loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.backends.vlm.config import read_json_object as read_json

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILE = "tokenizer.json"
MODEL_TYPE = "molmo"

# Values the port implements, per config.json field: anything else is refused by name.
REQUIRED_VALUES = {
    "block_type": "moe",
    "activation_type": "swiglu",
    "layer_norm_type": "rms",
    "attention_layer_norm": True,
    "norm_after": False,
    "rope": True,
    "rope_impl": "llama",
    "use_position_ids": True,
    "include_bias": False,
    "qkv_bias": False,
    "clip_qkv": None,
    "weight_tying": False,
    "alibi": False,
    "image_pooling_2d": "attention-meanq",
    "image_projector": "mlp",
    "image_padding_embed": "pad_and_partial_pad",
    "use_cls_feature": False,
    "moe_shared_expert": False,
    "normalize_input_embeds": False,
    "scale_logits": False,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "crop_mode": "overlap-and-resize-c2",
    "unconditioned": False,
    "head_dim": None,
}
# MolmoE-1B's published sizes where the reference fixture's tiny config differs (the fixture
# README's table); every other field of the fixture's config.json is the published one.
MOLMOE_1B_SIZES = {
    "d_model": 2048, "n_layers": 16, "n_heads": 16, "moe_num_experts": 64, "moe_top_k": 8, "mlp_ratio": 1,
    "vit_layers": [-2, -9],
    "vision_backbone": {"image_emb_dim": 1024, "image_num_heads": 16, "image_num_key_value_heads": 16,
                        "image_head_dim": 64, "image_mlp_dim": 4096, "image_num_layers": 23},
}


def molmoe_1b_config(template: dict) -> dict:
    """A config.json dict (e.g. the fixture's) with MolmoE-1B's published sizes."""
    data = {**template, **{k: v for k, v in MOLMOE_1B_SIZES.items() if k != "vision_backbone"}}
    data["vision_backbone"] = {**template["vision_backbone"], **MOLMOE_1B_SIZES["vision_backbone"]}
    return data


VISION_REQUIRED_VALUES = {"image_model_type": "openai", "image_mlp_activations": "quick_gelu"}


@dataclass(frozen=True)
class MolmoEConfig:
    """The published config's fields the port uses (names as in config.json)."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_ratio: int
    moe_num_experts: int
    moe_top_k: int
    vocab_size: int
    embedding_size: int
    additional_vocab_size: int
    layer_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vit_layers: tuple[int, ...]
    image_pooling_h: int
    image_pooling_w: int
    # vision tower (config.json's "vision_backbone")
    image_emb_dim: int
    image_num_heads: int
    image_num_key_value_heads: int
    image_head_dim: int
    image_mlp_dim: int
    image_num_layers: int
    image_num_pos: int
    image_patch_size: int
    image_norm_eps: float
    # preprocessor (preprocessor_config.json)
    crop_size: int = 336
    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)
    image_token_length_h: int = 12
    image_token_length_w: int = 12
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    eos_token_id: int = 50279
    pad_token_id: int = 1
    mlp_hidden_size: int | None = None
    source: str = field(default="config", compare=False)

    # The embedded model's config names (envs.backends.vlm.VLMConfig), so the executor, the
    # shared backend code and the profiler read either config alike.
    @property
    def num_layers(self) -> int:
        return self.n_layers

    @property
    def top_k(self) -> int:
        return self.moe_top_k

    @property
    def num_experts(self) -> int:
        return self.moe_num_experts

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def expert_hidden_size(self) -> int:
        """Hidden width of one expert: (mlp_hidden_size or mlp_ratio * d_model) // 2."""
        return (self.mlp_hidden_size or self.mlp_ratio * self.d_model) // 2

    @property
    def patches_per_side(self) -> int:
        return self.crop_size // self.image_patch_size

    @property
    def tokens_per_crop(self) -> int:
        return self.image_token_length_h * self.image_token_length_w

    @property
    def vision_feature_dim(self) -> int:
        """Width of the concatenated ViT layers (the pooling's and pad_embed's input)."""
        return self.image_emb_dim * len(self.vit_layers)

    @classmethod
    def load(cls, model_dir: str | Path) -> "MolmoEConfig":
        model_dir = Path(model_dir)
        path = model_dir / CONFIG_FILE
        data = read_json(path, "model config")
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"{path}: model_type={data.get('model_type')!r}, expected {MODEL_TYPE!r} (a MolmoE checkpoint "
                f"such as allenai/MolmoE-1B-0924)"
            )
        for name, value in REQUIRED_VALUES.items():
            if data.get(name, value) != value:
                raise ValueError(f"{path}: field {name}={data[name]!r} is not supported by this port; expected {value!r}")
        vision = data.get("vision_backbone")
        if not isinstance(vision, dict):
            raise ValueError(f"{path}: field 'vision_backbone' is {type(vision).__name__}, expected an object")
        for name, value in VISION_REQUIRED_VALUES.items():
            if vision.get(name, value) != value:
                raise ValueError(f"{path}: field vision_backbone.{name}={vision[name]!r} is not supported; expected {value!r}")
        if int(data.get("moe_num_experts") or 0) <= 0:
            raise ValueError(f"{path}: field moe_num_experts={data.get('moe_num_experts')!r}, expected > 0 (an MoE model)")

        def need(source: dict, name: str, where: str = "") -> Any:
            if name not in source or source[name] is None:
                raise ValueError(f"{path}: field {where}{name} is missing")
            return source[name]

        pre_path = model_dir / PREPROCESSOR_FILE
        pre = read_json(pre_path, "preprocessor config")

        def pre_need(name: str) -> Any:
            if name not in pre:
                raise ValueError(f"{pre_path}: field {name} is missing")
            return pre[name]

        base_size = pre_need("base_image_input_size")
        if not (isinstance(base_size, list) and len(base_size) == 2 and base_size[0] == base_size[1]):
            raise ValueError(f"{pre_path}: base_image_input_size={base_size!r}, expected [S, S]")
        if pre_need("image_patch_size") != vision.get("image_patch_size"):
            raise ValueError(
                f"{pre_path}: image_patch_size={pre['image_patch_size']!r} differs from {path}'s "
                f"vision_backbone.image_patch_size={vision.get('image_patch_size')!r}"
            )
        n_heads = int(need(data, "n_heads"))
        cfg = cls(
            d_model=int(need(data, "d_model")),
            n_layers=int(need(data, "n_layers")),
            n_heads=n_heads,
            n_kv_heads=int(data.get("n_kv_heads") or n_heads),
            mlp_ratio=int(need(data, "mlp_ratio")),
            mlp_hidden_size=data.get("mlp_hidden_size"),
            moe_num_experts=int(need(data, "moe_num_experts")),
            moe_top_k=int(need(data, "moe_top_k")),
            vocab_size=int(need(data, "vocab_size")),
            embedding_size=int(data.get("embedding_size") or data["vocab_size"]),
            additional_vocab_size=int(data.get("additional_vocab_size") or 0),
            layer_norm_eps=float(need(data, "layer_norm_eps")),
            rope_theta=float(need(data, "rope_theta")),
            max_position_embeddings=int(data.get("max_position_embeddings") or need(data, "max_sequence_length")),
            vit_layers=tuple(int(v) for v in need(data, "vit_layers")),
            image_pooling_h=int(need(data, "image_pooling_h")),
            image_pooling_w=int(need(data, "image_pooling_w")),
            image_emb_dim=int(need(vision, "image_emb_dim", "vision_backbone.")),
            image_num_heads=int(need(vision, "image_num_heads", "vision_backbone.")),
            image_num_key_value_heads=int(need(vision, "image_num_key_value_heads", "vision_backbone.")),
            image_head_dim=int(need(vision, "image_head_dim", "vision_backbone.")),
            image_mlp_dim=int(need(vision, "image_mlp_dim", "vision_backbone.")),
            image_num_layers=int(need(vision, "image_num_layers", "vision_backbone.")),
            image_num_pos=int(need(vision, "image_num_pos", "vision_backbone.")),
            image_patch_size=int(need(vision, "image_patch_size", "vision_backbone.")),
            image_norm_eps=float(need(vision, "image_norm_eps", "vision_backbone.")),
            crop_size=int(base_size[0]),
            max_crops=int(pre_need("max_crops")),
            overlap_margins=tuple(int(m) for m in pre_need("overlap_margins")),
            image_token_length_h=int(pre_need("image_token_length_h")),
            image_token_length_w=int(pre_need("image_token_length_w")),
            image_mean=tuple(float(v) for v in pre.get("image_mean", cls.image_mean)),
            image_std=tuple(float(v) for v in pre.get("image_std", cls.image_std)),
            eos_token_id=int(_generation_field(model_dir, "eos_token_id", data.get("eos_token_id", 50279))),
            pad_token_id=int(data.get("pad_token_id", 1)),
            source=str(path),
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        """Geometry the port relies on (the reference asserts the same)."""
        where = self.source
        if self.d_model % self.n_heads:
            raise ValueError(f"{where}: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_kv_heads != self.n_heads:
            raise ValueError(f"{where}: n_kv_heads={self.n_kv_heads} != n_heads={self.n_heads} is not supported")
        if not 1 <= self.moe_top_k <= self.moe_num_experts:
            raise ValueError(f"{where}: moe_top_k={self.moe_top_k}, expected 1..moe_num_experts={self.moe_num_experts}")
        if self.crop_size % self.image_patch_size:
            raise ValueError(f"{where}: crop size {self.crop_size} is not a multiple of patch {self.image_patch_size}")
        if self.image_num_pos != self.patches_per_side ** 2 + 1:
            raise ValueError(
                f"{where}: vision_backbone.image_num_pos={self.image_num_pos}, expected "
                f"{self.patches_per_side ** 2 + 1} for {self.crop_size}-px crops of {self.image_patch_size}-px patches"
            )
        if (self.image_pooling_h, self.image_pooling_w) != (2, 2) or self.patches_per_side % 2:
            raise ValueError(f"{where}: only 2x2 pooling of an even patch grid is supported "
                             f"(pooling {self.image_pooling_h}x{self.image_pooling_w}, grid {self.patches_per_side})")
        if (self.image_token_length_h, self.image_token_length_w) != (self.patches_per_side // 2,) * 2:
            raise ValueError(f"{where}: image_token_length_h/w must be {self.patches_per_side // 2} (2x2 pooling)")
        left, right = self.overlap_margins
        if left % 2 or right % 2 or left + right >= self.patches_per_side:
            raise ValueError(f"overlap_margins={list(self.overlap_margins)}: expected even margins smaller than a crop")
        for layer in self.vit_layers:
            if not -self.image_num_layers <= layer < self.image_num_layers:
                raise ValueError(f"{where}: vit_layers entry {layer} is outside the {self.image_num_layers} ViT blocks")


def _generation_field(model_dir: Path, name: str, default: Any) -> Any:
    path = model_dir / "generation_config.json"
    return read_json(path, "generation config").get(name, default) if path.is_file() else default

