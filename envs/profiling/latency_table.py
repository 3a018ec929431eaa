"""The one latency-table measurer: batch-1 backend episodes of static configurations.

Every configuration runs as start_episode -> run_to(p) -> finish(top_k, num_blocks) with a zero
budget token, timed by the backend's own meter, after warm-up rounds (every configuration once per
round, on the first readable sample: lazy init, allocator, and on CUDA the graph captures); the
total is preprocess + vision + prefill + decode, as the env counts it (minus the Stage-2
controller's time, which a static configuration does not have). Samples are the outer loop and the
configurations run in a shuffled order per sample, so a change in machine load spreads over all
configurations instead of biasing a few. Used by the profiler (profile.json), the benchmarks and
the evaluation's per-sample config table (agents.budget_sweep.measure_config_table); works on any
envs.backends.base.Backend.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch

from envs.backends.base import BACKEND_PHASES, EpisodeResult
from envs.data.sample import ImageLoadError


def run_episode(backend, sample, config, budget: torch.Tensor) -> EpisodeResult:
    """One batch-1 episode of a static configuration (anything with tier, insertion, top_k, num_blocks)."""
    ep = backend.start_episode(sample, config.tier, budget)
    backend.run_to(ep, config.insertion)
    return backend.finish(ep, config.top_k, config.num_blocks)


def total_ms(timings: Mapping[str, float]) -> float:
    return float(sum(timings[p] for p in BACKEND_PHASES))


@dataclass
class LatencyTable:
    """results[config][row]: the episode of row `row`; rows are the readable samples in order
    (`kept`, indices into the samples given), once per repeat."""

    configs: list
    results: dict[Hashable, list[EpisodeResult]]
    kept: list[int]
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def timings(self, config) -> list[dict[str, float]]:
        return [r.timings_ms for r in self.results[config]]

    def totals(self, config) -> list[float]:
        return [total_ms(r.timings_ms) for r in self.results[config]]


def measure_latency(
    backend, samples: Sequence, configs: Sequence, warmup: int = 2, seed: int = 0, repeats: int = 1,
    progress: Callable[[str], None] | None = None,
    on_unreadable: Callable[[Any, ImageLoadError], None] | None = None,
) -> LatencyTable:
    """Batch-1 episodes of every config on every sample, interleaved (see the module docstring).

    on_unreadable: called with (sample, error) for a sample whose image cannot be loaded, which is
    then skipped (listed in `skipped`); without it the error propagates.
    """
    configs = list(configs)
    budget = torch.zeros(backend.d_model)
    rng = random.Random(seed)
    results: dict[Hashable, list[EpisodeResult]] = {c: [] for c in configs}
    kept, skipped, warm = [], [], warmup
    start = last_report = time.perf_counter()
    for r in range(repeats):
        for n, sample in enumerate(samples):
            if r > 0 and n not in kept:
                continue
            try:
                while warm > 0:
                    for c in configs:
                        run_episode(backend, sample, c, budget)
                    warm -= 1
                order = list(range(len(configs)))
                rng.shuffle(order)
                row = {j: run_episode(backend, sample, configs[j], budget) for j in order}
            except ImageLoadError as err:
                if on_unreadable is None:
                    raise
                on_unreadable(sample, err)
                skipped.append(n)
                continue
            for j, c in enumerate(configs):
                results[c].append(row[j])
            if r == 0:
                kept.append(n)
            now = time.perf_counter()
            if progress and (now - last_report > 30 or n + 1 == len(samples)):
                last_report = now
                progress(f"latency: repeat {r + 1}/{repeats}, {n + 1}/{len(samples)} samples x {len(configs)} "
                         f"configs, {now - start:.0f}s")
    return LatencyTable(configs, results, kept, skipped, time.perf_counter() - start)


def latency_stats(totals: Sequence[float]) -> dict[str, float]:
    t = torch.tensor(list(totals), dtype=torch.float64)
    return {
        "latency_mean_ms": float(t.mean()),
        "latency_p50_ms": float(torch.quantile(t, 0.5)),
        "latency_p95_ms": float(torch.quantile(t, 0.95)),
        "latency_std_ms": float(t.std(unbiased=True)) if len(t) > 1 else 0.0,
        "latency_iqr_ms": float(torch.quantile(t, 0.75) - torch.quantile(t, 0.25)),
    }
