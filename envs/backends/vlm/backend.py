"""VLMBackend: the embedded MolmoE-style VLM executing episodes under the controller's knobs.

Episode (batch size 1, see envs.backends.base):
  start_episode(sample, tier, budget_token)
      preprocess (multi-crop at `tier`) -> vision encoder -> prefill sequence
      [vision tokens][prompt tokens][budget token]; the budget token is the controller's
      d_model-wide input embedding, placed at the last prefill position.
  run_to(ep, p)
      blocks 0..p-1 over the whole prefill sequence (block 0 at knob_space.first_block_top_k,
      blocks 1..p-1 at the model's default top-k), each keeping its KV cache; returns the hidden
      state of the last (budget) position at block p-1's output, before the final norm.
  finish(ep, top_k, num_blocks)
      plan = block_plan(importance, p, top_k, num_blocks, ...) (blocks by select_blocks); blocks
      p.. of that plan run over the prefill at `top_k` (the first p are not recomputed, skipped
      blocks never run and have no cache), then greedy decoding with the same blocks and the
      same per-block top-k (envs.backends.vlm.executor: eager on CPU, a CUDA graph per
      configuration on CUDA, where the decode runs max_new_tokens steps and the ids after <eos>
      are dropped).
Both prefill stretches run through Executor.prefill: eager on CPU; on CUDA one graph per (length
bucket of PREFILL_BUCKET positions, stretch), the prefill padded on the right to its bucket.
Decode and the budget token: the budget position stays in the prefill KV cache of every block
that ran, so decoded tokens attend to it like to any prompt position; decoding appends only the
generated tokens (positions continue after the budget position) and never a new budget token.
The model was pretrained with random vectors at that position, so it answers whatever the
controller puts there.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from envs.backends.base import BACKEND_PHASES, SPLITS, Backend, EpisodeResult, check_split
from envs.backends.vlm.config import read_json_object
from envs.backends.vlm.elastic import KVCache, expert_kernel, single_row_kernel
from envs.backends.vlm.executor import (
    Executor,
    block_plan,
    encode_vision,
    first_tokens,
    prefill_sequence,
    trim_at_eos,
)
from envs.backends.vlm.model import load_model
from envs.backends.vlm.preprocess import check_tier, image_to_tensor, make_crops
from envs.data.sample import ImageLoadError, VQASample
from envs.knobs import KnobSpace
from envs.latency import LatencyMeter, PhaseTimer

DEFAULT_MODEL_PATH = Path(__file__).resolve().parents[2] / "assets" / "budgetvlm-molmoe-tiny"
PROFILE_FILE = "profile.json"
IMPORTANCE_FILE = "importance.json"
SYNTHVQA = "synthvqa"
DEFAULT_NUM_SAMPLES = {"train": 4096, "val": 512, "test": 1024}


@dataclass
class ModelEpisode:
    """State of one open episode of an ExecutorBackend (several may be open at once)."""

    sample: VQASample
    tier: str
    hidden: torch.Tensor  # (1, T, d_model): prefill sequence, then the output of the last run block
    cos: torch.Tensor
    sin: torch.Tensor
    timer: PhaseTimer
    vision_tokens: int
    facts: dict[str, Any] = field(default_factory=dict)  # backend-specific facts reported in the extras
    cache: KVCache = field(default_factory=dict)
    insertion: int | None = None
    finished: bool = False


class ExecutorBackend(Backend):
    """What every backend running a model's episodes through the executor shares (VLMBackend,
    MolmoEBackend): the options, the results files (importance.json, profile.json), the data, the
    knob space, the latency meter, the executor, run_to and finish. A subclass loads its model
    (whose cfg names num_layers, top_k, num_experts, max_positions, d_model), builds the prefill
    of an episode (start_episode) and of many samples (prefill_prefixes, for the batched
    evaluator), and says where the first answer token is read (first_tokens)."""

    DTYPES: Mapping[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    # The executor's prefill_bucket. None keeps the prefill eager in every mode, as MolmoE's: a graph
    # per (bucket, stretch) holds its blocks' keys and values (16 blocks at 1,900 positions: 250 MB
    # in bf16), and the knob space reaches about 130 stretches per bucket.
    PREFILL_BUCKET: int | None = None

    def _set_options(self, model_path: Path, results_dir, device, dtype: str, max_new_tokens: int,
                     dataset_names, data_root, num_samples, seed: int, dataset_weights, prompt_templates) -> None:
        """Every option that needs no model, checked before any weight is read."""
        from envs.machine import resolve_device

        self.model_path = Path(model_path)
        self.results_dir = Path(results_dir) if results_dir is not None else self.model_path
        self.device = resolve_device(device, "device")
        if dtype not in self.DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; expected one of {tuple(self.DTYPES)}")
        self.dtype = dtype
        if not 1 <= int(max_new_tokens):
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
        self.max_new_tokens = int(max_new_tokens)
        self.dataset_names = _check_dataset_names(dataset_names)
        self.data_root = data_root
        self.num_samples = _check_num_samples(num_samples)
        self.seed = int(seed)
        self.dataset_weights = dict(dataset_weights) if dataset_weights is not None else None
        self.prompt_templates = dict(prompt_templates) if prompt_templates is not None else None
        self._datasets: dict[str, Sequence[VQASample]] = {}

    def read_results(self, results_dir: str | Path, num_layers: int | None = None, importance_method: str | None = None,
                     budget_range_ms: Sequence[float] | None = None) -> None:
        """(Re)read block importance (results_dir/importance.json) and the budget range (budget_range_ms,
        else results_dir/profile.json); num_layers defaults to the loaded model's."""
        self.results_dir = Path(results_dir)
        num_layers = self.cfg.num_layers if num_layers is None else num_layers
        self.importance_method, self.importance = load_importance(self.results_dir, num_layers, importance_method)
        self.budget_range_ms = (
            _check_budget_range(budget_range_ms, "budget_range_ms argument")
            if budget_range_ms is not None
            else load_budget_range(self.results_dir)
        )

    def _set_model(self, model, tokenizer, tiers: Sequence[str], decode_mode: str | None,
                   max_graphs: int | None) -> None:
        """The loaded model: knob space, latency meter (hooks on the vision encoder, every block and
        the LM head) and executor."""
        self.model, self.tokenizer = model, tokenizer
        cfg = self.cfg = model.cfg
        self.d_model = self.language_dim = cfg.d_model
        self.knob_space = KnobSpace(tiers=tuple(tiers), num_layers=cfg.num_layers,
                                    **_knob_ranges(cfg.num_layers, cfg.top_k))
        self.meter = LatencyMeter(self.device, BACKEND_PHASES).attach(
            [self.model.vision, *self.model.blocks, self.model.lm_head]
        )
        ks = self.knob_space
        if max_graphs is None:  # one decode graph per configuration the controller can pick
            max_graphs = len(ks.insertion_positions) * len(ks.top_k_values) * len(ks.num_blocks_values)
        prefill_graphs = None
        if self.PREFILL_BUCKET:  # per length bucket: the first p blocks per p, the rest per configuration
            prefill_graphs = -(-cfg.max_positions // self.PREFILL_BUCKET) * (len(ks.insertion_positions) + max_graphs)
        self.executor = Executor(self.model, self.tokenizer.eos_id, mode=decode_mode, max_graphs=max_graphs,
                                 quiet=self.meter.suspended, prefill_bucket=self.PREFILL_BUCKET,
                                 max_prefill_graphs=prefill_graphs)

    # ----------------------------------------------------------------- data
    def dataset(self, split: str) -> Sequence[VQASample]:
        check_split(split)
        if split not in self._datasets:
            n = self.num_samples[split]
            if self.dataset_names == (SYNTHVQA,):
                from envs.data.synthvqa import SynthVQA

                self._datasets[split] = SynthVQA(split, n, seed=self.seed)
            else:
                from envs.data.vqa import load_vqa_mixture

                if self.data_root is None:
                    raise ValueError(f"dataset_names={list(self.dataset_names)} need data_root (got None)")
                if split == "train":
                    samples = load_vqa_mixture(self.dataset_names, self.data_root, "train",
                                               weights=self.dataset_weights, num_samples=n, seed=self.seed)
                else:
                    # The official test splits have no answers: our val and test are the two halves of
                    # the official val split (shuffled once by seed), so they never share a question.
                    official = load_vqa_mixture(self.dataset_names, self.data_root, "val",
                                                weights=self.dataset_weights, seed=self.seed)
                    half = len(official) // 2
                    samples = (official[:half] if split == "val" else official[half:])[:n]
                self._datasets[split] = samples
        return self._datasets[split]

    @torch.inference_mode()
    def language_feature(self, sample: VQASample) -> torch.Tensor:
        """Mean of the frozen decoder token embeddings of the prompt's tokens, (d_model,) float32."""
        ids = torch.as_tensor(self.prompt_ids(sample), dtype=torch.long, device=self.device)
        return self.model.embed(ids).mean(dim=0).float()

    def _check_budget_token(self, budget_token: torch.Tensor) -> torch.Tensor:
        budget = torch.as_tensor(budget_token)
        if budget.shape != (self.d_model,):
            raise ValueError(f"budget_token has shape {tuple(budget.shape)}, expected ({self.d_model},)")
        if not torch.isfinite(budget).all():
            raise ValueError("budget_token contains NaN or infinite values")
        return budget.to(self.device)

    # ------------------------------------------------------------- model pieces
    def embed_budget(self, budget: torch.Tensor) -> torch.Tensor:
        """The budget token's input embedding (..., d_model) in the model's dtype."""
        return self.model.embed_budget(budget.to(self.DTYPES[self.dtype]))

    def first_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy first answer token (batch, 1) of prefill outputs (batch, T, d): at the last position."""
        return first_tokens(self.model, hidden)

    # ------------------------------------------------------------- episode
    @torch.inference_mode()
    def run_to(self, episode: ModelEpisode, insertion: int) -> torch.Tensor:
        if episode.insertion is not None:
            raise RuntimeError(f"run_to was already called for this episode (insertion={episode.insertion})")
        if not 1 <= insertion <= self.cfg.num_layers:
            raise ValueError(f"insertion={insertion}: expected 1..{self.cfg.num_layers}")
        prefix = self._plan(insertion, self.cfg.top_k, insertion)
        inputs = (episode.hidden, episode.cos, episode.sin)
        self.executor.prepare_prefill(prefix, *inputs)  # a first-use graph capture is not the request's time
        with self.meter.section(episode.timer, "prefill"):
            hidden = self.executor.prefill(*inputs, prefix, episode.cache)
        episode.hidden, episode.insertion = hidden, insertion
        return hidden[0, -1].float().clone()

    def elapsed_ms(self, episode: ModelEpisode) -> float:
        return sum(self.meter.phase_totals_ms(episode.timer).values())

    @torch.inference_mode()
    def finish(self, episode: ModelEpisode, top_k: int, num_blocks: int) -> EpisodeResult:
        p = episode.insertion
        if p is None:
            raise RuntimeError("finish called before run_to for this episode")
        if episode.finished:
            raise RuntimeError("finish was already called for this episode")
        if not 1 <= top_k <= self.cfg.num_experts:
            raise ValueError(f"top_k={top_k}: expected 1..{self.cfg.num_experts}")
        plan = self._plan(p, top_k, num_blocks)
        timer, inputs = episode.timer, (episode.hidden, episode.cos, episode.sin)
        self.executor.prepare_prefill(plan[p:], *inputs)
        with self.meter.section(timer, "prefill"):
            hidden = self.executor.prefill(*inputs, plan[p:], episode.cache)
            first = self.first_tokens(hidden)
        prefill_tokens = hidden.shape[1]
        self.executor.prepare(plan, 1, episode.cache)  # a first-use graph capture is not the request's time
        # A replayed graph calls no module; on CUDA the meter brackets every section itself.
        with self.meter.section(timer, "decode"):
            ids = self.executor.decode(first, episode.cache, plan, prefill_tokens, self.max_new_tokens)
        timings = self.meter.timings_ms(timer)  # the episode's one synchronisation
        generated = trim_at_eos(ids, self.tokenizer.eos_id)[0]
        episode.cache.clear()  # the episode is over: free its KV cache
        episode.finished = True
        from envs.data.accuracy import extract_answer, score_answer

        answer = extract_answer(self.tokenizer.decode(generated))
        return EpisodeResult(
            answer=answer,
            accuracy=score_answer(answer, episode.sample),
            timings_ms=timings,
            extras={
                "tier": episode.tier,
                **episode.facts,
                "insertion": p,
                "top_k": top_k,
                "num_blocks": num_blocks,
                "blocks": [b for b, _ in plan],
                "vision_tokens": episode.vision_tokens,
                "prefill_tokens": prefill_tokens,
                "generated_tokens": len(generated),
                "decode_steps": ids.shape[1] - 1,
                "generated_ids": generated,
            },
        )

    def _plan(self, insertion: int, top_k: int, num_blocks: int):
        """The executor's block_plan (the one plan builder of every backend)."""
        return block_plan(self.importance, insertion, top_k, num_blocks, self.cfg.num_layers, self.cfg.top_k,
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
            "dtype": self.dtype,
            "expert_kernel": expert_kernel(self.device, self.DTYPES[self.dtype], training=False),
            "single_row_expert_kernel": single_row_kernel(self.device, self.DTYPES[self.dtype],
                                                          self.model.blocks[0].layer.mlp.experts),
            "executor": self.executor.describe(),
        }


class VLMBackend(ExecutorBackend):
    """See the module docstring; keyword config documented in envs.backends.vlm."""

    # Vision tokens come in whole crops (16 tokens each in the shipped model) and prompts differ by a
    # few words, so few buckets recur; padding adds at most 31 positions of work to a stretch whose
    # every launch the graph removes (the model is launch-bound on the GPU).
    PREFILL_BUCKET = 32

    def __init__(
        self,
        model_path: str | Path | None = None,
        results_dir: str | Path | None = None,
        dataset_names: Sequence[str] = (SYNTHVQA,),
        data_root: str | Path | None = None,
        num_samples: Mapping[str, int] | int | None = None,
        seed: int = 0,
        device: str = "cpu",
        importance_method: str | None = None,
        max_new_tokens: int = 4,
        budget_range_ms: Sequence[float] | None = None,
        dataset_weights: Mapping[str, float] | None = None,
        prompt_templates: Mapping[str, str] | None = None,
        dtype: str = "float32",
        decode_mode: str | None = None,
        max_graphs: int | None = None,
    ):
        self._set_options(model_path if model_path is not None else DEFAULT_MODEL_PATH, results_dir, device, dtype,
                          max_new_tokens, dataset_names, data_root, num_samples, seed, dataset_weights,
                          prompt_templates)
        model, tokenizer = load_model(self.model_path, self.device, self.DTYPES[dtype])
        self.read_results(self.results_dir, model.cfg.num_layers, importance_method, budget_range_ms)
        self._set_model(model, tokenizer, model.cfg.tiers, decode_mode, max_graphs)

    # ----------------------------------------------------------------- data
    def prompt(self, sample: VQASample) -> str:
        """SynthVQA questions go in as they are (the model's training format); real datasets get
        their dataset's prompt template."""
        if not isinstance(sample.question, str) or not sample.question.strip():
            raise ValueError(f"{sample.dataset} question_id={sample.question_id!r}: question is empty")
        if sample.dataset == SYNTHVQA:
            return sample.question
        from envs.data.vqa import format_prompt

        return format_prompt(sample, self.prompt_templates)

    def prompt_ids(self, sample: VQASample) -> torch.Tensor:
        ids = self.tokenizer.encode(self.prompt(sample))
        if not ids:
            raise ValueError(
                f"{sample.dataset} question_id={sample.question_id!r}: question {sample.question!r} has no words"
            )
        if all(i == self.tokenizer.unk_id for i in self.tokenizer.encode(sample.question)):
            raise ValueError(
                f"{sample.dataset} question_id={sample.question_id!r}: question {sample.question!r} has no word the "
                f"model's tokenizer knows ({self.tokenizer.vocab_size} words); its answer could not depend on it"
            )
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------- episode
    @torch.inference_mode()
    def start_episode(self, sample: VQASample, tier: str, budget_token: torch.Tensor) -> ModelEpisode:
        check_tier(self.cfg, tier)
        budget = self._check_budget_token(budget_token)
        ids = self.prompt_ids(sample)
        timer = PhaseTimer()
        with self.meter.section(timer, "preprocess", bracket=True):
            image = load_image(sample)
            crops, slots = make_crops(image.to(self.device)[None], tier, self.cfg)
        self.executor.prepare_vision(crops, slots)  # a first-use capture is not the request's time
        with self.meter.section(timer, "vision"):
            vision = self.executor.encode(crops, slots)
        sequence, cos, sin = prefill_sequence(self.model, vision, ids[None], budget[None])
        return ModelEpisode(sample, tier, sequence, cos, sin, timer, vision_tokens=vision.shape[1])

    @torch.inference_mode()
    def prefill_prefixes(self, images: Sequence[torch.Tensor], prompt_ids: Sequence[torch.Tensor], tier: str,
                         batch_size: int) -> list[torch.Tensor]:
        """[vision][prompt] input embeddings (T_i, d_model) per sample at `tier`, as start_episode
        builds them before the budget token; the vision encoder runs batched per image size."""
        check_tier(self.cfg, tier)
        vision: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(i)
        for idx in by_size.values():
            for j in range(0, len(idx), batch_size):
                chunk = idx[j : j + batch_size]
                batch = torch.stack([images[i] for i in chunk]).to(self.device)
                for row, i in zip(encode_vision(self.model, batch, tier), chunk):
                    vision[i] = row
        return [torch.cat([v, self.model.embed(ids.to(self.device))]) for v, ids in zip(vision, prompt_ids)]

    def describe(self) -> dict:
        return {**super().describe(), "tier_max_crops": dict(self.cfg.tier_max_crops)}


# ------------------------------------------------------------------- helpers
def _knob_ranges(num_layers: int, top_k: int) -> dict:
    """The design's knob values scaled to the model: p in 1..5, k in top_k-4..top_k, N in L-4..L."""
    return {
        "insertion_positions": tuple(range(1, min(5, num_layers - 4) + 1)) if num_layers > 5 else (1,),
        "top_k_values": tuple(range(max(1, top_k - 4), top_k + 1)),
        "num_blocks_values": tuple(range(max(1, num_layers - 4), num_layers + 1)),
        "first_block_top_k": top_k,
    }


def load_image(sample: VQASample) -> torch.Tensor:
    """The sample's image as a (3, H, W) uint8 tensor; decoding failures become ImageLoadError."""
    what = f"{sample.dataset} question_id={sample.question_id!r}"
    try:
        image = sample.image
    except ImageLoadError:
        raise
    except Exception as err:  # PIL raises many types for unreadable files
        raise ImageLoadError(f"{what}: image cannot be decoded: {type(err).__name__}: {err}") from err
    pixels = image_to_tensor(image, what)
    if pixels.shape[1] == 0 or pixels.shape[2] == 0:  # nothing to crop: as unreadable as a corrupt file
        raise ImageLoadError(f"{what}: image is {pixels.shape[2]}x{pixels.shape[1]} pixels; expected at least 1x1")
    return pixels


def _repeated_keys(path: Path) -> list[str]:
    """Keys repeated within one object of a JSON file (json.loads silently keeps the last one)."""
    repeated: list[str] = []

    def check(pairs):
        keys = [k for k, _ in pairs]
        repeated.extend(sorted({k for k in keys if keys.count(k) > 1}))
        return dict(pairs)

    json.loads(path.read_text(), object_pairs_hook=check)
    return repeated


def load_importance(results_dir: Path, num_layers: int, method: str | None) -> tuple[str, dict[int, float]]:
    """Block importance from results_dir/importance.json ({"method": str, "scores": {"0": float, ...}})."""
    path = results_dir / IMPORTANCE_FILE
    data = read_json_object(path, "block importance")
    repeated = _repeated_keys(path)
    if repeated:
        raise ValueError(f"{path}: key(s) {repeated} appear more than once; expected each block scored once")
    found = data.get("method")
    if not isinstance(found, str) or not found:
        raise ValueError(f"{path}: field 'method' is {found!r}, expected a non-empty string")
    if method is not None and found != method:
        raise ValueError(f"{path}: method is {found!r} but importance_method={method!r} was requested")
    scores = data.get("scores")
    if not isinstance(scores, dict):
        raise ValueError(f"{path}: field 'scores' is {type(scores).__name__}, expected an object {{'0': float, ...}}")
    expected = {str(i) for i in range(num_layers)}
    missing = sorted(expected - set(scores), key=int)
    extra = sorted(set(scores) - expected)
    if missing or extra:
        raise ValueError(
            f"{path}: 'scores' must have one entry per block '0'..'{num_layers - 1}'; "
            f"missing {missing}, unexpected {extra}"
        )
    result = {}
    for key, value in scores.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}: scores[{key!r}]={value!r}, expected a finite number")
        result[int(key)] = float(value)
    return found, result


def load_budget_range(results_dir: Path) -> tuple[float, float]:
    path = results_dir / PROFILE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"latency profile {path} does not exist (it supplies budget_range_ms); run runners/profile_configs.py "
            f"or pass budget_range_ms=[lo, hi]"
        )
    data = read_json_object(path, "latency profile")
    if "budget_range_ms" not in data:
        raise ValueError(f"{path}: field 'budget_range_ms' is missing")
    return _check_budget_range(data["budget_range_ms"], f"{path}: budget_range_ms")


def _check_budget_range(value: Any, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={value!r}: expected [lo, hi] in ms") from None
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"{what}={value!r}: expected 0 < lo < hi < inf")
    return lo, hi


def _check_dataset_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise ValueError(f"dataset_names={names!r}: expected a list of names, not one string")
    names = tuple(names)
    if not names:
        raise ValueError("dataset_names is empty")
    from envs.data.vqa import DATASET_NAMES

    unknown = [n for n in names if n not in (SYNTHVQA, *DATASET_NAMES)]
    if unknown:
        raise ValueError(f"dataset_names={list(names)}: unknown dataset(s) {unknown}; expected {SYNTHVQA!r} or a "
                         f"subset of {list(DATASET_NAMES)}")
    if SYNTHVQA in names and len(names) > 1:
        raise ValueError(f"dataset_names={list(names)}: synthvqa cannot be mixed with real datasets")
    return names


def _check_num_samples(num_samples: Mapping[str, int] | int | None) -> dict[str, int]:
    if num_samples is None:
        return dict(DEFAULT_NUM_SAMPLES)
    if isinstance(num_samples, int) and not isinstance(num_samples, bool):
        num_samples = {split: num_samples for split in SPLITS}
    if not isinstance(num_samples, Mapping):
        raise ValueError(f"num_samples={num_samples!r}: expected an int or a mapping split -> int")
    result = dict(DEFAULT_NUM_SAMPLES)
    for split, n in num_samples.items():
        check_split(split)
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"num_samples[{split!r}]={n!r}: expected a positive int")
        result[split] = n
    return result
