"""Microbenchmarks of the latency meter and of "latency follows the knobs" (runners/bench.py)."""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict
from typing import Mapping, Sequence

import torch

from envs.backends.base import BACKEND_PHASES
from envs.backends.vlm import ExecutorBackend
from envs.data.sample import VQASample
from envs.latency import LatencyMeter, PhaseTimer
from envs.profiling.configs import StaticConfig
from envs.profiling.latency_table import measure_latency, run_episode, total_ms


def meter_modules(backend: ExecutorBackend) -> list:
    """The modules the backend's meter hooks (vision encoder, every decoder block, LM head)."""
    return [backend.model.vision, *backend.model.blocks, backend.model.lm_head]


def meter_overhead(
    backend: ExecutorBackend, samples: Sequence[VQASample], config: StaticConfig, pairs: int, warmup: int = 3,
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
        "iqr_on_ms": iqr(on),
        "iqr_off_ms": iqr(off),
        "hooked_calls_per_episode": statistics.median(calls),
        "median_metered_ms": statistics.median(metered),
        "metered_over_wall": statistics.median(metered) / med_on,
    }


def hook_cost_us(calls: int = 20000) -> dict:
    """Microbenchmark: cost of one hooked call pair (pre + post stamp) on a no-op module, in us."""
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
    backend: ExecutorBackend, samples: Sequence[VQASample], configs: Mapping[str, StaticConfig], repeats: int = 1,
    warmup: int = 2, seed: int = 0,
) -> dict:
    """Median / IQR / std of metered total latency for named configs, interleaved; plus the
    slowest/fastest median ratio (all from this one run). `per_request_ms`: each request's totals
    over the repeats (the IQR over all episodes mixes requests of different prompt and answer
    lengths with the noise; paired_knob_steps separates them)."""
    table = measure_latency(backend, samples, list(configs.values()), warmup=warmup, seed=seed, repeats=repeats)
    out = {}
    for name, c in configs.items():
        totals, timings = table.totals(c), table.timings(c)
        out[name] = {
            "config": asdict(c),
            "n": len(totals),
            "median_ms": statistics.median(totals),
            "iqr_ms": iqr(totals),
            "std_ms": statistics.stdev(totals) if len(totals) > 1 else 0.0,
            **{f"{p}_median_ms": statistics.median(t[p] for t in timings) for p in BACKEND_PHASES},
            # rows are the kept requests in order, once per repeat
            "per_request_ms": [totals[i::len(table.kept)] for i in range(len(table.kept))],
        }
    medians = {n: r["median_ms"] for n, r in out.items()}
    slowest, fastest = max(medians, key=medians.get), min(medians, key=medians.get)
    return {
        "configs": out,
        "slowest": slowest,
        "fastest": fastest,
        "slowest_over_fastest": medians[slowest] / medians[fastest],
        "repeats": int(repeats),
    }


def paired_knob_steps(rows: Mapping[str, dict], steps: Sequence[tuple[str, str]]) -> list[dict]:
    """Each (slower, faster) pair of knob_latency configs, request by request: the median over
    requests of the drop in that request's median latency, against the noise of one request (the
    median over requests and both configs of the IQR of its repeats). met: drop > 3x noise."""
    out = []
    for slow, fast in steps:
        a, b = rows[slow]["per_request_ms"], rows[fast]["per_request_ms"]
        if len(a[0]) < 2:
            raise ValueError("paired_knob_steps needs >= 2 repeats of every request (--repeats)")
        drop = statistics.median(statistics.median(x) - statistics.median(y) for x, y in zip(a, b))
        noise = statistics.median(iqr(v) for v in (*a, *b))
        out.append({"from": slow, "to": fast, "drop_ms": drop, "iqr_ms": noise, "met": drop > 3 * noise})
    return out


def iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]
