"""Baselines the controller is compared with, and their selection rules.

Policies (names as `runners/evaluate.py --policies` takes them):
  controller                      the trained two-stage controller, greedy actions (run through the env)
  static:<tier>,<top_k>,<N>       one fixed configuration for every request; insertion = the smallest p
  lookup-mean                     per budget: the most accurate profiled configuration whose profiled
                                  mean latency <= LOOKUP_MEAN_FACTOR x budget (the original baseline)
  lookup-p95                      per budget: the same with profiled p95 latency <= budget
  lookup-calibrated               per budget: the configuration with the best accuracy on the calibration
                                  set (samples disjoint from the test samples, measured in the same run,
                                  interleaved with everything else) whose calibration p95 latency <= budget
  family-oracle                   per budget and question family: the configuration with the best
                                  calibration accuracy on that family whose calibration p95 <= budget
                                  (envs.headroom's rule; chosen on calibration, read on test)
  oracle                          per sample: the most accurate configuration whose measured latency on
                                  that very sample fits the budget (ties: the faster); none fits: the fastest
  random                          uniform over every action of every head (run through the env)

Static configurations are tier x top-k x num_blocks at the smallest insertion position, as in
profile.json (runners/profile_configs.py profiles them at p = 1 with a zero budget token). Where no
configuration fits a budget, the lookups and the family oracle take the one with the lowest latency
statistic (fallback_rate 1 in the report).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tensordict import TensorDictBase

from envs.budget_env import ACTION_HEADS
from envs.knobs import KnobSpace
from envs.profiling.latency_table import run_episode, total_ms
from envs.shield import LatencyShield

LOOKUP_MEAN_FACTOR = 1.05  # the original project's slack on the profiled mean latency
PROFILE_FILE = "profile.json"
PROFILE_CONFIG_FIELDS = ("tier", "top_k", "num_blocks", "accuracy_mean", "latency_mean_ms", "latency_p95_ms")
ENV_POLICIES = ("controller", "random")
PROFILE_POLICIES = ("lookup-mean", "lookup-p95")  # choose on a profile (profile.json or closed form)
CALIBRATED_POLICIES = ("lookup-calibrated", "family-oracle")  # choose on this run's calibration set
TABLE_POLICIES = PROFILE_POLICIES + CALIBRATED_POLICIES + ("oracle",)
FIXED_POLICY_NAMES = ENV_POLICIES + TABLE_POLICIES
DEFAULT_POLICIES = ("controller", "lookup-calibrated", "family-oracle", "lookup-mean", "lookup-p95", "oracle",
                    "random")


# --------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class StaticChoice:
    """One configuration of all four knobs (values, not indices)."""

    tier: str
    top_k: int
    num_blocks: int
    insertion: int

    @property
    def name(self) -> str:
        return f"{self.tier},{self.top_k},{self.num_blocks}"

    def indices(self, knob_space: KnobSpace) -> dict[str, int]:
        """Action indices per head (as the env takes them)."""
        return {
            "tier": knob_space.tiers.index(self.tier),
            "insertion": knob_space.insertion_positions.index(self.insertion),
            "top_k": knob_space.top_k_values.index(self.top_k),
            "num_blocks": knob_space.num_blocks_values.index(self.num_blocks),
        }

    def complexity(self, knob_space: KnobSpace) -> float:
        return knob_space.complexity(knob_space.tiers.index(self.tier), self.top_k, self.num_blocks)


def all_static_configs(knob_space: KnobSpace) -> list[StaticChoice]:
    """Every tier x top-k x num_blocks at the smallest insertion position."""
    p = min(knob_space.insertion_positions)
    return [
        StaticChoice(t, k, n, p)
        for t in knob_space.tiers
        for k in knob_space.top_k_values
        for n in knob_space.num_blocks_values
    ]


def make_static(tier: Any, top_k: Any, num_blocks: Any, knob_space: KnobSpace, where: str,
                insertion: Any = None) -> StaticChoice:
    """A StaticChoice after checking every value against the knob space (errors name `where`);
    insertion None = the smallest p."""
    if insertion is None:
        insertion = min(knob_space.insertion_positions)
    if isinstance(insertion, bool) or not isinstance(insertion, int) or insertion not in knob_space.insertion_positions:
        raise ValueError(f"{where}: insertion {insertion!r} is not in the knob space; expected one of "
                         f"{list(knob_space.insertion_positions)}")
    if tier not in knob_space.tiers:
        raise ValueError(f"{where}: tier {tier!r} is not in the knob space; expected one of {list(knob_space.tiers)}")
    for field, value, allowed in (("top_k", top_k, knob_space.top_k_values),
                                  ("num_blocks", num_blocks, knob_space.num_blocks_values)):
        if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
            raise ValueError(f"{where}: {field} {value!r} is not in the knob space; expected one of {list(allowed)}")
    return StaticChoice(tier, top_k, num_blocks, insertion)


def parse_static_spec(spec: str, knob_space: KnobSpace) -> StaticChoice:
    """'static:<tier>,<top_k>,<num_blocks>' -> StaticChoice (insertion = the smallest p)."""
    form = "expected 'static:<tier>,<top_k>,<num_blocks>', e.g. 'static:" + \
        f"{knob_space.tiers[-1]},{knob_space.top_k_values[-1]},{knob_space.num_blocks_values[-1]}'"
    if not spec.startswith("static:"):
        raise ValueError(f"policy {spec!r}: {form}")
    parts = [p.strip() for p in spec[len("static:"):].split(",")]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"policy {spec!r}: got {len(parts)} comma-separated value(s); {form}")
    tier, k, n = parts
    values = []
    for field, text in (("top_k", k), ("num_blocks", n)):
        try:
            values.append(int(text))
        except ValueError:
            raise ValueError(f"policy {spec!r}: {field} {text!r} is not an integer; {form}") from None
    return make_static(tier, values[0], values[1], knob_space, f"policy {spec!r}")


@dataclass(frozen=True)
class PolicySpec:
    name: str  # as given on the command line, e.g. "static:low,4,12"
    kind: str  # "static" or one of FIXED_POLICY_NAMES
    config: StaticChoice | None = None  # static only

    @property
    def needs_table(self) -> bool:
        return self.kind not in ENV_POLICIES

    @property
    def needs_profile(self) -> bool:
        return self.kind in PROFILE_POLICIES

    @property
    def needs_calibration(self) -> bool:
        return self.kind in CALIBRATED_POLICIES


def parse_policies(names: Sequence[str], knob_space: KnobSpace) -> list[PolicySpec]:
    """Check and parse policy names; duplicates are dropped, order kept."""
    if not names:
        raise ValueError(f"no policies given; expected some of {list(FIXED_POLICY_NAMES)} or 'static:<tier>,<top_k>,<num_blocks>'")
    specs, seen = [], set()
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        if name.startswith("static"):
            specs.append(PolicySpec(name, "static", parse_static_spec(name, knob_space)))
        elif name in FIXED_POLICY_NAMES:
            specs.append(PolicySpec(name, name))
        else:
            raise ValueError(
                f"unknown policy {name!r}; expected one of {list(FIXED_POLICY_NAMES)} or "
                f"'static:<tier>,<top_k>,<num_blocks>'"
            )
    return specs


# --------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class ProfileEntry:
    config: StaticChoice
    accuracy_mean: float
    latency_mean_ms: float
    latency_p95_ms: float


def check_profile(data: Any, knob_space: KnobSpace, where: str) -> list[ProfileEntry]:
    """Entries of a profile.json object; errors name the file, the config and the field."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object with 'configs', got {type(data).__name__}")
    configs = data.get("configs")
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"{where}: field 'configs' is missing or empty; expected a list of profiled configurations")
    entries = []
    for i, c in enumerate(configs):
        if not isinstance(c, Mapping):
            raise ValueError(f"{where}: configs[{i}] is {type(c).__name__}, expected an object")
        missing = [f for f in PROFILE_CONFIG_FIELDS if f not in c]
        if missing:
            raise ValueError(f"{where}: configs[{i}] lacks field(s) {missing}; each config needs {list(PROFILE_CONFIG_FIELDS)}")
        # profile.json's configs carry the insertion they were profiled at (runners/profile_configs.py: p = 1)
        config = make_static(c["tier"], c["top_k"], c["num_blocks"], knob_space, f"{where}: configs[{i}]",
                             c.get("insertion"))
        values = {}
        for f in ("accuracy_mean", "latency_mean_ms", "latency_p95_ms"):
            v = c[f]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{where}: configs[{i}].{f}={v!r}, expected a finite number >= 0")
            values[f] = float(v)
        entries.append(ProfileEntry(config, **values))
    names = [e.config for e in entries]
    if len(set(names)) != len(names):
        dup = next(c for c in names if names.count(c) > 1)
        raise ValueError(f"{where}: configuration {dup.name} is profiled more than once")
    return entries


def load_profile(results_dir: str | Path, knob_space: KnobSpace) -> tuple[list[ProfileEntry], dict]:
    """profile.json of a results dir -> (entries, the file's other fields)."""
    path = Path(results_dir) / PROFILE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"results_dir {str(results_dir)!r} has no {PROFILE_FILE} ({path}), which the lookup policies need; "
            f"run runners/profile_configs.py, pass --results_dir DIR with a profile.json, or drop lookup-mean/lookup-p95"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    entries = check_profile(data, knob_space, str(path))
    return entries, {k: v for k, v in data.items() if k != "configs"}


# A tier whose measured p95 is off the profile's by more than this is reported as drifted.
PROFILE_DRIFT_TOLERANCE = 0.10


def profile_latency_scales(backend, entries: Sequence[ProfileEntry], samples: Sequence) -> dict[str, float]:
    """Per tier, this machine's mean latency / the profile's: the mean of that ratio over the tier's
    cheapest and largest profiled configuration, each run at batch 1 on `samples` (training data,
    zero budget token). The ratio of means, not of p95s: a p95 over 8 requests is their slowest,
    and three default runs started minutes apart on one quiet machine read low x0.73, x0.88 and
    x0.92 that way (2026-12-05), which moved every plan of the warm start and the shield. Machines
    drift (the 2-core VM ran the shipped profile's high tier 44% slower on 2026-12-02 than when it
    was profiled), and a stale profile makes its budget range and the
    lookup tables wrong."""
    zero = torch.zeros(backend.d_model)
    ends = {}
    for tier in dict.fromkeys(e.config.tier for e in entries):
        ordered = sorted((e for e in entries if e.config.tier == tier), key=lambda e: (e.config.top_k, e.config.num_blocks))
        ends[tier] = (ordered[0], ordered[-1])
    timed = [e for pair in ends.values() for e in pair]
    ms = {e: [] for e in timed}  # entries are frozen dataclasses: their own keys
    with torch.no_grad():
        for e in timed:  # one untimed round, as the profile times after warm-up rounds: first calls pay setup
            run_episode(backend, samples[0], e.config, zero)
        for s in samples:  # configurations interleaved per sample, as the profile does, so drift hits all alike
            for e in timed:
                ms[e].append(total_ms(run_episode(backend, s, e.config, zero).timings_ms))
    return {tier: sum(sum(ms[e]) / len(ms[e]) / e.latency_mean_ms for e in pair) / len(pair)
            for tier, pair in ends.items()}


def latency_scales_between(reference: Sequence[ProfileEntry], measured: Sequence[ProfileEntry]) -> dict[str, float]:
    """Per tier, measured / reference mean latency averaged over the configurations both hold (the
    form of profile_latency_scales, read off a whole measured table such as an evaluation's
    calibration set instead of two configurations timed at start-up)."""
    ref = {e.config: e.latency_mean_ms for e in reference}
    ratios: dict[str, list[float]] = {}
    for e in measured:
        if ref.get(e.config, 0) > 0:
            ratios.setdefault(e.config.tier, []).append(e.latency_mean_ms / ref[e.config])
    if not ratios:
        raise ValueError("latency_scales_between: the measured table shares no configuration with the reference")
    return {tier: sum(r) / len(r) for tier, r in ratios.items()}


def rescale_profile(entries: Sequence[ProfileEntry], scales: Mapping[str, float]) -> list[ProfileEntry]:
    """Each entry's latencies times its tier's scale."""
    return [replace(e, latency_mean_ms=e.latency_mean_ms * scales[e.config.tier],
                    latency_p95_ms=e.latency_p95_ms * scales[e.config.tier]) for e in entries]


def smooth_latencies(entries: Sequence[ProfileEntry]) -> list[ProfileEntry]:
    """The profile's latencies as a smooth model, monotone in top-k and blocks (the table the warm start
    imitates and the latency shield enforces). Within each tier and insertion, the mean latency is
    fitted by least squares as a + b*N + c*k + d*k*N over the configurations (N blocks, top-k k: a
    fixed cost plus a per-block cost that grows with the experts each block computes), and the p95 is
    the fitted mean times the group's average p95/mean ratio; then the monotone envelope
    (monotone_latencies). A group whose configurations do not determine the four coefficients keeps
    its measured values. Why: a 40-request p95 scatters by about 10% around a smooth surface (the
    2026-12-05 profile: low tier, k 4, 13 blocks 75.0 ms, 14 blocks 92.2, 15 blocks 91.9, means 68.9,
    74.7, 78.5), and the envelope of the raw values carries every high draw to all larger plans: the
    controllers then held knowledge questions at 13 blocks where 14 fitted (0.66 vs 0.95 accuracy at
    82.5 ms, RESULTS 0-s13). The fitted means stay within 1.2-2.2 ms (residual sd) of the measured ones."""
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(entries):
        groups.setdefault((e.config.tier, e.config.insertion), []).append(i)
    out = list(entries)
    for rows in groups.values():
        group = [entries[i] for i in rows]
        x = torch.tensor([[1.0, e.config.num_blocks, e.config.top_k, e.config.top_k * e.config.num_blocks]
                          for e in group], dtype=torch.float64)
        if int(torch.linalg.matrix_rank(x)) < x.shape[1]:
            continue
        mean = torch.tensor([e.latency_mean_ms for e in group], dtype=torch.float64)
        fitted = (x @ torch.linalg.lstsq(x, mean.unsqueeze(1)).solution).squeeze(1).clamp_min(0.0)
        ratios = [e.latency_p95_ms / e.latency_mean_ms for e in group if e.latency_mean_ms > 0]
        ratio = sum(ratios) / len(ratios) if ratios else 1.0
        for i, e, m in zip(rows, group, fitted.tolist()):
            out[i] = replace(e, latency_mean_ms=m, latency_p95_ms=m * ratio)
    return monotone_latencies(out)


def monotone_latencies(entries: Sequence[ProfileEntry]) -> list[ProfileEntry]:
    """Each entry's mean and p95 latency raised to the largest among the entries of its tier and
    insertion that run at most its top-k and at most its blocks (the upper envelope, so never below
    what was measured). A 40-request p95 is not monotone in the knobs (2026-12-04: low tier, k 4,
    15 blocks 41.2 ms against 16 blocks 34.7 ms), and a table read raw passes a plan while it cuts a
    cheaper one."""
    def envelope(e: ProfileEntry, field: str) -> float:
        c = e.config
        return max(getattr(o, field) for o in entries
                   if (o.config.tier, o.config.insertion) == (c.tier, c.insertion)
                   and o.config.top_k <= c.top_k and o.config.num_blocks <= c.num_blocks)
    return [replace(e, latency_mean_ms=envelope(e, "latency_mean_ms"), latency_p95_ms=envelope(e, "latency_p95_ms"))
            for e in entries]


def dummy_closed_form_profile(backend, split: str = "val") -> list[ProfileEntry]:
    """Profile of every static configuration from the dummy backend's own closed-form model over
    the samples of `split`: expected accuracy, and the exact mean and p95 of the latency, whose
    distribution is a mixture over samples of log-normals (noise-free latency x exp(sigma * z))."""
    if not backend.has_closed_form:
        raise ValueError(f"{type(backend).__name__} has no closed-form model; use a profile.json or profile_source=val")
    ks = backend.knob_space
    samples = backend.dataset(split)
    p_index = ks.insertion_positions.index(min(ks.insertion_positions))
    accs, lats = [], []
    for s in samples:
        acc, parts = backend.config_grid(s)  # (tiers, p, k, N)
        accs.append(acc[:, p_index])
        lats.append(sum(parts.values())[:, p_index])
    acc = torch.stack(accs)  # (S, tiers, k, N)
    lat = torch.stack(lats)
    sigma = float(backend.latency_noise)
    mean_lat = lat.mean(0) * math.exp(sigma ** 2 / 2)
    p95 = _lognormal_mixture_quantile(lat, sigma, 0.95)
    entries = []
    for t, tier in enumerate(ks.tiers):
        for ki, k in enumerate(ks.top_k_values):
            for ni, n in enumerate(ks.num_blocks_values):
                entries.append(ProfileEntry(
                    StaticChoice(tier, k, n, min(ks.insertion_positions)),
                    float(acc[:, t, ki, ni].mean()), float(mean_lat[t, ki, ni]), float(p95[t, ki, ni]),
                ))
    return entries


def dummy_family_table(backend, split: str = "val") -> dict[str, dict[str, float]]:
    """{question family: {config name: expected accuracy}} of every static configuration (at the
    lowest insertion, as dummy_closed_form_profile) over the family's samples of `split`."""
    ks = backend.knob_space
    p_index = ks.insertion_positions.index(min(ks.insertion_positions))
    by_family: dict[str, list[torch.Tensor]] = {}
    for s in backend.dataset(split):
        by_family.setdefault(s.family, []).append(backend.config_grid(s)[0][:, p_index])
    table = {}
    for family, accs in sorted(by_family.items()):
        acc = torch.stack(accs).mean(0)  # (tiers, k, N)
        table[family] = {StaticChoice(tier, k, n, min(ks.insertion_positions)).name: float(acc[t, ki, ni])
                         for t, tier in enumerate(ks.tiers) for ki, k in enumerate(ks.top_k_values)
                         for ni, n in enumerate(ks.num_blocks_values)}
    return table


def _lognormal_mixture_quantile(medians: torch.Tensor, sigma: float, q: float, iters: int = 60) -> torch.Tensor:
    """q-quantile of the equal-weight mixture over dim 0 of log-normals with these medians (bisection)."""
    if sigma == 0:
        return torch.quantile(medians, q, dim=0)
    normal = torch.distributions.Normal(0.0, 1.0)
    lo, hi = medians.min(0).values * math.exp(-6 * sigma), medians.max(0).values * math.exp(6 * sigma)
    for _ in range(iters):
        mid = (lo + hi) / 2
        cdf = normal.cdf((mid.log() - medians.log()) / sigma).mean(0)
        lo, hi = torch.where(cdf < q, mid, lo), torch.where(cdf < q, hi, mid)
    return (lo + hi) / 2


def profile_from_table(configs: Sequence[StaticChoice], accuracy: torch.Tensor, latency: torch.Tensor) -> list[ProfileEntry]:
    """Profile from a measured (sample x config) table (mean accuracy, mean and p95 latency)."""
    lat = latency.double()
    return [
        ProfileEntry(c, float(accuracy[:, j].double().mean()), float(lat[:, j].mean()),
                     float(torch.quantile(lat[:, j], 0.95)))
        for j, c in enumerate(configs)
    ]


def profile_to_json(entries: Sequence[ProfileEntry]) -> list[dict]:
    return [
        {"tier": e.config.tier, "top_k": e.config.top_k, "num_blocks": e.config.num_blocks, "insertion": e.config.insertion,
         "accuracy_mean": e.accuracy_mean, "latency_mean_ms": e.latency_mean_ms, "latency_p95_ms": e.latency_p95_ms}
        for e in entries
    ]


# --------------------------------------------------------------------------- selection rules
def lookup_select(entries: Sequence[ProfileEntry], budget_ms: float, rule: str) -> tuple[StaticChoice, bool]:
    """The lookup-table baseline for one budget -> (config, fits).

    rule "mean": profiled mean latency <= LOOKUP_MEAN_FACTOR x budget; rule "p95": profiled p95
    latency <= budget. Among fitting configs the most accurate; ties: the lower latency (of the
    rule's statistic), then the first in profile order. None fits: the config with the lowest
    latency statistic (fits = False).
    """
    if rule == "mean":
        stat, limit = (lambda e: e.latency_mean_ms), LOOKUP_MEAN_FACTOR * budget_ms
    elif rule == "p95":
        stat, limit = (lambda e: e.latency_p95_ms), budget_ms
    else:
        raise ValueError(f"lookup rule {rule!r} is not known; expected 'mean' or 'p95'")
    if not entries:
        raise ValueError("lookup_select: the profile has no configurations")
    fitting = [(i, e) for i, e in enumerate(entries) if stat(e) <= limit]
    if fitting:
        _, best = min(fitting, key=lambda ie: (-ie[1].accuracy_mean, stat(ie[1]), ie[0]))
        return best.config, True
    _, fastest = min(enumerate(entries), key=lambda ie: (stat(ie[1]), ie[0]))
    return fastest.config, False


def oracle_select(accuracy: torch.Tensor, latency: torch.Tensor, budget_ms: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (rows of (S, C) tables) the most accurate config whose latency <= budget (ties: the
    faster, then the lower column); none fits: the fastest. Returns (column (S,), fits (S,) bool)."""
    if accuracy.shape != latency.shape or accuracy.dim() != 2:
        raise ValueError(f"oracle_select: accuracy {tuple(accuracy.shape)} and latency {tuple(latency.shape)} "
                         f"must be the same (samples, configs) shape")
    acc, lat = accuracy.double(), latency.double()
    fits = lat <= budget_ms
    # Lexicographic: max accuracy among fitting, then min latency. Columns sorted by latency
    # first, so the stable argmax of accuracy picks the fastest among equally accurate ones.
    order = torch.argsort(lat, dim=1, stable=True)
    acc_sorted = torch.gather(torch.where(fits, acc, torch.full_like(acc, -math.inf)), 1, order)
    best_sorted = _first_argmax(acc_sorted)
    choice = torch.gather(order, 1, best_sorted[:, None]).squeeze(1)
    any_fit = fits.any(1)
    fastest = order[:, 0]
    return torch.where(any_fit, choice, fastest), any_fit


def _first_argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum of each row."""
    is_max = x == x.max(1, keepdim=True).values
    return is_max.float().argmax(1)  # argmax of a 0/1 row returns the first 1


# --------------------------------------------------------------------------- random actor
class RandomPolicy:
    """Uniform over every action of every head; zero budget token, no controller time.

    A callable on TensorDicts, usable as the `policy` of env.rollout (and of run_episodes)."""

    def __init__(self, knob_space: KnobSpace, d_model: int, seed: int = 0):
        self.sizes = knob_space.head_sizes
        self.d_model = int(d_model)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, td: TensorDictBase) -> TensorDictBase:
        n = td.batch_size[0]
        for h in ACTION_HEADS:
            a = torch.randint(self.sizes[h], (n, 1), generator=self.generator)
            td.set(("action", h), a.to(td.device))
        td.set(("action", "budget_token"), torch.zeros(n, self.d_model, device=td.device))
        td.set(("action", "controller_ms"), torch.zeros(n, 1, device=td.device))
        return td


def shield_from_profile(entries: Sequence[ProfileEntry], knob_space: KnobSpace, tracking_rate: float = 0.0,
                        quantile: float = 0.95, **margin) -> LatencyShield:
    """The shield over the profile's p95 latencies at its smallest insertion (plans it lacks: not
    timed); `margin`: LatencyShield's keyword arguments from violation_target on (the margin, the values)."""
    p = min(e.config.insertion for e in entries)
    table = torch.full((len(knob_space.tiers), len(knob_space.top_k_values), len(knob_space.num_blocks_values)),
                       float("inf"), dtype=torch.float64)
    for e in entries:
        if e.config.insertion == p:
            i = e.config.indices(knob_space)
            table[i["tier"], i["top_k"], i["num_blocks"]] = e.latency_p95_ms
    return LatencyShield(knob_space, table, knob_space.insertion_positions.index(p), tracking_rate, quantile, **margin)
