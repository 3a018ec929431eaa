"""Latency of a MolmoE-1B-shaped model (random weights) through the executor, and of stock transformers.

Model (`MolmoeShaped`): a transformers CLIP vision tower of ViT-L/14-336 shape, 2x2 patch pooling and
a linear connector, and an OLMoE-1B-7B-shaped decoder (`ElasticDecoder`: 16 blocks, d 2048, 64
experts of width 1024, top-8), in bf16 on CUDA. Crop counts per tier follow Molmo (1 / 5 / 13
crops of 144 tokens) plus a prompt; the block plans are the executor's block_plan with p = 1 and
zero importance (the earliest blocks are kept).

Measured, all interleaved in shuffled order per repeat and timed with CUDA events (one
synchronisation per measurement; perf_counter on CPU):
  decode    ms per generated token for every (top-k, blocks) pair: Executor.decode of `tokens`
            steps after a prefill, in the executor's default mode (CUDA graphs on CUDA) and eagerly;
  prefill   ms of the decoder prefill per tier at the full and the cheapest plan, eager and as one
            CUDA graph per shape (CapturedCall);
  vision    ms of the tower + connector per crop count, eager and as a graph;
  request   a whole request (vision -> prefill -> a 3-token greedy answer) for the full
            configuration, each knob's step down alone and the cheapest one;
  stock     transformers OlmoeForCausalLM.generate on the same weights, per experts implementation
            and cache (dynamic, static): ms per token = (t(1 + n tokens) - t(1 token)) / n.
Nothing is asserted: runners/bench.py writes the numbers and the target checks derived from them.
"""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, OlmoeConfig

from envs.backends.vlm.decoder import ElasticDecoder
from envs.backends.vlm.elastic import expert_kernel, single_row_kernel
from envs.backends.vlm.executor import CapturedCall, Executor, block_plan, first_tokens, run_blocks
from envs.profiling.benchmarks import iqr

SHAPES = {
    "molmoe-1b": {
        "decoder": dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                        max_position_embeddings=4096),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14),
        "crops": {"low": 1, "medium": 5, "high": 13},
        "prompt_tokens": 39,
        "top_k": (4, 5, 6, 7, 8),
        "num_blocks": (12, 13, 14, 15, 16),
    },
    # seconds on a CPU: the same code paths, for tests
    "test": {
        "decoder": dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
                        num_key_value_heads=2, num_experts=8, num_experts_per_tok=4, max_position_embeddings=256),
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=28, patch_size=7),
        "crops": {"low": 1, "medium": 2, "high": 3},
        "prompt_tokens": 5,
        "top_k": (2, 4),
        "num_blocks": (3, 4),
    },
}
POOL = 2
ANSWER_TOKENS = 3


class MolmoeShaped(nn.Module):
    """CLIP tower -> 2x2 pooling -> linear connector -> ElasticDecoder (random weights)."""

    def __init__(self, shape: dict):
        super().__init__()
        self.tower = CLIPVisionModel(CLIPVisionConfig(**shape["vision"], attn_implementation="sdpa"))
        self.decoder = ElasticDecoder(OlmoeConfig(**shape["decoder"], attn_implementation="sdpa"))
        self.connector = nn.Linear(shape["vision"]["hidden_size"], shape["decoder"]["hidden_size"])
        self.side = shape["vision"]["image_size"] // shape["vision"]["patch_size"]

    def vision_tokens(self, crops: torch.Tensor) -> torch.Tensor:
        """crops (n, 3, S, S) -> (1, n * tokens per crop, d_model)."""
        patches = self.tower(pixel_values=crops).last_hidden_state[:, 1:]
        grid = patches.transpose(1, 2).reshape(crops.shape[0], -1, self.side, self.side)
        pooled = F.avg_pool2d(grid, POOL, ceil_mode=True).flatten(2).transpose(1, 2)
        return self.connector(pooled).reshape(1, -1, self.connector.out_features)

    def sequence(self, vision: torch.Tensor, prompt: torch.Tensor):
        """[vision][prompt][budget token = zeros] and rope, as the executor's prefill_sequence builds it."""
        dec = self.decoder
        seq = torch.cat([vision, dec.embed(prompt), vision.new_zeros(1, 1, vision.shape[-1])], dim=1)
        cos, sin = dec.rope(torch.arange(seq.shape[1], device=seq.device)[None], seq)
        return seq, cos, sin


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of fn() on `device`: CUDA events around it and one synchronisation."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def summary(values: list[float]) -> dict:
    return {"n": len(values), "median_ms": statistics.median(values), "iqr_ms": iqr(values), "min_ms": min(values)}


def interleaved(runs: dict[str, Callable[[], float]], reps: int, seed: int) -> dict[str, dict]:
    """Each run once per repeat, in a shuffled order per repeat -> summary per name."""
    rng = random.Random(seed)
    values: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        order = list(runs)
        rng.shuffle(order)
        for name in order:
            values[name].append(runs[name]())
    return {name: summary(v) for name, v in values.items()}


def plan_of(model: MolmoeShaped, top_k: int, num_blocks: int):
    cfg = model.decoder.cfg
    zeros = {b: 0.0 for b in range(cfg.num_layers)}
    return block_plan(zeros, 1, top_k, num_blocks, cfg.num_layers, cfg.top_k)


class MolmoeShapeBench:
    """The measurements of the module docstring on one model (built once, bf16 on CUDA)."""

    def __init__(self, shape_name: str, device: torch.device, seed: int = 0, log: Callable[[str], None] = print):
        self.shape, self.device, self.seed, self.log = SHAPES[shape_name], device, seed, log
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(seed)
        # Built on the device in its dtype: a 7B-parameter random init on the host takes minutes.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(device):
                self.model = MolmoeShaped(self.shape).eval()
        finally:
            torch.set_default_dtype(default_dtype)
        self.executor = Executor(self.model.decoder, eos_id=-1)  # random weights: never stop early
        self.eager = Executor(self.model.decoder, eos_id=-1, mode="eager")
        cfg = self.model.decoder.cfg
        self.full, self.cheapest = (cfg.top_k, cfg.num_layers), (self.shape["top_k"][0], self.shape["num_blocks"][0])
        gen = torch.Generator().manual_seed(seed)
        size = self.shape["vision"]["image_size"]
        self.crops = {n: torch.randn(n, 3, size, size, generator=gen).to(device, self.dtype)
                      for n in sorted(set(self.shape["crops"].values()))}
        self.prompt = torch.randint(0, self.shape["decoder"]["vocab_size"], (1, self.shape["prompt_tokens"]),
                                    generator=gen).to(device)
        self._vision_graphs: dict[int, CapturedCall] = {}
        self._prefill_graphs: dict[tuple, CapturedCall] = {}

    def describe(self) -> dict:
        cfg = self.model.decoder.cfg
        return {"decoder": self.shape["decoder"], "vision_tower": self.shape["vision"], "crops": self.shape["crops"],
                "prompt_tokens": self.shape["prompt_tokens"], "dtype": str(self.dtype).replace("torch.", ""),
                "vision_tokens_per_crop": ((self.model.side + 1) // POOL) ** 2, "num_layers": cfg.num_layers,
                "top_k_values": list(self.shape["top_k"]), "num_blocks_values": list(self.shape["num_blocks"]),
                "decode_mode": self.executor.mode,
                "expert_kernel": expert_kernel(self.device, self.dtype, training=False),
                "single_row_expert_kernel": single_row_kernel(self.device, self.dtype,
                                                              self.model.decoder.blocks[0].layer.mlp.experts)}

    # ------------------------------------------------------------- pieces
    def vision(self, n: int, graph: bool) -> torch.Tensor:
        if not graph:
            return self.model.vision_tokens(self.crops[n])
        if n not in self._vision_graphs:
            self._vision_graphs[n] = CapturedCall(self.model.vision_tokens, self.crops[n])
        return self._vision_graphs[n](self.crops[n])

    def prefill(self, sequence, plan, graph: bool):
        """(first token, KV cache) after the prefill of `sequence` under `plan`."""
        model = self.model.decoder

        def run(seq, cos, sin):
            cache: dict = {}
            return first_tokens(model, run_blocks(model, seq, cos, sin, plan, cache)), cache

        if not graph:
            return run(*sequence)
        key = (sequence[0].shape[1], plan)
        if key not in self._prefill_graphs:
            self._prefill_graphs[key] = CapturedCall(run, *sequence)
        return self._prefill_graphs[key](*sequence)

    def request(self, crops: int, plan, graph: bool, executor: Executor):
        """A whole request: vision -> prefill -> greedy answer of ANSWER_TOKENS tokens."""
        sequence = self.model.sequence(self.vision(crops, graph), self.prompt)
        first, cache = self.prefill(sequence, plan, graph)
        return executor.decode(first, cache, plan, sequence[0].shape[1], ANSWER_TOKENS)

    # ------------------------------------------------------------- measurements
    @torch.inference_mode()
    def decode(self, tokens: int, reps: int) -> dict:
        """ms per token per (top-k, blocks) in the default mode; eagerly for the full and cheapest plans."""
        graph = self.device.type == "cuda"
        sequence = self.model.sequence(self.vision(self.shape["crops"]["high"], graph), self.prompt)
        length = sequence[0].shape[1]
        runs = {}
        for k in self.shape["top_k"]:
            for n in self.shape["num_blocks"]:
                for mode, executor in (("default", self.executor), ("eager", self.eager)):
                    if mode == "eager" and (k, n) not in (self.full, self.cheapest):
                        continue
                    plan = plan_of(self.model, k, n)
                    first, cache = self.prefill(sequence, plan, graph=False)
                    executor.decode(first, dict(cache), plan, length, tokens + 1)  # warm-up (capture)
                    runs[f"{mode}/k{k}/N{n}"] = (
                        lambda e=executor, f=first, c=cache, p=plan:
                        timed_ms(lambda: e.decode(f, dict(c), p, length, tokens + 1), self.device) / tokens
                    )
        return {"prefill_tokens": length, "tokens": tokens, **interleaved(runs, reps, self.seed)}

    @torch.inference_mode()
    def prefill_and_vision(self, reps: int) -> dict:
        graphs = (False, True) if self.device.type == "cuda" else (False,)
        vision_runs, prefill_runs, lengths = {}, {}, {}
        for tier, n in self.shape["crops"].items():
            for graph in graphs:
                how = "graph" if graph else "eager"
                self.vision(n, graph)  # warm-up (capture)
                vision_runs[f"{how}/{n} crops"] = lambda n=n, g=graph: timed_ms(lambda: self.vision(n, g), self.device)
                sequence = self.model.sequence(self.vision(n, False), self.prompt)
                lengths[tier] = sequence[0].shape[1]
                for k, blocks in (self.full, self.cheapest):
                    plan = plan_of(self.model, k, blocks)
                    self.prefill(sequence, plan, graph)
                    prefill_runs[f"{how}/{tier}/k{k}/N{blocks}"] = (
                        lambda s=sequence, p=plan, g=graph: timed_ms(lambda: self.prefill(s, p, g), self.device)
                    )
        return {"vision": interleaved(vision_runs, reps, self.seed),
                "prefill": {"tokens": lengths, **interleaved(prefill_runs, reps, self.seed)}}

    @torch.inference_mode()
    def requests(self, reps: int) -> dict:
        """Full, each knob's step down alone, cheapest (answer of ANSWER_TOKENS tokens)."""
        crops, (k_max, n_max), (k_min, n_min) = self.shape["crops"], self.full, self.cheapest
        configs = {"full": ("high", k_max, n_max)}
        tiers = list(crops)
        for tier in reversed(tiers[:-1]):
            configs[f"tier {tier}"] = (tier, k_max, n_max)
        configs.update({f"top-k {k}": ("high", k, n_max) for k in self.shape["top_k"][:-1]})
        configs.update({f"blocks {n}": ("high", k_max, n) for n in self.shape["num_blocks"][:-1]})
        configs["cheapest"] = (tiers[0], k_min, n_min)
        graph = self.device.type == "cuda"
        runs = {}
        for name, (tier, k, n) in configs.items():
            plan = plan_of(self.model, k, n)
            self.request(crops[tier], plan, graph, self.executor)  # warm-up (captures)
            runs[name] = lambda c=crops[tier], p=plan: timed_ms(lambda: self.request(c, p, graph, self.executor), self.device)
        out = interleaved(runs, reps, self.seed)
        for name, (tier, k, n) in configs.items():
            out[name].update(tier=tier, crops=crops[tier], top_k=k, num_blocks=n)
        return out

    @torch.inference_mode()
    def stock(self, implementations, caches, tokens: int, reps: int) -> dict:
        """transformers generate on the decoder's own weights (see the module docstring)."""
        lm = self.model.decoder.decoder
        ids = self.prompt
        out = {}
        for impl in implementations:
            for cache in caches:
                name = f"{impl}/{cache}"
                kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
                if cache == "static":
                    kwargs["cache_implementation"] = "static"
                try:
                    lm.set_experts_implementation(impl)

                    def gen(n):
                        return lm.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

                    t0 = time.perf_counter()
                    gen(1), gen(tokens + 1)  # warm-up (and compilation with the static cache)
                    warm_s = time.perf_counter() - t0
                    per_token = []
                    for _ in range(reps):
                        one = timed_ms(lambda: gen(1), self.device)
                        many = timed_ms(lambda: gen(tokens + 1), self.device)
                        per_token.append((many - one) / tokens)
                    out[name] = {**summary(per_token), "warmup_s": warm_s, "tokens": tokens}
                except Exception as err:  # an implementation this transformers/torch cannot run: recorded
                    out[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                self.log(f"stock {name}: {out[name]}")
        return out
