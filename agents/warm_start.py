"""Lookup warm start: both controller stages first imitate the profile's lookup table, then GRPO.

From a uniform initial policy the joint GRPO run spends its first steps violating 30-45% of its
budgets (a random tier at a low budget), and the violation constraint's multiplier then drives it
to the cheapest plans, from which 120 steps did not climb back (docs/RESULTS.md section 0). The
lookup-p95 table (the best profiled configuration whose p95 latency fits the budget) is a strong
static starting point, so the controller starts there and GRPO only has to learn where a question
family should deviate from it.

Imitation data: episodes of the train split are reset with budgets drawn uniformly over the
budget range; Stage 1 is taught the lookup configuration's tier for (question, budget); the
episode's first env step then runs with that tier and a random insertion p (the image encoded,
blocks 0..p-1 over the prefill with the controller's own budget token), and Stage 2 is taught the
lookup configuration's top-k and number of blocks from the latency token (and elapsed / remaining
time) that step returns. The episodes are not finished: nothing is decoded. The insertion head is
not taught (the static configurations are all profiled at p = 1) and keeps its initial spread.
Targets are smoothed (`label_smoothing`) so that GRPO's groups still sample different actions.

The profile's latencies were measured on another day, and these machines drift (on 2026-12-02 the
2-core VM ran low/k4/N12 12-25% and high/k4/N16 44% slower than the shipped profile): before the
targets are read, each tier's profiled latencies are rescaled by the ratio of this machine's p95 to
the profile's, measured on the tier's cheapest and largest configuration
(agents.baselines.profile_latency_scales).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from agents.baselines import ProfileEntry, lookup_select, rescale_profile
from envs.knobs import KnobSpace

TAUGHT_HEADS = (("tier",), ("top_k", "num_blocks"))


def lookup_targets(entries: Sequence[ProfileEntry], budgets: torch.Tensor, knob_space: KnobSpace) -> dict:
    """Per budget, the lookup-p95 configuration's action index of every head."""
    rows = [lookup_select(entries, float(b), "p95")[0].indices(knob_space) for b in budgets.reshape(-1)]
    return {h: torch.tensor([r[h] for r in rows]) for h in ("tier", "top_k", "num_blocks")}


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
                      batch_size: int = 64) -> dict[str, float]:
    """Teach both stages the lookup table (module doc), Stage 1 first: Stage 2's data is collected
    with the taught Stage 1's budget token, since the latency token is computed from it. Returns
    each head's last minibatch loss and its greedy agreement with the targets on the imitation data.
    env: an env of group size 1; latency_scales: this machine's p95 / the profile's per tier
    (agents.baselines.profile_latency_scales), applied to the profile before the targets are read."""
    generator = torch.Generator().manual_seed(seed)
    ks, n = env.knob_space, env.batch_size[0]
    if latency_scales:
        entries = rescale_profile(entries, latency_scales)
    batches = range(-(-num_samples // n))
    stage1_net, stage2_net = (a.module[0] for a in actor.stage_actors)
    with torch.no_grad():
        resets = [env.reset() for _ in batches]
    stage1 = torch.cat([td.select(*stage1_net.in_keys) for td in resets])
    targets = lookup_targets(entries, stage1["budget_ms"], ks)  # every reset row's, in reset order
    taught = {h: t[:num_samples] for h, t in targets.items()}
    metrics = _fit(stage1_net, TAUGHT_HEADS[0], stage1[:num_samples], taught, actor.stage1_parameters(), steps, lr,
                   label_smoothing, generator, batch_size)
    stage2 = []
    with torch.no_grad():
        for i, td in enumerate(resets):  # each request up to its latency token, at the taught tier and a random p
            td = actor(td)
            td.set(("action", "tier"), targets["tier"][i * n : (i + 1) * n].reshape(n, 1).to(td.device))
            td.set(("action", "insertion"), torch.randint(len(ks.insertion_positions), (n, 1), generator=generator).to(td.device))
            stage2.append(env.step(td)["next"].select(*stage2_net.in_keys).clone())
            env.reset()  # drop the unfinished episodes (nothing is decoded)
    metrics.update(_fit(stage2_net, TAUGHT_HEADS[1], torch.cat(stage2)[:num_samples], taught,
                        actor.stage2_parameters(), steps, lr, label_smoothing, generator, batch_size))
    return metrics
