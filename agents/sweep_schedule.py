"""One evaluation run's measurements, interleaved in time so that machine drift hits every policy alike.

Latency drifts by ~10% within an hour on shared machines, so a baseline measured before (or after)
the controller is not a fair comparison. The run is a sequence of rounds, one per test sample; a
round holds every unit of work about that sample, in an order shuffled by `seed`:
  * each static configuration on the test sample (the sample x config table that the static,
    lookup and oracle policies read),
  * each env policy (the controller, random) at each budget on the test sample,
  * each static configuration on the calibration samples assigned to the round (calibration
    samples are spread evenly over the rounds: sample j goes to round floor(j * R / M)).
Every unit is one batch-1 request: configurations through the one latency-table episode
(envs.profiling.latency_table.run_episode, zero budget token), env policies through a batch-1 env.
Warm-up first: `warmup` rounds of every configuration and one episode per env policy on the first
test sample, discarded.

A sample whose image cannot be read is dropped from every policy (a configuration unit raises
ImageLoadError, or the env substituted another sample); it is listed in `skipped`.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from tensordict import TensorDict

from agents.baselines import StaticChoice
from agents.budget_sweep import ConfigTable
from agents.evaluation import run_episodes
from envs.data.sample import ImageLoadError
from envs.data.vqa import record_skipped
from envs.profiling.latency_table import run_episode, total_ms
from envs.shield import LatencyShield, following_time_scale

INTERLEAVING = ("rounds of one test sample each: its static configurations, every env policy at every budget "
                "and the configurations of the calibration samples spread over the rounds, in an order shuffled "
                "per round by the seed; each unit one batch-1 request")


@dataclass(frozen=True)
class EnvPolicy:
    """A policy that runs through the env: the controller (greedy) or the random policy."""

    name: str
    policy: Callable
    greedy: bool
    shield: LatencyShield | None = None  # the latency shield its episodes pass (envs/shield.py)
    # A controller's time scale at start-up (agents.factory.controller_time_scale), None: left as it is.
    time_scale: float | None = None

    def prepare(self, env, budget_ms: float) -> None:
        """Before an episode at `budget_ms`: the env passes this policy's shield; its time scale follows
        the shield (envs.shield.following_time_scale)."""
        env.shield = self.shield
        if self.time_scale is not None:
            self.policy.time_scale = following_time_scale(self.time_scale, self.shield, budget_ms)


@dataclass
class SweepRun:
    test: ConfigTable  # kept test samples x configs (empty configs when none were asked for)
    calibration: ConfigTable | None  # kept calibration samples x configs
    episodes: dict[str, TensorDict]  # env policy -> terminal steps, budget-major: (budget, kept sample)
    schedule: dict = field(default_factory=dict)  # how the work was ordered (for the report's meta)


def calibration_rounds(num_calibration: int, num_rounds: int) -> list[list[int]]:
    """Calibration sample j -> round floor(j * R / M): spread evenly over the R rounds."""
    rounds: list[list[int]] = [[] for _ in range(num_rounds)]
    for j in range(num_calibration):
        rounds[j * num_rounds // num_calibration].append(j)
    return rounds


def run_interleaved(
    backend, test_samples: Sequence, test_index: Sequence[int], configs: Sequence[StaticChoice],
    budgets: Sequence[float], env=None, env_policies: Sequence[EnvPolicy] = (),
    calibration_samples: Sequence | None = None, calibration_index: Sequence[int] = (),
    seed: int = 0, warmup: int = 1, progress: Callable[[str], None] | None = None,
) -> SweepRun:
    """Measure everything of one evaluation run, interleaved (see the module docstring). `env` is a
    batch-1, group-1 env over test_samples, needed when env_policies are given."""
    configs, budgets = list(configs), [float(b) for b in budgets]
    test_index, calibration_index = [int(i) for i in test_index], [int(i) for i in calibration_index]
    if env_policies and (env is None or env.batch_size[0] != 1):
        raise ValueError("env policies need a batch-1, group-1 env (make_env(cfg, backend, split, 1, 1))")
    if not test_index:
        raise ValueError("no test samples to evaluate")
    zero = torch.zeros(backend.d_model)
    rng = random.Random(seed)
    start = last_report = time.perf_counter()
    _warm_up(backend, test_samples, test_index, configs, budgets, env, env_policies, warmup, zero)

    test_rows: dict[int, dict] = {}  # round -> {config: (accuracy, latency)}
    calib_rows: dict[int, dict] = {}
    episodes: dict[tuple, TensorDict] = {}
    skipped_test, skipped_calibration = set(), set()
    assigned = calibration_rounds(len(calibration_index), len(test_index))
    for r, i in enumerate(test_index):
        units = [("test", r, c) for c in configs]
        units += [("env", r, (p, b)) for p in range(len(env_policies)) for b in range(len(budgets))]
        units += [("calibration", j, c) for j in assigned[r] for c in configs]
        rng.shuffle(units)
        for kind, where, what in units:
            if kind == "env":
                if r in skipped_test:
                    continue
                p, b = what
                env_policies[p].prepare(env, budgets[b])
                ep = run_episodes(env, env_policies[p].policy, torch.tensor([i]), torch.tensor([budgets[b]]),
                                  greedy=env_policies[p].greedy)
                if bool(ep["substituted"].any()):  # the env met an unreadable image and ran another sample
                    skipped_test.add(r)
                episodes[(p, b, r)] = ep
                continue
            samples, index, rows, skipped = ((test_samples, test_index, test_rows, skipped_test) if kind == "test"
                                             else (calibration_samples, calibration_index, calib_rows,
                                                   skipped_calibration))
            if where in skipped:
                continue
            sample = samples[index[where]]
            try:
                result = run_episode(backend, sample, what, zero)
            except ImageLoadError as err:
                record_skipped(sample, err)
                skipped.add(where)
                continue
            rows.setdefault(where, {})[what] = (float(result.accuracy), total_ms(result.timings_ms))
        now = time.perf_counter()
        if progress and (now - last_report > 30 or r + 1 == len(test_index)):
            last_report = now
            progress(f"interleaved run: {r + 1}/{len(test_index)} rounds, {now - start:.0f}s")

    kept = [r for r in range(len(test_index)) if r not in skipped_test]
    if not kept:
        raise RuntimeError(f"no test sample of {len(test_index)} had a readable image")
    seconds = time.perf_counter() - start
    test = _table([test_index[r] for r in kept], configs, [test_rows.get(r, {}) for r in kept],
                  [test_index[r] for r in sorted(skipped_test)], seconds)
    calibration = None
    if calibration_index:
        kept_c = [j for j in range(len(calibration_index)) if j not in skipped_calibration]
        if not kept_c:
            raise RuntimeError(f"no calibration sample of {len(calibration_index)} had a readable image")
        calibration = _table([calibration_index[j] for j in kept_c], configs, [calib_rows[j] for j in kept_c],
                             [calibration_index[j] for j in sorted(skipped_calibration)], seconds)
    by_policy = {
        e.name: torch.cat([episodes[(p, b, r)] for b in range(len(budgets)) for r in kept])
        for p, e in enumerate(env_policies)
    }
    schedule = {"rule": INTERLEAVING, "seed": seed, "rounds": len(test_index), "warmup_rounds": warmup,
                "units_per_round": len(configs) + len(env_policies) * len(budgets),
                "calibration_samples_per_round": [min(map(len, assigned)), max(map(len, assigned))],
                "seconds": round(seconds, 2)}
    return SweepRun(test, calibration, by_policy, schedule)


def _warm_up(backend, samples, index, configs, budgets, env, env_policies, rounds, zero) -> None:
    """Lazy init, allocator and graph captures before anything is timed (first readable sample)."""
    if rounds <= 0:
        return
    for i in index:
        try:
            for _ in range(rounds):
                for c in configs:
                    run_episode(backend, samples[i], c, zero)
        except ImageLoadError:
            continue
        for e in env_policies:
            e.prepare(env, budgets[0])
            run_episodes(env, e.policy, torch.tensor([i]), torch.tensor([budgets[0]]), greedy=e.greedy)
        return


def _table(sample_index: list[int], configs: list, rows: list[Mapping], skipped: list[int], seconds: float
           ) -> ConfigTable:
    shape = (len(rows), len(configs))
    acc = torch.tensor([[row[c][0] for c in configs] for row in rows], dtype=torch.float64).reshape(shape)
    lat = torch.tensor([[row[c][1] for c in configs] for row in rows], dtype=torch.float64).reshape(shape)
    return ConfigTable(torch.tensor(sample_index, dtype=torch.long), list(configs), acc, lat, skipped, seconds)
