"""Block importance and per-configuration measurements of a MolmoEBackend, from batch-1 episodes.

Both run the backend's own episodes (start_episode -> run_to -> finish) with a zero budget token
(a static configuration has no controller), so what they measure is what the env executes.
"""
from __future__ import annotations

import random
import statistics
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from envs.backends.base import BACKEND_PHASES


def block_influence(backend, samples: Sequence, tier: str) -> dict[int, float]:
    """ShortGPT's Block Influence per block: 1 - cos(block input, block output) per prefill token,
    averaged over the tokens of every sample, in the full configuration (p = 1, every block at the
    checkpoint's top-k). Higher = the block changes the residual stream more = more important."""
    sums = {b.index: 0.0 for b in backend.model.blocks}
    counts = dict.fromkeys(sums, 0)

    def record(block, args, output):
        hidden = args[0]
        if hidden.shape[1] > 1:  # prefill calls only
            cos = F.cosine_similarity(hidden.float(), output.float(), dim=-1)
            sums[block.index] += float((1 - cos).sum())
            counts[block.index] += cos.numel()

    handles = [b.register_forward_hook(record) for b in backend.model.blocks]
    zero = torch.zeros(backend.d_model)
    try:
        for sample in samples:
            episode = backend.start_episode(sample, tier, zero)
            backend.run_to(episode, 1)
            backend.finish(episode, backend.cfg.moe_top_k, backend.cfg.n_layers)
    finally:
        for h in handles:
            h.remove()
    return {b: sums[b] / max(counts[b], 1) for b in sums}


def measure_configs(backend, samples: Sequence, configs: Sequence, warmup: int = 1, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> list[dict]:
    """Every config (attributes tier, insertion, top_k, num_blocks) once per sample, in a shuffled
    order per sample so a change in machine load spreads over all configs. Per config: mean
    accuracy, mean and p95 total latency, per-phase means, vision tokens, and decode ms per token
    (decode time over the tokens decoded after the first, which the prefill yields)."""
    zero = torch.zeros(backend.d_model)
    rng = random.Random(seed)
    runs: dict[int, list] = {i: [] for i in range(len(configs))}

    def episode(sample, c):
        ep = backend.start_episode(sample, c.tier, zero)
        backend.run_to(ep, c.insertion)
        return backend.finish(ep, c.top_k, c.num_blocks)

    for _ in range(warmup):
        for c in configs:
            episode(samples[0], c)
    for n, sample in enumerate(samples):
        order = list(range(len(configs)))
        rng.shuffle(order)
        for i in order:
            runs[i].append(episode(sample, configs[i]))
        if progress:
            progress(f"measured sample {n + 1}/{len(samples)} over {len(configs)} configs")
    rows = []
    for i, c in enumerate(configs):
        results = runs[i]
        totals = [sum(r.timings_ms[p] for p in BACKEND_PHASES) for r in results]
        decoded = sum(r.extras["generated_tokens"] - 1 for r in results)
        rows.append({
            "tier": c.tier, "insertion": c.insertion, "top_k": c.top_k, "num_blocks": c.num_blocks,
            "accuracy_mean": statistics.fmean(r.accuracy for r in results),
            "latency_mean_ms": statistics.fmean(totals),
            "latency_p95_ms": float(torch.quantile(torch.tensor(totals, dtype=torch.float64), 0.95)),
            **{f"{p}_ms": statistics.fmean(r.timings_ms[p] for r in results) for p in BACKEND_PHASES},
            "decode_ms_per_token": sum(r.timings_ms["decode"] for r in results) / decoded if decoded else None,
            "vision_tokens_mean": statistics.fmean(r.extras["vision_tokens"] for r in results),
            "crops_mean": statistics.fmean(r.extras["crops"] for r in results),
            "num_samples": len(results),
        })
    return rows
