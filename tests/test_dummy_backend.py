"""The dummy backend must be an honest test bed: both stages and the budget matter."""
import torch

from envs.backends.dummy import DummyBackend


def _tables(b, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = b.budget_range_ms
    samples = b.dataset("val")[:n]
    budgets = torch.empty(len(samples)).uniform_(lo, hi, generator=g)
    return samples, budgets, torch.stack([b.expected_rewards(s, float(x)) for s, x in zip(samples, budgets)])


def _best_binned(tables, keys):
    """Expected reward of the best policy that sees only `keys` (one config per key)."""
    total = 0.0
    for key in set(keys):
        rows = torch.tensor([k == key for k in keys])
        total += float(tables[rows].flatten(1).mean(0).max()) * int(rows.sum())
    return total / len(keys)


def test_optimum_needs_budget_and_stage2_information():
    b = DummyBackend(num_samples={"val": 300})
    samples, budgets, tables = _tables(b)
    flat = tables.flatten(1)
    optimal, random = float(flat.max(1).values.mean()), float(flat.mean())
    lo, hi = b.budget_range_ms
    budget_bin = ((budgets - lo) / (hi - lo) * 8).long().clamp(max=7).tolist()
    constant = _best_binned(tables, [0] * len(samples))
    budget_only = _best_binned(tables, budget_bin)
    # Stage 1 sees the budget and (noisily) the detail need; reasoning is Stage 2's to see.
    stage1_only = _best_binned(tables, [(bb, s.family == "detail") for bb, s in zip(budget_bin, samples)])
    assert random < constant < budget_only < stage1_only < optimal
    assert optimal - budget_only > 0.1
    assert optimal - stage1_only > 0.03


def test_episode_matches_expected_reward_model():
    b = DummyBackend(num_samples={"val": 10}, latency_noise=0.0)
    s = b.dataset("val")[0]
    ks = b.knob_space
    ep = b.start_episode(s, "high", torch.zeros(b.d_model))
    token = b.run_to(ep, 2)
    assert token.shape == (b.d_model,)
    res = b.finish(ep, 8, 16)
    acc, parts = b.config_grid(s)
    idx = (2, ks.insertion_positions.index(2), ks.top_k_values.index(8), ks.num_blocks_values.index(16))
    assert res.extras["expected_accuracy"] == float(acc[idx])
    assert abs(sum(res.timings_ms.values()) - float(sum(p[idx] for p in parts.values()))) < 1e-4


def test_latency_falls_with_every_knob_step_down():
    b = DummyBackend(num_samples={"val": 1}, latency_noise=0.0)
    _, parts = b.config_grid(b.dataset("val")[0])
    lat = sum(parts.values())  # (tier, p, k, N)
    assert (lat[1:] > lat[:-1]).all()
    assert (lat[:, :, 1:] > lat[:, :, :-1]).all()
    assert (lat[..., 1:] > lat[..., :-1]).all()


def test_splits_are_deterministic_and_distinct():
    a, b = DummyBackend(seed=3), DummyBackend(seed=3)
    assert a.dataset("train")[:5] == b.dataset("train")[:5]
    assert a.dataset("train")[0] != a.dataset("test")[0]
