"""Lookup warm starts: both controller stages first imitate a lookup table, then GRPO.

From a uniform initial policy the joint GRPO run spends its first steps violating 30-45% of its
budgets (a random tier at a low budget), and the violation constraint's multiplier then drives it
to the cheapest plans, from which 120 steps did not climb back (docs/RESULTS.md section 0-prev). The
lookup-p95 table (the best profiled configuration whose p95 latency fits the budget) is a strong
static starting point, so the controller starts there and GRPO only has to learn where a question
family should deviate from it.

Imitation data: episodes of the train split are reset with budgets drawn uniformly over the
budget range; Stage 1 is taught the lookup configuration's tier and insertion p (every static
configuration is profiled at the smallest p: a larger p runs blocks 1..p-1 at full top-k, which the
profile never timed; untaught, the insertion head drifted to p = 2 in every low-budget episode and
violated 29% there, RESULTS 0-s6); the episode's first env step then runs with that tier and p (the
image encoded, blocks 0..p-1 over the prefill with the controller's own budget token), and Stage 2
is taught the lookup configuration's top-k and number of blocks from the latency token (and
elapsed / remaining time) that step returns. The episodes are not finished: nothing is decoded.
Targets are smoothed (`label_smoothing`) so that GRPO's groups still sample different actions.

The static configurations' latencies hold no controller: the controller's own time for both stages
(measured on a first batch of these requests, its p95) is added to every profiled latency before a
configuration is said to fit, so the table the controller imitates is one it can keep.

Three tables (policy.warm_start):
  lookup          per budget, the profile's most accurate configuration whose p95 fits (lookup-p95);
  family_lookup   per (question family, budget), the configuration with the best accuracy on that
                  family among those whose profiled p95 fits: the family oracle made learnable. The
                  family accuracies come from a split the evaluation never reads (the shipped model's
                  eval.json `grid.val`, the dummy's closed form over its val split); the family is
                  the training sample's label (SynthVQA's question family, a real dataset's name), so
                  at test time Stage 1 must infer it from the question alone. A family the table
                  lacks takes the lookup-p95 choice.
  family_request  per question family, one plan for every budget (or for every part of the budget range,
                  policy.warm_start_request_bins): the request whose plan after the
                  latency shield's projection (envs/shield.py: the tier, then top-k and blocks, cut
                  to what fits) has the best family accuracy averaged over budgets evenly spread over
                  the training range (family_requests). The budget is then the shield's to meet, on
                  the table it tracks on the machine it runs on: family_lookup's targets are a
                  function of the budget that encodes the training machine's table, and behind a
                  shield whose table differs the controller asked for the medium tier where the high
                  one fitted (RESULTS 0-s18: seed 44 never took the high tier for detail questions,
                  where the family oracle's gain is). Needs policy.latency_shield.

The profile's latencies were measured on another day, and these machines drift (on 2026-12-02 the
2-core VM ran low/k4/N12 12-25% and high/k4/N16 44% slower than the shipped profile): before the
targets are read, each tier's profiled latencies are rescaled by the ratio of this machine's mean latency to
the profile's, measured on the tier's cheapest and largest configuration
(agents.baselines.profile_latency_scales).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import replace
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from agents.baselines import (ProfileEntry, StaticChoice, lookup_select, parse_static_spec, rescale_profile,
                              shield_from_profile)
from envs.budget_env import reset_to
from envs.knobs import KnobSpace
from envs.shield import LatencyShield

TAUGHT_HEADS = (("tier", "insertion"), ("top_k", "num_blocks"))


def sample_family(sample) -> str:
    """The group a family table is keyed by: SynthVQA's (and the dummy's) question family, else the dataset."""
    return getattr(sample, "family", None) or sample.dataset


def lookup_targets(entries: Sequence[ProfileEntry], budgets: torch.Tensor, knob_space: KnobSpace,
                   families: Sequence | None = None, family_table: Mapping[str, Mapping[str, float]] | None = None,
                   requests: Sequence[Mapping[str, StaticChoice]] | None = None,
                   request_edges: Sequence[float] = ()) -> dict:
    """Per budget, the lookup-p95 configuration's action index of every head; with `family_table`
    ({family: {config name: accuracy}}) and each row's family, the family's choice (family_select);
    with `requests` (one {family: plan} of family_requests per budget bin, `request_edges` the bins'
    increasing interior edges), the family's request in the budget's bin (a family it lacks:
    lookup-p95's choice)."""
    budgets = [float(b) for b in budgets.reshape(-1)]
    if requests is not None:
        configs = [requests[bisect.bisect_right(request_edges, b)].get(f) or lookup_select(entries, b, "p95")[0]
                   for b, f in zip(budgets, families, strict=True)]
    elif family_table is None:
        configs = [lookup_select(entries, b, "p95")[0] for b in budgets]
    else:
        configs = [family_select(entries, family_table, b, f) for b, f in zip(budgets, families, strict=True)]
    rows = [c.indices(knob_space) for c in configs]
    return {h: torch.tensor([r[h] for r in rows]) for h in ("tier", "insertion", "top_k", "num_blocks")}


def family_select(entries: Sequence[ProfileEntry], family_table: Mapping[str, Mapping[str, float]], budget_ms: float,
                  family) -> StaticChoice:
    """Among the profiled configurations whose p95 fits the budget, the one with the best accuracy on
    `family` (ties: the lower p95, then profile order); a family the table lacks, or no fitting
    configuration the table has: lookup-p95's choice."""
    accuracy = family_table.get(family)
    fitting = [(i, e) for i, e in enumerate(entries)
               if accuracy is not None and e.latency_p95_ms <= budget_ms and e.config.name in accuracy]
    if not fitting:
        return lookup_select(entries, budget_ms, "p95")[0]
    return min(fitting, key=lambda ie: (-accuracy[ie[1].config.name], ie[1].latency_p95_ms, ie[0]))[1].config


def family_requests(shield: LatencyShield, family_table: Mapping[str, Mapping[str, float]],
                    budgets: Sequence[float]) -> dict[str, StaticChoice]:
    """Per family, the plan to request at every budget (module doc, family_request): among the
    configurations `family_table` holds, the one whose projection by `shield` at each budget has the
    best family accuracy on average over `budgets` (ties: the cheaper request by the shield's table,
    then the table's order). A request is a candidate only if the table holds every plan it projects to."""
    ks = shield.knob_space
    insertion = ks.insertion_positions[shield.insertion_index]

    def projected(i: dict[str, int], budget: float) -> str:
        tier, _ = shield.stage1(i["tier"], shield.insertion_index, budget)
        k, n = shield.stage2(tier, i["top_k"], i["num_blocks"], budget)
        return StaticChoice(ks.tiers[tier], ks.top_k_values[k], ks.num_blocks_values[n], insertion).name

    out = {}
    for family, accuracy in family_table.items():
        scored = []
        for order, name in enumerate(accuracy):
            request = replace(parse_static_spec(f"static:{name}", ks), insertion=insertion)
            i = request.indices(ks)
            plans = [projected(i, b) for b in budgets]
            if all(plan in accuracy for plan in plans):
                cost = float(shield.p95_ms[i["tier"], i["top_k"], i["num_blocks"]])
                scored.append((-sum(accuracy[plan] for plan in plans) / len(plans), cost, order, request))
        if scored:
            out[family] = min(scored, key=lambda s: s[:3])[3]
    return out


def taught_request_mix(requests: Sequence[Mapping[str, str]], family_table: Mapping[str, Mapping[str, float]],
                       knob_space: KnobSpace) -> dict[tuple[int, int, int], dict[str, float]]:
    """policy.latency_shield_request_mix "taught": per requested plan ({family: plan name} per budget part,
    family_requests' names), the families taught to request it, each counted once per part asking."""
    mix: dict[tuple[int, int, int], dict[str, float]] = {}
    for part in requests:
        for family, name in part.items():
            if family not in family_table:
                raise ValueError(f"family request {family!r}: {name!r}: the family table has no family {family!r}; "
                                 f"expected one of {sorted(family_table)}")
            counts = mix.setdefault(plan_index(name, knob_space), {})
            counts[family] = counts.get(family, 0.0) + 1.0
    return mix


def request_mix_values(mix: Mapping[tuple[int, int, int], Mapping[str, float]],
                       family_table: Mapping[str, Mapping[str, float]],
                       knob_space: KnobSpace) -> dict[tuple[int, int, int], torch.Tensor]:
    """The latency shield's values (envs/shield.py): per request ((tier, top-k, blocks) index), the
    accuracy of each plan for the questions that make it, the family tables weighted by `mix`
    ({request: {family: weight}}: taught_request_mix or measure_request_mix), as a (tiers, top-k
    values, block counts) table (NaN: a plan the family table lacks)."""
    shape = (len(knob_space.tiers), len(knob_space.top_k_values), len(knob_space.num_blocks_values))
    tables: dict[str, torch.Tensor] = {}  # per family asked for, its accuracies as a table
    out = {}
    for request, weights in mix.items():
        missing = sorted(set(weights) - set(family_table))
        if missing:
            raise ValueError(f"request {request}: families {missing} make it, but the family table has none of them; "
                             f"expected families among {sorted(family_table)}")
        if not weights or not all(math.isfinite(w) and w >= 0 for w in weights.values()) or not sum(weights.values()):
            raise ValueError(f"request {request}: family weights {dict(weights)}: expected finite weights >= 0, "
                             f"not all 0")
        for family in weights:
            if family not in tables:
                tables[family] = torch.full(shape, math.nan, dtype=torch.float64)
                for plan, accuracy in family_table[family].items():
                    tables[family][plan_index(plan, knob_space)] = accuracy
        total = sum(weights.values())
        out[request] = sum(tables[f] * (w / total) for f, w in weights.items() if w > 0)
    return out


def request_ceilings(mix: Mapping[tuple[int, int, int], Mapping[str, float]],
                     taught: Mapping[tuple[int, int, int], Mapping[str, float]]) -> dict[tuple[int, int, int],
                                                                                     tuple[int, int, int]]:
    """The latency shield's value_ceilings (envs/shield.py) for the requests of `mix`: per request, in each
    knob the largest of its own and those of the requests `taught` (taught_request_mix) to any family that
    makes it; a family taught nothing adds nothing."""
    out = {}
    for request, weights in mix.items():
        families = {f for f, w in weights.items() if w > 0}
        above = [t for t, taught_to in taught.items() if families & set(taught_to)]
        out[request] = tuple(max(knob) for knob in zip(request, *above))
    return out


def plan_index(name: str, knob_space: KnobSpace) -> tuple[int, int, int]:
    """A plan's (tier, top-k, blocks) index from its name (e.g. "low,4,16")."""
    i = parse_static_spec(f"static:{name}", knob_space).indices(knob_space)
    return i["tier"], i["top_k"], i["num_blocks"]


def measure_request_mix(actor, env, num_batches: int, budget_range_ms: Sequence[float] | None = None,
                        seed: int = 0) -> dict[tuple[int, int, int], dict[str, int]]:
    """policy.latency_shield_request_mix "measured": per request the actor makes greedily ((tier, top-k,
    blocks) of both stages' actions), how many of `num_batches` resets of `env` made it, per question
    family; budgets drawn uniformly over `budget_range_ms` (seeded by `seed`; None: the env's own
    draws over its range). Each request runs up to its latency token, at the chosen tier and p;
    nothing is decoded."""
    n = env.batch_size[0]
    generator = torch.Generator().manual_seed(seed)
    mix: dict[tuple[int, int, int], dict[str, int]] = {}
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(num_batches):
            if budget_range_ms is None:
                td = env.reset()
            else:
                lo, hi = (float(v) for v in budget_range_ms)
                budgets = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
                td = env.reset(reset_to(n, budget_ms=budgets.to(torch.float32)))
            td = actor(td)
            families = [sample_family(env.samples[int(i)]) for i in td["sample_index"].reshape(-1)]
            tiers = td["action", "tier"].reshape(-1).tolist()
            step2 = actor(env.step(td)["next"])
            for family, tier, k, n_blocks in zip(families, tiers, step2["action", "top_k"].reshape(-1).tolist(),
                                                 step2["action", "num_blocks"].reshape(-1).tolist(), strict=True):
                counts = mix.setdefault((int(tier), int(k), int(n_blocks)), {})
                counts[family] = counts.get(family, 0) + 1
    return mix


def add_controller_time(entries: Sequence[ProfileEntry], controller_ms: float) -> list[ProfileEntry]:
    """Each entry's latencies plus the controller's own time (a static configuration runs none)."""
    return [replace(e, latency_mean_ms=e.latency_mean_ms + controller_ms,
                    latency_p95_ms=e.latency_p95_ms + controller_ms) for e in entries]


def replay_reset(env, td: TensorDict) -> TensorDict:
    """`env` reset to the requests (samples and budgets) of an earlier reset output `td`: the env
    steps the requests of its latest reset, whatever tensordict it is given."""
    n = env.batch_size[0]
    return env.reset(reset_to(n, sample_index=td["sample_index"].cpu(), budget_ms=td["budget_ms"].cpu()))


def measure_controller_ms(actor, env, td: TensorDict, tier: torch.Tensor, insertion: torch.Tensor) -> float:
    """p95 over `td`'s requests of both stages' measured compute, each request at `tier` and `insertion`
    (the episodes are left unfinished: nothing is decoded)."""
    n = env.batch_size[0]
    with torch.no_grad():
        td = actor(replay_reset(env, td))
        stage1_ms = td["action", "controller_ms"].reshape(-1).cpu()
        td.set(("action", "tier"), tier.reshape(n, 1).to(td.device))
        td.set(("action", "insertion"), insertion.reshape(n, 1).to(td.device))
        stage2_ms = actor(env.step(td)["next"])["action", "controller_ms"].reshape(-1).cpu()
    return float(torch.quantile(stage1_ms + stage2_ms, 0.95))


def _fit(network, heads: Sequence[str], obs: TensorDict, targets: dict, params, steps: int, lr: float,
         label_smoothing: float, generator: torch.Generator, batch_size: int) -> dict[str, float]:
    """Minimise the heads' cross-entropy against `targets` over minibatches of `obs`; returns the
    last minibatch's loss and the greedy agreement over all of `obs`, per head."""
    optimizer = torch.optim.Adam(params, lr=lr)
    n = obs.shape[0]
    for _ in range(steps):
        rows = torch.randint(n, (min(batch_size, n),), generator=generator)
        out = network.compute(*(obs[rows].get(k) for k in network.in_keys))
        losses = {h: F.cross_entropy(out[("logits", h, "logits")].squeeze(-2), targets[h][rows].to(obs.device),
                                     label_smoothing=label_smoothing) for h in heads}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    with torch.no_grad():
        out = network.compute(*(obs.get(k) for k in network.in_keys))
        agreement = {h: float((out[("logits", h, "logits")].squeeze(-2).argmax(-1).cpu() == targets[h]).float().mean())
                     for h in heads}
    return {**{f"warm_start/loss_{h}": float(v.detach()) for h, v in losses.items()},
            **{f"warm_start/agreement_{h}": v for h, v in agreement.items()}}


def lookup_warm_start(actor, env, entries: Sequence[ProfileEntry], num_samples: int, steps: int,
                      lr: float, label_smoothing: float, seed: int, latency_scales: dict[str, float] | None = None,
                      batch_size: int = 64, family_table: Mapping[str, Mapping[str, float]] | None = None,
                      request_budgets: Sequence[float] | None = None,
                      request_edges: Sequence[float] = ()) -> tuple[dict[str, float], list[dict[str, str]] | None]:
    """Teach both stages the lookup table (module doc), Stage 1 first: Stage 2's data is collected
    with the taught Stage 1's budget token, since the latency token is computed from it. Returns
    each head's last minibatch loss and its greedy agreement with the targets on the imitation data,
    and with family_request the requests taught ({family: plan name} per budget part; else None).
    env: an env of group size 1; latency_scales: this machine's mean latency / the profile's per tier
    (agents.baselines.profile_latency_scales), applied to the profile before the targets are read;
    family_table: the family_lookup table (module doc), None for lookup; request_budgets: with it,
    family_request on those budgets instead (family_requests, on the shield the profile plus the
    controller's time gives), one request per family for each budget bin (`request_edges`: the bins'
    increasing interior edges; none: one request for every budget). The metrics include the
    controller time added to the profile (warm_start/controller_p95_ms)."""
    generator = torch.Generator().manual_seed(seed)
    ks, n = env.knob_space, env.batch_size[0]
    if latency_scales:
        entries = rescale_profile(entries, latency_scales)
    batches = range(-(-num_samples // n))
    stage1_net, stage2_net = (a.module[0] for a in actor.stage_actors)
    with torch.no_grad():
        resets = [env.reset() for _ in batches]
    families = None if family_table is None else [sample_family(env.samples[int(i)])
                                                  for i in torch.cat([td["sample_index"] for td in resets]).reshape(-1)]
    first = lookup_targets(entries, resets[0]["budget_ms"], ks, families and families[:n], family_table)
    controller_ms = measure_controller_ms(actor, env, resets[0], first["tier"], first["insertion"])
    entries = add_controller_time(entries, controller_ms)
    requests = None
    if request_budgets is not None:
        shield = shield_from_profile(entries, ks)
        bins = [bisect.bisect_right(request_edges, b) for b in request_budgets]
        requests = [family_requests(shield, family_table, [b for b, j in zip(request_budgets, bins) if j == i])
                    for i in range(len(request_edges) + 1)]
    stage1 = torch.cat([td.select(*stage1_net.in_keys) for td in resets])
    targets = lookup_targets(entries, stage1["budget_ms"], ks, families, family_table, requests,
                             request_edges)  # every row's, in order
    taught = {h: t[:num_samples] for h, t in targets.items()}
    metrics = _fit(stage1_net, TAUGHT_HEADS[0], stage1[:num_samples], taught, actor.stage1_parameters(), steps, lr,
                   label_smoothing, generator, batch_size)
    stage2 = []
    with torch.no_grad():
        for i, td in enumerate(resets):  # each request up to its latency token, at the taught tier and p
            td = actor(replay_reset(env, td))
            rows = slice(i * n, (i + 1) * n)
            td.set(("action", "tier"), targets["tier"][rows].reshape(n, 1).to(td.device))
            td.set(("action", "insertion"), targets["insertion"][rows].reshape(n, 1).to(td.device))
            stage2.append(env.step(td)["next"].select(*stage2_net.in_keys).clone())
    metrics.update(_fit(stage2_net, TAUGHT_HEADS[1], torch.cat(stage2)[:num_samples], taught,
                        actor.stage2_parameters(), steps, lr, label_smoothing, generator, batch_size))
    taught_requests = None if requests is None else [{f: c.name for f, c in part.items()} for part in requests]
    return {**metrics, "warm_start/controller_p95_ms": controller_ms}, taught_requests
