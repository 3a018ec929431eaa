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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from envs.backends.base import BACKEND_PHASES, Backend, EpisodeResult
from envs.backends.molmoe.config import MolmoEConfig
from envs.backends.molmoe.model import load
from envs.backends.molmoe.preprocess import MolmoEInputs, preprocess
from envs.backends.molmoe.tokenizer import chat_prompt
from envs.backends.vlm.backend import (
    SYNTHVQA,
    VLMBackend,
    _check_budget_range,
    _check_dataset_names,
    _check_num_samples,
    _knob_ranges,
    load_budget_range,
    load_image,
    load_importance,
)
from envs.backends.vlm.elastic import KVCache
from envs.backends.vlm.executor import Executor, block_plan, trim_at_eos
from envs.data.sample import VQASample
from envs.knobs import KnobSpace
from envs.latency import LatencyMeter, PhaseTimer

# The design's tiers are crop ranges 1-3 / 4-8 / 9-15; max_crops counts the grid crops (the
# global crop comes on top), so these budgets cap each tier at the top of its range: at most
# 3, 8 and 13 crops. 12 is MolmoE-1B's own default.
DEFAULT_TIER_MAX_CROPS = {"low": 2, "medium": 7, "high": 12}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MolmoEEpisode:
    sample: VQASample
    tier: str
    inputs: MolmoEInputs
    hidden: torch.Tensor  # (1, T + 1, d_model): prefill sequence, then the output of the last run block
    cos: torch.Tensor
    sin: torch.Tensor
    timer: PhaseTimer
    cache: KVCache = field(default_factory=dict)
    insertion: int | None = None
    finished: bool = False


class MolmoEBackend(Backend):
    """See the module docstring; keyword config documented in envs.backends.molmoe."""

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
    ):
        if model_path is None:
            raise ValueError("model_path is required for backend 'molmoe' (a MolmoE checkpoint directory)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not known; expected one of {sorted(DTYPES)}")
        self.model_path = Path(model_path)
        self.results_dir = Path(results_dir) if results_dir is not None else self.model_path
        self.device = torch.device(device)
        self.dtype = dtype
        self.image_size = _check_image_size(image_size)
        self.tier_max_crops = _check_tiers(tier_max_crops if tier_max_crops is not None else DEFAULT_TIER_MAX_CROPS)
        if not 1 <= int(max_new_tokens):
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
        self.max_new_tokens = int(max_new_tokens)
        self.dataset_names = _check_dataset_names(dataset_names)
        self.num_samples = _check_num_samples(num_samples)
        # The results files are checked before the (possibly 14 GB) weights are read.
        layers = MolmoEConfig.load(self.model_path).n_layers
        self.importance_method, self.importance = load_importance(self.results_dir, layers, importance_method)
        self.budget_range_ms = (
            _check_budget_range(budget_range_ms, "budget_range_ms argument")
            if budget_range_ms is not None
            else load_budget_range(self.results_dir)
        )
        self.model, self.tokenizer = load(self.model_path, self.device, DTYPES[dtype])
        cfg = self.cfg = self.model.cfg
        self.d_model = self.language_dim = cfg.d_model
        self.knob_space = KnobSpace(tiers=tuple(self.tier_max_crops), num_layers=cfg.n_layers,
                                    **_knob_ranges(cfg.n_layers, cfg.moe_top_k))
        if budget_token_scale is None:
            budget_token_scale = float(self.model.wte.weight.float().pow(2).mean().sqrt())
        if not 0 < float(budget_token_scale) < float("inf"):
            raise ValueError(f"budget_token_scale={budget_token_scale!r}: expected a positive finite number")
        self.budget_token_scale = float(budget_token_scale)
        self.data_root = data_root
        self.seed = int(seed)
        self.dataset_weights = dict(dataset_weights) if dataset_weights is not None else None
        self.prompt_templates = dict(prompt_templates) if prompt_templates is not None else None
        self._datasets: dict[str, Sequence[VQASample]] = {}
        self.meter = LatencyMeter(self.device, BACKEND_PHASES).attach(
            [self.model.vision, *self.model.blocks, self.model.lm_head]
        )
        self.executor = Executor(self.model, self.tokenizer.eos_id, quiet=self.meter.suspended,
                                 num_layers=self.cfg.n_layers, max_positions=self.cfg.max_position_embeddings)

    # ----------------------------------------------------------------- data
    # Same samples as the embedded backend: SynthVQA, or the official TextVQA / VQAv2 / OK-VQA files.
    dataset = VLMBackend.dataset

    def prompt(self, sample: VQASample) -> str:
        """The dataset's prompt template (envs.data.vqa) in MolmoE's chat format."""
        if not isinstance(sample.question, str) or not sample.question.strip():
            raise ValueError(f"{sample.dataset} question_id={sample.question_id!r}: question is empty")
        from envs.data.vqa import format_prompt

        return chat_prompt(format_prompt(sample, self.prompt_templates))

    def prompt_ids(self, sample: VQASample) -> list[int]:
        return self.tokenizer.encode(self.prompt(sample))

    @torch.inference_mode()
    def language_feature(self, sample: VQASample) -> torch.Tensor:
        """Mean of the frozen token embeddings of the prompt's tokens, (d_model,) float32."""
        ids = torch.tensor(self.prompt_ids(sample), device=self.device)
        return self.model.embed(ids).mean(dim=0).float()

    # ------------------------------------------------------------- episode
    @torch.inference_mode()
    def start_episode(self, sample: VQASample, tier: str, budget_token: torch.Tensor) -> MolmoEEpisode:
        if tier not in self.tier_max_crops:
            raise ValueError(f"tier={tier!r} is not known; expected one of {tuple(self.tier_max_crops)}")
        budget = torch.as_tensor(budget_token)
        if budget.shape != (self.d_model,):
            raise ValueError(f"budget_token has shape {tuple(budget.shape)}, expected ({self.d_model},)")
        if not torch.isfinite(budget).all():
            raise ValueError("budget_token contains NaN or infinite values")
        ids = self.prompt_ids(sample)
        model, timer = self.model, PhaseTimer()
        with self.meter.section(timer, "preprocess", bracket=True):
            image = load_image(sample)
            if self.image_size is not None:
                image = resize_image(image, self.image_size)
            inputs = preprocess(image, ids, self.tokenizer.bos_id, self.tier_max_crops[tier], self.cfg,
                                self.tokenizer.image_ids)
        dtype = model.wte.weight.dtype
        with self.meter.section(timer, "vision"):
            features = model.encode_images(inputs.images.to(self.device), inputs.image_masks.to(self.device))
        sequence = torch.cat(
            [model.embed_inputs(inputs, features), self.embed_budget(budget.to(self.device, dtype))[None]]
        )[None]
        if sequence.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"prefill of {sequence.shape[1]} positions exceeds the model's "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        positions = torch.arange(sequence.shape[1], device=self.device)[None]
        cos, sin = model.rope(positions, sequence)
        return MolmoEEpisode(sample, tier, inputs, sequence, cos, sin, timer)

    def embed_budget(self, budget: torch.Tensor) -> torch.Tensor:
        return budget * self.budget_token_scale

    @torch.inference_mode()
    def run_to(self, episode: MolmoEEpisode, insertion: int) -> torch.Tensor:
        if episode.insertion is not None:
            raise RuntimeError(f"run_to was already called for this episode (insertion={episode.insertion})")
        if not 1 <= insertion <= self.cfg.n_layers:
            raise ValueError(f"insertion={insertion}: expected 1..{self.cfg.n_layers}")
        hidden = episode.hidden
        with self.meter.section(episode.timer, "prefill"):
            for block, k in self._plan(insertion, self.cfg.moe_top_k, insertion):
                hidden = self.model.blocks[block](hidden, episode.cos, episode.sin, k, episode.cache)
        episode.hidden, episode.insertion = hidden, insertion
        return hidden[0, -1].float().clone()

    def elapsed_ms(self, episode: MolmoEEpisode) -> float:
        return sum(self.meter.phase_totals_ms(episode.timer).values())

    @torch.inference_mode()
    def finish(self, episode: MolmoEEpisode, top_k: int, num_blocks: int) -> EpisodeResult:
        p = episode.insertion
        if p is None:
            raise RuntimeError("finish called before run_to for this episode")
        if episode.finished:
            raise RuntimeError("finish was already called for this episode")
        if not 1 <= top_k <= self.cfg.moe_num_experts:
            raise ValueError(f"top_k={top_k}: expected 1..{self.cfg.moe_num_experts}")
        plan = self._plan(p, top_k, num_blocks)
        blocks = [b for b, _ in plan]
        model, timer, hidden = self.model, episode.timer, episode.hidden
        with self.meter.section(timer, "prefill"):
            for block, k in plan[p:]:
                hidden = model.blocks[block](hidden, episode.cos, episode.sin, k, episode.cache)
            first = model.logits(hidden[:, -2:-1]).argmax(-1)  # last prompt position, see the docstring
        prefill_tokens = hidden.shape[1]
        # the executor's greedy decoder (eager on CPU, a CUDA graph per configuration on CUDA)
        self.executor.prepare(plan, 1, episode.cache)  # a first-use capture is not the request's time
        with self.meter.section(timer, "decode", bracket=self.executor.graphs):
            ids = self.executor.decode(first, episode.cache, plan, prefill_tokens, self.max_new_tokens)
        timings = self.meter.timings_ms(timer)
        generated = trim_at_eos(ids, self.tokenizer.eos_id)[0]
        episode.cache.clear()  # the episode is over: free its KV cache
        episode.finished = True
        from envs.data.accuracy import extract_answer, score_answer

        answer = extract_answer(self.tokenizer.decode(generated))
        inputs = episode.inputs
        return EpisodeResult(
            answer=answer,
            accuracy=score_answer(answer, episode.sample),
            timings_ms=timings,
            extras={
                "tier": episode.tier,
                "max_crops": self.tier_max_crops[episode.tier],
                "crops": inputs.num_crops,
                "grid": list(inputs.grid),
                "insertion": p,
                "top_k": top_k,
                "num_blocks": num_blocks,
                "blocks": blocks,
                "vision_tokens": inputs.vision_tokens,
                "prefill_tokens": prefill_tokens,
                "generated_tokens": len(generated),
                "generated_ids": generated,
            },
        )

    def _plan(self, insertion: int, top_k: int, num_blocks: int):
        """The executor's block_plan (the one plan builder of every backend)."""
        return block_plan(self.importance, insertion, top_k, num_blocks, self.cfg.n_layers, self.cfg.moe_top_k,
                          self.knob_space.first_block_top_k)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "model_path": str(self.model_path),
            "results_dir": str(self.results_dir),
            "importance_method": self.importance_method,
            "dataset_names": list(self.dataset_names),
            "max_new_tokens": self.max_new_tokens,
            "device": str(self.device),
            "executor": self.executor.describe(),
            "dtype": self.dtype,
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
