"""Static-configuration profiling, block importance and latency benchmarks of the embedded VLM.

Library code behind runners/profile.py and runners/bench.py (runners -> envs -> backends); it only
uses the public API of envs.backends.vlm.

Static configurations
    tier x top-k x num_blocks at insertion p = 1 (the minimum): block 0 runs at
    knob_space.first_block_top_k, the other blocks kept by envs.knobs.select_blocks(importance,
    1, N, L) run at top-k. The budget token is a zero vector (a static configuration has no
    controller); `ZERO_BUDGET_NOTE` is stored in profile.json's meta.

Accuracy (`BatchedEvaluator`)
    A batched replica of VLMBackend.start_episode / run_to / finish that calls the very same model
    pieces in the same order: make_crops -> encode_images -> [vision][prompt][budget] -> rope ->
    blocks[b](h, cos, sin, k, cache) for the plan -> logits of the last position -> greedy decode
    with the KV cache and the same plan, stopping at <eos> or max_new_tokens. Rows of a batch
    share one sequence length (samples are grouped by tier and prompt length), so no padding or
    mask enters the computation and every row computes what a batch-1 episode computes
    (tests/test_profile.py checks the generated ids against VLMBackend episodes). Vision tokens
    are computed once per (sample, tier) and reused by every configuration of that tier.

Latency (`measure_latency`)
    Batch-1 VLMBackend episodes (start_episode -> run_to(1) -> finish), timed by the backend's own
    hook meter, after warm-up; the total is preprocess + vision + prefill + decode, as in the env
    (minus the Stage-2 controller's time, which a static configuration does not have). Samples
    are the outer loop and the configurations run in a shuffled order per sample, so a change in
    machine load spreads over all configurations instead of biasing a few.

Budget range (`budget_range`): see its docstring.

Block importance (one score per block, higher = more important, block 0 included)
    drop_accuracy    the design's method: accuracy of the full configuration (high tier, every
                     block at the model's top-k) minus its accuracy with block i alone removed.
    block_influence  ShortGPT's Block Influence: 1 - cos(block input, block output) per token,
                     averaged over the prefill tokens of every sample, in the full configuration.
"""
from __future__ import annotations

import json
import math
import random
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from envs.backends.base import BACKEND_PHASES, SPLITS
from envs.backends.vlm import VLMBackend, load_importance, make_crops
from envs.backends.vlm.backend import IMPORTANCE_FILE, load_image
from envs.backends.vlm.config import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from envs.data.accuracy import extract_answer, score_answer
from envs.data.sample import ImageLoadError, VQASample
from envs.knobs import KnobSpace, select_blocks

MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
IMPORTANCE_METHODS = ("drop_accuracy", "block_influence")
ZERO_BUDGET_NOTE = (
    "static configurations run with a zero budget token (a d_model-wide zero vector at the last "
    "prefill position), since no controller is involved"
)
PROFILE_INSERTION = 1  # the minimum p: the knobs act on every block after block 0


# ------------------------------------------------------------------------------- validation
def check_model_dir(path: str | Path, field: str = "model_path") -> Path:
    """`path` must be a dir holding config.json, model.safetensors and tokenizer.json."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{field}={str(path)!r}: model directory does not exist; expected a dir with {', '.join(MODEL_FILES)}"
        )
    for name in MODEL_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{field}={str(path)!r}: model file {name} is missing ({path / name}); "
                f"expected {', '.join(MODEL_FILES)}"
            )
    return path


def check_positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}={value!r} is invalid; expected a positive int (> 0)")
    return value


def check_split_name(split: Any, field: str = "split") -> str:
    if split not in SPLITS:
        raise ValueError(f"{field}={split!r} is not a known split; expected one of {SPLITS}")
    return split


def check_subset(field: str, values: Sequence | None, allowed: Sequence) -> tuple:
    """A user-chosen subset of a knob's values (None = all), in the knob space's order."""
    if values is None:
        return tuple(allowed)
    values = list(values)
    if not values:
        raise ValueError(f"{field}=[] is empty; expected a non-empty subset of {list(allowed)}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{field}={values}: value(s) {unknown} not in the knob space; expected a subset of {list(allowed)}")
    return tuple(v for v in allowed if v in values)


# ------------------------------------------------------------------------------- weights and load
def weights_sha256(model_path: str | Path) -> str:
    """sha256 of the model dir's model.safetensors (which weights a profile or benchmark measured)."""
    import hashlib

    digest = hashlib.sha256()
    with open(Path(model_path) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class StaticConfig:
    tier: str
    top_k: int
    num_blocks: int
    insertion: int = PROFILE_INSERTION

    @property
    def name(self) -> str:
        return f"{self.tier}/k{self.top_k}/N{self.num_blocks}"


def static_configs(
    knob_space: KnobSpace,
    tiers: Sequence[str] | None = None,
    top_k: Sequence[int] | None = None,
    num_blocks: Sequence[int] | None = None,
) -> list[StaticConfig]:
    """tier x top-k x num_blocks at p = 1 (optionally a subset of each knob's values)."""
    tiers = check_subset("tiers", tiers, knob_space.tiers)
    ks = check_subset("top_k", top_k, knob_space.top_k_values)
    ns = check_subset("num_blocks", num_blocks, knob_space.num_blocks_values)
    return [StaticConfig(t, k, n) for t in tiers for k in ks for n in ns]


def block_plan(
    importance: Mapping[int, float], insertion: int, top_k: int, num_blocks: int, knob_space: KnobSpace,
    model_top_k: int,
) -> list[tuple[int, int]]:
    """[(block, top_k)] exactly as VLMBackend.run_to + finish run them: select_blocks by importance;
    block 0 at first_block_top_k, blocks 1..p-1 at the model's top-k, the rest at `top_k`."""
    blocks = select_blocks(importance, insertion, num_blocks, knob_space.num_layers)

    def k_of(b: int) -> int:
        if b == 0:
            return knob_space.first_block_top_k
        return model_top_k if b < insertion else top_k

    return [(b, k_of(b)) for b in blocks]


def full_plan(knob_space: KnobSpace, model_top_k: int) -> list[tuple[int, int]]:
    """Every block, block 0 at first_block_top_k, the others at the model's own top-k."""
    return [(b, knob_space.first_block_top_k if b == 0 else model_top_k) for b in range(knob_space.num_layers)]


# ------------------------------------------------------------------------------- backends
@contextmanager
def evaluation_backend(model_path: Path, **kwargs):
    """A VLMBackend for data, prompts and model pieces when no importance.json exists yet.

    VLMBackend requires results_dir/importance.json; this one gets a placeholder (all zeros) in a
    temporary dir. Its `importance` must never decide anything: the batched evaluator takes
    explicit block plans.
    """
    with tempfile.TemporaryDirectory(prefix="budgetvlm-profile-") as tmp:
        cfg = json.loads((Path(model_path) / CONFIG_FILE).read_text())
        layers = int(cfg.get("num_layers", 16))
        Path(tmp, IMPORTANCE_FILE).write_text(
            json.dumps({"method": "placeholder", "scores": {str(i): 0.0 for i in range(layers)}})
        )
        yield VLMBackend(model_path=model_path, results_dir=tmp, budget_range_ms=(1.0, 2.0), **kwargs)


def load_samples(backend: VLMBackend, split: str, count: int) -> tuple[list[VQASample], int]:
    """The first `count` loadable samples of `split` and how many were skipped (unreadable images)."""
    data = backend.dataset(split)
    samples, skipped = [], 0
    for i in range(len(data)):
        if len(samples) == count:
            break
        sample = data[i]
        try:
            load_image(sample)
        except ImageLoadError:
            skipped += 1
            continue
        samples.append(sample)
    return samples, skipped


def sample_group(sample: VQASample) -> str:
    """Accuracy breakdown key: SynthVQA's question family, else the dataset name."""
    return sample.family if sample.family is not None else sample.dataset


# ------------------------------------------------------------------------------- batched accuracy
class BatchedEvaluator:
    """Greedy answers of many samples under any block plan, batched (see the module docstring)."""

    def __init__(self, backend: VLMBackend, samples: Sequence[VQASample], batch_size: int = 64,
                 max_new_tokens: int | None = None):
        self.backend = backend
        self.model = backend.model
        self.cfg = backend.cfg
        self.device = backend.device
        self.samples = list(samples)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.max_new_tokens = backend.max_new_tokens if max_new_tokens is None else max_new_tokens
        self.eos = backend.tokenizer.eos_id
        self.prompt_ids = [backend.prompt_ids(s) for s in self.samples]
        self._images: list[torch.Tensor] | None = [load_image(s) for s in self.samples]
        self._vision: dict[str, list[torch.Tensor]] = {}
        # batches of sample indices with equal prompt length and image size (one tiling, so equal
        # sequence length within a tier)
        by_shape: dict[tuple, list[int]] = {}
        for i, ids in enumerate(self.prompt_ids):
            by_shape.setdefault((len(ids), *self._images[i].shape), []).append(i)
        self.batches = [
            idx[j : j + self.batch_size] for _, idx in sorted(by_shape.items()) for j in range(0, len(idx), self.batch_size)
        ]

    @torch.inference_mode()
    def vision_tokens(self, tier: str) -> list[torch.Tensor]:
        """Per-sample vision tokens (V, d) at `tier`, computed once (batched by image size)."""
        if tier not in self._vision:
            if self._images is None:
                raise RuntimeError("images were released; vision tokens of a new tier cannot be computed")
            out: list[torch.Tensor | None] = [None] * len(self.samples)
            by_size: dict[tuple, list[int]] = {}
            for i, image in enumerate(self._images):
                by_size.setdefault(tuple(image.shape), []).append(i)
            for idx in by_size.values():
                for j in range(0, len(idx), self.batch_size):
                    chunk = idx[j : j + self.batch_size]
                    images = torch.stack([self._images[i] for i in chunk]).to(self.device)
                    vision = self.model.encode_images(*make_crops(images, tier, self.cfg))
                    for row, i in enumerate(chunk):
                        out[i] = vision[row]
            self._vision[tier] = out
        return self._vision[tier]

    def release_images(self, keep_tiers: Iterable[str]) -> None:
        """Compute vision tokens of `keep_tiers` and drop the decoded images (memory)."""
        for tier in keep_tiers:
            self.vision_tokens(tier)
        self._images = None

    @torch.inference_mode()
    def generate(self, tier: str, plan: Sequence[tuple[int, int]], budget: torch.Tensor | None = None,
                 influence: dict | None = None) -> list[list[int]]:
        """Generated ids per sample (up to and including <eos>), as VLMBackend.finish would produce.

        influence: if a dict is given, per-block sums of 1 - cos(input, output) over prefill tokens
        are accumulated into it as {block: [sum, count]}.
        """
        return self.generate_many(tier, {"plan": plan}, budget, influence)["plan"]

    @torch.inference_mode()
    def generate_many(self, tier: str, plans: Mapping[Any, Sequence[tuple[int, int]]],
                      budget: torch.Tensor | None = None, influence: dict | None = None) -> dict[Any, list[list[int]]]:
        """generate() for several plans of one tier, sharing the prefill of common plan prefixes.

        The plans form a trie of (block, top_k) steps; each prefill block call is made once per
        trie node and its output and KV-cache entry are reused by every plan below that node
        (each branch works on its own shallow copy of the cache dict; block calls never modify
        cached tensors in place). Every plan still sees exactly the block calls of its own
        batch-1 episode. influence (as in generate) needs a single plan.
        """
        if influence is not None and len(plans) != 1:
            raise ValueError("influence statistics need exactly one plan")
        model, d = self.model, self.cfg.d_model
        budget = (torch.zeros(d) if budget is None else budget).to(self.device)
        vision = self.vision_tokens(tier)
        plans = {name: [(int(b), int(k)) for b, k in plan] for name, plan in plans.items()}
        generated: dict[Any, list] = {name: [None] * len(self.samples) for name in plans}
        for idx in self.batches:
            seq = torch.stack([
                torch.cat([vision[i], model.embed(self.prompt_ids[i]), budget.to(vision[i].dtype)[None]], dim=0)
                for i in idx
            ])
            if seq.shape[1] > self.cfg.max_positions:
                raise ValueError(
                    f"prefill of {seq.shape[1]} positions exceeds the model's max_positions={self.cfg.max_positions}"
                )
            positions = torch.arange(seq.shape[1], device=self.device)[None]
            cos, sin = model.rope(positions, seq)

            def descend(depth: int, hidden: torch.Tensor, cache: dict, names: list) -> None:
                children: dict[tuple[int, int], list] = {}
                for name in names:
                    plan = plans[name]
                    if len(plan) == depth:
                        ids = self._decode(hidden, dict(cache), plan)
                        for row, i in enumerate(idx):
                            generated[name][i] = ids[row]
                    else:
                        children.setdefault(plan[depth], []).append(name)
                for (block, k), below in children.items():
                    branch = dict(cache)
                    out = model.blocks[block](hidden, cos, sin, k, branch)
                    if influence is not None:
                        cosine = F.cosine_similarity(hidden.float(), out.float(), dim=-1)
                        entry = influence.setdefault(block, [0.0, 0])
                        entry[0] += float((1.0 - cosine).sum())
                        entry[1] += cosine.numel()
                    descend(depth + 1, out, branch, below)

            descend(0, seq, {}, list(plans))
        return generated

    def _decode(self, hidden: torch.Tensor, cache: dict, plan: Sequence[tuple[int, int]]) -> list[list[int]]:
        """Greedy tokens after the prefill `hidden` (B, T, d), as VLMBackend.finish decodes."""
        model = self.model
        token = model.logits(hidden[:, -1:]).argmax(-1)  # (B, 1)
        steps = [token]
        position = hidden.shape[1]
        done = token[:, 0] == self.eos
        while len(steps) < self.max_new_tokens and not bool(done.all()):
            hidden = model.embed(token)
            cos, sin = model.rope(torch.tensor([[position]], device=self.device), hidden)
            for block, k in plan:
                hidden = model.blocks[block](hidden, cos, sin, k, cache)
            token = model.logits(hidden).argmax(-1)
            steps.append(token)
            done |= token[:, 0] == self.eos
            position += 1
        out = []
        for row in torch.cat(steps, dim=1).tolist():
            ids = []
            for t in row:
                ids.append(t)
                if t == self.eos:
                    break
            out.append(ids)
        return out

    def score(self, generated: Sequence[Sequence[int]]) -> list[float]:
        """Per-sample accuracy of generated ids (the dataset's metric, as VLMBackend.finish scores it)."""
        tok = self.backend.tokenizer
        return [score_answer(extract_answer(tok.decode(ids)), s) for ids, s in zip(generated, self.samples)]

    def accuracies(self, tier: str, plan: Sequence[tuple[int, int]], influence: dict | None = None) -> list[float]:
        """Per-sample accuracy under one plan."""
        return self.score(self.generate(tier, plan, influence=influence))

    def accuracies_many(self, tier: str, plans: Mapping[Any, Sequence[tuple[int, int]]]) -> dict[Any, list[float]]:
        """Per-sample accuracy under each of several plans of one tier (shared prefixes run once)."""
        return {name: self.score(ids) for name, ids in self.generate_many(tier, plans).items()}


def summarize_accuracy(samples: Sequence[VQASample], accs: Sequence[float]) -> tuple[float, dict[str, float]]:
    groups: dict[str, list[float]] = {}
    for s, a in zip(samples, accs):
        groups.setdefault(sample_group(s), []).append(a)
    return sum(accs) / len(accs), {g: sum(v) / len(v) for g, v in sorted(groups.items())}


# ------------------------------------------------------------------------------- importance
def compute_importance(evaluator: BatchedEvaluator, knob_space: KnobSpace, model_top_k: int,
                       tier: str | None = None) -> dict[str, dict]:
    """Both methods on the evaluator's samples in the full configuration; {method: record}."""
    tier = tier or knob_space.tiers[-1]
    plan = full_plan(knob_space, model_top_k)
    influence: dict = {}
    base = evaluator.accuracies(tier, plan, influence=influence)
    base_acc = sum(base) / len(base)
    dropped = evaluator.accuracies_many(
        tier, {b: [x for x in plan if x[0] != b] for b in range(knob_space.num_layers)}
    )
    without = {b: sum(a) / len(a) for b, a in dropped.items()}
    drop = {str(b): base_acc - without[b] for b in range(knob_space.num_layers)}
    bi = {str(b): influence[b][0] / influence[b][1] for b in range(knob_space.num_layers)}
    common = {"num_samples": len(evaluator.samples), "tier": tier,
              "plan": [[b, k] for b, k in plan], "budget_token": "zeros"}
    records = {
        "drop_accuracy": {
            "method": "drop_accuracy",
            "description": "accuracy of the full configuration minus its accuracy with block i alone "
                           "removed (higher = more important); block 0 scored although it always runs",
            "scores": drop,
            "full_accuracy": base_acc,
            "accuracy_without_block": {str(b): a for b, a in without.items()},
            **common,
        },
        "block_influence": {
            "method": "block_influence",
            "description": "ShortGPT block influence: 1 - cos(block input, block output), averaged over "
                           "the prefill tokens of all samples in the full configuration (higher = more important)",
            "scores": bi,
            **common,
        },
    }
    for rec in records.values():
        for key, value in rec["scores"].items():
            if not math.isfinite(value):
                raise ValueError(f"importance {rec['method']}: score of block {key} is {value}, expected finite")
    return records


def read_importance(path: str | Path, num_layers: int) -> tuple[str, dict[int, float]]:
    """An importance.json anywhere (validated like VLMBackend reads it)."""
    path = Path(path)
    if path.is_dir():
        path = path / IMPORTANCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"importance_file={str(path)!r} does not exist")
    tmp_dir = path.parent
    if path.name != IMPORTANCE_FILE:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, IMPORTANCE_FILE).write_text(path.read_text())
            return load_importance(Path(tmp), num_layers, None)
    return load_importance(tmp_dir, num_layers, None)


# ------------------------------------------------------------------------------- latency
def latency_stats(totals: Sequence[float]) -> dict[str, float]:
    t = torch.tensor(list(totals), dtype=torch.float64)
    return {
        "latency_mean_ms": float(t.mean()),
        "latency_p50_ms": float(torch.quantile(t, 0.5)),
        "latency_p95_ms": float(torch.quantile(t, 0.95)),
        "latency_std_ms": float(t.std(unbiased=True)) if len(t) > 1 else 0.0,
        "latency_iqr_ms": float(torch.quantile(t, 0.75) - torch.quantile(t, 0.25)),
    }


def run_episode(backend: VLMBackend, sample: VQASample, config: StaticConfig, budget: torch.Tensor):
    ep = backend.start_episode(sample, config.tier, budget)
    backend.run_to(ep, config.insertion)
    return backend.finish(ep, config.top_k, config.num_blocks)


def measure_latency(
    backend: VLMBackend, samples: Sequence[VQASample], configs: Sequence[StaticConfig], warmup: int = 2,
    seed: int = 0, repeats: int = 1, progress: Callable[[str], None] | None = None,
) -> dict[StaticConfig, list[dict[str, float]]]:
    """Per-config list of batch-1 phase timings (ms), interleaved (see the module docstring)."""
    budget = torch.zeros(backend.d_model)
    rng = random.Random(seed)
    for _ in range(warmup):  # every config once per warm-up round (allocator, caches, lazy init)
        for c in configs:
            run_episode(backend, samples[0], c, budget)
    results: dict[StaticConfig, list[dict[str, float]]] = {c: [] for c in configs}
    start = time.perf_counter()
    for r in range(repeats):
        for n, sample in enumerate(samples):
            order = list(configs)
            rng.shuffle(order)
            for c in order:
                results[c].append(run_episode(backend, sample, c, budget).timings_ms)
            if progress and (n + 1) % max(1, len(samples) // 10) == 0:
                progress(f"latency: repeat {r + 1}/{repeats}, {n + 1}/{len(samples)} samples, "
                         f"{time.perf_counter() - start:.0f}s")
    return results


def total_ms(timings: Mapping[str, float]) -> float:
    return float(sum(timings[p] for p in BACKEND_PHASES))


# ------------------------------------------------------------------------------- Pareto / budget
def pareto_frontier(configs: Sequence[Mapping], acc_key: str = "accuracy_mean",
                    lat_key: str = "latency_mean_ms") -> list[int]:
    """Indices of configs not dominated in (accuracy up, latency down).

    c' dominates c when acc' >= acc and lat' <= lat with at least one strict; exact ties are
    kept (neither dominates the other).
    """
    front = []
    for i, c in enumerate(configs):
        dominated = any(
            o[acc_key] >= c[acc_key] and o[lat_key] <= c[lat_key]
            and (o[acc_key] > c[acc_key] or o[lat_key] < c[lat_key])
            for j, o in enumerate(configs) if j != i
        )
        if not dominated:
            front.append(i)
    return front


# Headroom over the fastest configuration's p95 for the lowest budget: the episode also pays the
# Stage-2 controller's own time, and latency drifts a few percent between the profile and a run.
LOW_BUDGET_HEADROOM = 1.1

BUDGET_RANGE_RULE = (
    f"[{LOW_BUDGET_HEADROOM} x min over the latency Pareto frontier (accuracy up, mean latency down) of latency_p95_ms, "
    "max over the frontier of latency_p95_ms]: from the lowest budget that the fastest useful "
    "configuration meets 95% of the time (with headroom for the controller's own time) to the most "
    "accurate one's tail, so a policy can keep violations under 5% at every budget of the range and the "
    "top configuration fits at p95. If that span is empty (e.g. a one-point frontier), the same rule "
    "over all configurations is used instead."
)


def budget_range(configs: Sequence[Mapping]) -> tuple[list[float], str, list[int]]:
    """([lo, hi], which rule applied, frontier indices); see BUDGET_RANGE_RULE."""
    def span(p95s: list[float]) -> tuple[float, float]:
        return LOW_BUDGET_HEADROOM * min(p95s), max(p95s)

    front = pareto_frontier(configs)
    lo, hi = span([configs[i]["latency_p95_ms"] for i in front])
    rule = "pareto_frontier"
    if not 0 < lo < hi:
        lo, hi = span([c["latency_p95_ms"] for c in configs])
        rule = "all_configs (frontier span empty)"
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"budget range [{lo}, {hi}] from the profile is empty; need 0 < lo < hi")
    return [lo, hi], rule, front


# ------------------------------------------------------------------------------- meter overhead
def meter_modules(backend: VLMBackend) -> list:
    """The modules VLMBackend hooks (vision encoder, every decoder block, LM head)."""
    return [backend.model.vision, *backend.model.blocks, backend.model.lm_head]


def meter_overhead(
    backend: VLMBackend, samples: Sequence[VQASample], config: StaticConfig, pairs: int, warmup: int = 3,
    seed: int = 0,
) -> dict:
    """Wall-clock episode latency with the meter's hooks attached vs detached, interleaved.

    Each pair runs the same sample once with hooks and once without, in random order. The
    episode's wall clock (start_episode..finish, perf_counter around the calls) is timed in
    both modes, so the comparison does not rely on the meter itself.
    """
    budget = torch.zeros(backend.d_model)
    rng = random.Random(seed)
    meter, modules = backend.meter, meter_modules(backend)

    def timed(sample, hooks: bool) -> tuple[float, int, float]:
        meter.detach()
        if hooks:
            meter.attach(modules)
        t0 = time.perf_counter()
        result = run_episode(backend, sample, config, budget)
        wall = (time.perf_counter() - t0) * 1e3
        # hooked module calls: vision once, per generated token every run block + the LM head
        calls = 1 + result.extras["generated_tokens"] * (len(result.extras["blocks"]) + 1)
        return wall, calls, total_ms(result.timings_ms)

    try:
        for i in range(warmup):
            timed(samples[i % len(samples)], True)
            timed(samples[i % len(samples)], False)
        on, off, metered, calls = [], [], [], []
        for i in range(pairs):
            sample = samples[i % len(samples)]
            order = [True, False]
            rng.shuffle(order)
            for hooks in order:
                wall, n_calls, measured = timed(sample, hooks)
                (on if hooks else off).append(wall)
                if hooks:
                    metered.append(measured)
                    calls.append(n_calls)
    finally:
        meter.detach()
        meter.attach(modules)
    med_on, med_off = statistics.median(on), statistics.median(off)
    diffs = [a - b for a, b in zip(on, off)]
    return {
        "config": asdict(config),
        "pairs": pairs,
        "median_on_ms": med_on,
        "median_off_ms": med_off,
        "ratio_on_off": med_on / med_off,
        "overhead_pct": 100.0 * (med_on / med_off - 1.0),
        "median_paired_diff_ms": statistics.median(diffs),
        "paired_diff_pct": 100.0 * statistics.median(diffs) / med_off,
        "iqr_on_ms": _iqr(on),
        "iqr_off_ms": _iqr(off),
        "hooked_calls_per_episode": statistics.median(calls),
        "median_metered_ms": statistics.median(metered),
        "metered_over_wall": statistics.median(metered) / med_on,
    }


def hook_cost_us(calls: int = 20000) -> dict:
    """Microbenchmark: cost of one hooked call pair (pre + post stamp) on a no-op module, in us."""
    from envs.latency import LatencyMeter, PhaseTimer

    module = torch.nn.Identity()
    x = torch.zeros(1)

    def loop():
        t0 = time.perf_counter()
        for _ in range(calls):
            module(x)
        return (time.perf_counter() - t0) / calls * 1e6

    base = min(loop() for _ in range(3))
    meter = LatencyMeter("cpu", ("prefill",)).attach([module])
    timer = PhaseTimer()
    with meter.section(timer, "prefill"):
        hooked = min(loop() for _ in range(3))
    meter.detach()
    return {"plain_call_us": base, "hooked_call_us": hooked, "hook_overhead_us": hooked - base}


def knob_latency(
    backend: VLMBackend, samples: Sequence[VQASample], configs: Mapping[str, StaticConfig], repeats: int = 1,
    warmup: int = 2, seed: int = 0,
) -> dict:
    """Median / IQR / std of metered total latency for named configs, interleaved; plus the
    slowest/fastest median ratio (all from this one run)."""
    timings = measure_latency(backend, samples, list(configs.values()), warmup=warmup, seed=seed, repeats=repeats)
    out = {}
    for name, c in configs.items():
        totals = [total_ms(t) for t in timings[c]]
        out[name] = {
            "config": asdict(c),
            "n": len(totals),
            "median_ms": statistics.median(totals),
            "iqr_ms": _iqr(totals),
            "std_ms": statistics.stdev(totals) if len(totals) > 1 else 0.0,
            **{f"{p}_median_ms": statistics.median(t[p] for t in timings[c]) for p in BACKEND_PHASES},
        }
    medians = {n: r["median_ms"] for n, r in out.items()}
    slowest, fastest = max(medians, key=medians.get), min(medians, key=medians.get)
    return {
        "configs": out,
        "slowest": slowest,
        "fastest": fastest,
        "slowest_over_fastest": medians[slowest] / medians[fastest],
    }


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
