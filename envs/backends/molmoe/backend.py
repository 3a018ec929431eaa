"""MolmoEBackend: a published MolmoE checkpoint executing episodes under the controller's knobs.

Episode (batch size 1, see envs.backends.base):
  start_episode(sample, tier, budget_token)
      preprocess at the tier's crop budget (max_crops = tier_max_crops[tier]; the crop grid comes
      from Molmo's tiling rule for this image) -> vision backbone -> prefill sequence
      [bos][image tokens + added image features][" User: ... Assistant:"][budget token]
  run_to(ep, p)
      blocks 0..p-1 over the whole prefill (block 0 at knob_space.first_block_top_k, 1..p-1 at the
      checkpoint's top-k), caching their keys/values; returns the budget position's hidden state.
  finish(ep, top_k, num_blocks)
      blocks = select_blocks(importance, p, N, L); blocks p.. of that list run over the prefill at
      `top_k` (the first p are not recomputed, skipped blocks never run and have no cache), then
      greedy decoding with the same blocks and per-block top-k. Plans come from
      envs.backends.vlm.executor.block_plan and decoding is its Executor's (eager on CPU; on CUDA
      one graph per configuration, max_new_tokens steps, the ids after <eos> dropped).
The first answer token is read at the last prompt position (" Assistant:"), one before the budget
position: the published weights never saw a budget token, and causal attention keeps it out of
that prediction, so with every block at the checkpoint's top-k the first token is the reference's.
Decoded tokens (positions after the budget position) attend to it like to any prompt position,
and decoding never appends another one. The budget token enters as budget * budget_token_scale
(default: the RMS of the token embedding table, so a LayerNorm-scaled controller output lands at
the embeddings' scale). image_size [W, H], if given, resizes every image first (inside the
preprocess phase): SynthVQA's 192-px scenes are never split by Molmo's tiling rule, so without
it every tier encodes the same 2 crops there; at photo sizes the tiers differ as on COCO.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from envs.backends.molmoe.config import MolmoEConfig
from envs.backends.molmoe.model import load
from envs.backends.molmoe.preprocess import MolmoEInputs, preprocess
from envs.backends.molmoe.tokenizer import chat_prompt
from envs.backends.vlm.backend import SYNTHVQA, ExecutorBackend, ModelEpisode, load_image
from envs.backends.vlm.executor import with_budget_token
from envs.data.sample import VQASample
from envs.latency import PhaseTimer

# The design's tiers are crop ranges 1-3 / 4-8 / 9-15; max_crops counts the grid crops (the
# global crop comes on top), so these budgets cap each tier at the top of its range: at most
# 3, 8 and 13 crops. 12 is MolmoE-1B's own default.
DEFAULT_TIER_MAX_CROPS = {"low": 2, "medium": 7, "high": 12}


class MolmoEBackend(ExecutorBackend):
    """See the module docstring; keyword config documented in envs.backends.molmoe."""

    DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

    def __init__(
        self,
        model_path: str | Path | None = None,
        results_dir: str | Path | None = None,
        dataset_names: Sequence[str] = (SYNTHVQA,),
        data_root: str | Path | None = None,
        num_samples: Mapping[str, int] | int | None = None,
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        importance_method: str | None = None,
        max_new_tokens: int = 4,
        budget_range_ms: Sequence[float] | None = None,
        dataset_weights: Mapping[str, float] | None = None,
        prompt_templates: Mapping[str, str] | None = None,
        tier_max_crops: Mapping[str, int] | None = None,
        budget_token_scale: float | None = None,
        image_size: Sequence[int] | None = None,
        decode_mode: str | None = None,
        max_graphs: int | None = None,
    ):
        if model_path is None:
            raise ValueError("model_path is required for backend 'molmoe' (a MolmoE checkpoint directory)")
        self._set_options(model_path, results_dir, device, dtype, max_new_tokens, dataset_names, data_root,
                          num_samples, seed, dataset_weights, prompt_templates)
        self.image_size = _check_image_size(image_size)
        self.tier_max_crops = _check_tiers(tier_max_crops if tier_max_crops is not None else DEFAULT_TIER_MAX_CROPS)
        # The results files are checked before the (possibly 14 GB) weights are read.
        self.read_results(self.results_dir, MolmoEConfig.load(self.model_path).num_layers, importance_method,
                          budget_range_ms)
        model, tokenizer = load(self.model_path, self.device, self.DTYPES[dtype])
        if budget_token_scale is None:
            budget_token_scale = float(model.wte.weight.float().pow(2).mean().sqrt())
        if not 0 < float(budget_token_scale) < float("inf"):
            raise ValueError(f"budget_token_scale={budget_token_scale!r}: expected a positive finite number")
        self.budget_token_scale = float(budget_token_scale)
        self._set_model(model, tokenizer, self.tier_max_crops, decode_mode, max_graphs)

    # ----------------------------------------------------------------- data
    def prompt(self, sample: VQASample) -> str:
        """The dataset's prompt template (envs.data.vqa) in MolmoE's chat format."""
        if not isinstance(sample.question, str) or not sample.question.strip():
            raise ValueError(f"{sample.dataset} question_id={sample.question_id!r}: question is empty")
        from envs.data.vqa import format_prompt

        return chat_prompt(format_prompt(sample, self.prompt_templates))

    def prompt_ids(self, sample: VQASample) -> list[int]:
        return self.tokenizer.encode(self.prompt(sample))

    # ------------------------------------------------------------- model pieces
    def embed_budget(self, budget: torch.Tensor) -> torch.Tensor:
        return budget.to(self.DTYPES[self.dtype]) * self.budget_token_scale

    def first_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Read at the last prompt position, one before the budget token (see the module docstring)."""
        return self.model.logits(hidden[:, -2:-1]).argmax(-1)

    def max_crops(self, tier: str) -> int:
        """The tier's crop budget."""
        if tier not in self.tier_max_crops:
            raise ValueError(f"tier={tier!r} is not known; expected one of {tuple(self.tier_max_crops)}")
        return self.tier_max_crops[tier]

    def inputs(self, image: torch.Tensor, prompt_ids: list[int], tier: str) -> MolmoEInputs:
        """The processor's output for one uint8 (3, H, W) image at the tier's crop budget."""
        max_crops = self.max_crops(tier)
        if self.image_size is not None:
            image = resize_image(image, self.image_size)
        return preprocess(image, prompt_ids, self.tokenizer.bos_id, max_crops, self.cfg, self.tokenizer.image_ids)

    def prefix(self, inputs: MolmoEInputs) -> torch.Tensor:
        """(T, d_model): token embeddings with the image features added (vision encoder included)."""
        model = self.model
        features = model.encode_images(inputs.images.to(self.device), inputs.image_masks.to(self.device))
        return model.embed_inputs(inputs, features)

    @torch.inference_mode()
    def prefill_prefixes(self, images: Sequence[torch.Tensor], prompt_ids: Sequence[list[int]], tier: str,
                         batch_size: int) -> list[torch.Tensor]:
        """The input embeddings (T_i, d_model) per sample at `tier`, as start_episode builds them
        before the budget token (one image at a time: crop counts differ per image)."""
        return [self.prefix(self.inputs(image, ids, tier)) for image, ids in zip(images, prompt_ids)]

    # ------------------------------------------------------------- episode
    @torch.inference_mode()
    def start_episode(self, sample: VQASample, tier: str, budget_token: torch.Tensor) -> ModelEpisode:
        max_crops = self.max_crops(tier)
        budget = self._check_budget_token(budget_token)
        ids = self.prompt_ids(sample)
        timer = PhaseTimer()
        with self.meter.section(timer, "preprocess", bracket=True):
            inputs = self.inputs(load_image(sample), ids, tier)
        with self.meter.section(timer, "vision"):
            prefix = self.prefix(inputs)
        sequence, cos, sin = with_budget_token(self.model, prefix[None], self.embed_budget(budget)[None])
        facts = {"max_crops": max_crops, "crops": inputs.num_crops, "grid": list(inputs.grid)}
        return ModelEpisode(sample, tier, sequence, cos, sin, timer, vision_tokens=inputs.vision_tokens, facts=facts)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "tier_max_crops": dict(self.tier_max_crops),
            "budget_token_scale": self.budget_token_scale,
            "image_size": None if self.image_size is None else list(self.image_size),
        }


def _check_image_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size={size!r}: expected [width, height] in pixels") from None
    if width < 1 or height < 1:
        raise ValueError(f"image_size={size!r}: expected positive [width, height]")
    return width, height


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, height, width), bilinear."""
    width, height = size
    out = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def _check_tiers(tiers: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(tiers, Mapping) or not tiers:
        raise ValueError(f"tier_max_crops={tiers!r}: expected a non-empty mapping tier -> max_crops")
    result = {}
    for tier, crops in tiers.items():
        if isinstance(crops, bool) or not isinstance(crops, int) or crops < 1:
            raise ValueError(f"tier_max_crops[{tier!r}]={crops!r}: expected an int >= 1")
        result[str(tier)] = crops
    if list(result.values()) != sorted(result.values()):
        raise ValueError(f"tier_max_crops={result}: crop budgets must not decrease from the first tier to the last")
    return result
