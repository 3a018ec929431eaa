"""agents/constraint.py: the violation-rate constraint's Lagrange multiplier, alone and in train.py."""
import json

import pytest
import torch
from tensordict import TensorDict

from agents.constraint import ViolationMultiplier
from train_runs import tiny_config, train_main


def _rollout(violations, budgets=None):
    n = len(violations)
    budgets = torch.full((n,), 50.0) if budgets is None else torch.tensor(budgets, dtype=torch.float32)
    episode = TensorDict({"violation": torch.tensor(violations, dtype=torch.bool)[:, None].expand(n, 2)}, [n, 2])
    return TensorDict({"budget_ms": budgets[:, None, None].expand(n, 2, 1),
                       "next": TensorDict({"reward": torch.ones(n, 2, 1), "episode": episode}, [n, 2])}, [n, 2])


def _rates(multiplier, budgets, violated, steps=1):
    for _ in range(steps):
        multiplier.update(torch.tensor(budgets, dtype=torch.float32), torch.tensor(violated))


def test_penalty_hits_the_violating_episodes_terminal_reward_only():
    multiplier = ViolationMultiplier(target=0.02, lr=1.0)
    multiplier.load_state_dict({"values": [0.5]})
    rollout = _rollout([True, False, True])
    multiplier.penalize(rollout)
    assert rollout["next", "reward"][:, -1, 0].tolist() == [0.5, 1.0, 0.5]
    assert rollout["next", "reward"][:, 0, 0].tolist() == [1.0, 1.0, 1.0]  # Stage 1's step: no reward


def test_dual_ascent_grows_while_violating_and_decays_to_zero_after():
    multiplier = ViolationMultiplier(target=0.05, lr=2.0)
    batch = [50.0] * 4
    _rates(multiplier, batch, [True, False, False, False], steps=5)  # rate 0.25
    assert multiplier.values == [pytest.approx(5 * 2.0 * 0.20)]
    _rates(multiplier, batch, [False] * 4)
    assert multiplier.values == [pytest.approx(2.0 - 0.1)]
    _rates(multiplier, batch, [False] * 4, steps=100)
    assert multiplier.values == [0.0]  # never negative: no reward for violating
    capped = ViolationMultiplier(target=0.05, lr=2.0, max_value=1.5)
    _rates(capped, batch, [True, False, False, False], steps=5)
    assert capped.values == [1.5]
    restored = ViolationMultiplier(0.05, 2.0)
    restored.load_state_dict({"value": 1.25})  # a checkpoint of the single-multiplier format
    assert restored.values == [1.25]


def test_each_budget_bin_has_its_own_multiplier():
    # Range [40, 80] in 4 bins of 10 ms: only the lowest bin violates, so only its lambda rises,
    # and only its violating episodes pay it.
    multiplier = ViolationMultiplier(target=0.1, lr=1.0, budget_range_ms=(40.0, 80.0), bins=4)
    assert multiplier.bin_of(torch.tensor([30.0, 40.0, 49.9, 50.0, 79.9, 80.0, 200.0])).tolist() == [0, 0, 0, 1, 3, 3, 3]
    budgets = [41.0, 42.0, 55.0, 56.0, 75.0, 76.0]
    _rates(multiplier, budgets, [True, False, False, False, False, False], steps=3)
    assert multiplier.values == [pytest.approx(3 * 0.4), 0.0, 0.0, 0.0]  # bin 2 had no episode: unchanged
    rollout = _rollout([True, True, False, True], budgets=[41.0, 75.0, 42.0, 65.0])
    multiplier.penalize(rollout)
    assert rollout["next", "reward"][:, -1, 0].tolist() == pytest.approx([1 - 1.2, 1.0, 1.0, 1.0])
    metrics = multiplier.metrics()
    assert metrics["train/violation_lambda"] == pytest.approx(1.2 / 4)
    assert metrics["train/violation_lambda_bin0"] == pytest.approx(1.2) and metrics["train/violation_lambda_bin3"] == 0
    with pytest.raises(ValueError, match=r"holds 1 violation multiplier\(s\); loss.violation_budget_bins=4"):
        multiplier.load_state_dict({"values": [0.0]})


@pytest.mark.parametrize("target, lr, match", [
    (0.0, 1.0, r"loss.violation_target=0.0: expected a finite number > 0"),
    (1.5, 1.0, r"loss.violation_target=1.5: expected a rate in \(0, 1\)"),
    (float("nan"), 1.0, "loss.violation_target=nan"),
    (0.02, -1.0, r"loss.violation_lambda_lr=-1.0: expected a finite number > 0"),
])
def test_bad_constraint_settings_name_the_field(target, lr, match):
    with pytest.raises(ValueError, match=match):
        ViolationMultiplier(target, lr)


@pytest.mark.parametrize("bins, budget_range, match", [
    (0, (40.0, 80.0), r"loss.violation_budget_bins=0: expected an integer >= 1"),
    (2.5, (40.0, 80.0), r"loss.violation_budget_bins=2.5: expected an integer >= 1"),
    (4, (80.0, 40.0), r"budget range \[80.0, 40.0\]: per-bin multipliers need 0 <= lo < hi"),
])
def test_bad_budget_bins_name_the_field(bins, budget_range, match):
    with pytest.raises(ValueError, match=match):
        ViolationMultiplier(0.02, 1.0, budget_range, bins)


def test_bad_cap_names_the_field():
    with pytest.raises(ValueError, match=r"loss.violation_lambda_max=-1.0: expected a finite number > 0, or null"):
        ViolationMultiplier(0.02, 1.0, max_value=-1.0)


def test_train_logs_the_multiplier_and_resumes_it(tmp_path):
    # The tiny dummy run violates often at a 1% target: the multiplier must rise and be checkpointed.
    config = tiny_config(tmp_path, loss={"num_iterations": 2, "violation_target": 0.01, "violation_lambda_lr": 5.0},
                         train={"num_epochs": 1})
    out = tmp_path / "run"
    train_main("--config", config, "--output_dir", out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lambdas = [r["train/violation_lambda"] for r in rows if "train/violation_lambda" in r]
    rates = [r["train/violation_rate"] for r in rows if "train/violation_rate" in r]
    assert len(lambdas) == 3 and lambdas[-1] > 1  # it violates far above 1%: the multiplier rose
    expected = 0.0
    for rate, value in zip(rates, lambdas):  # the logged value follows the dual-ascent rule exactly
        expected = max(0.0, expected + 5.0 * (rate - 0.01))
        assert value == pytest.approx(expected, abs=1e-9)
    saved = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert saved["violation_lambda"]["values"] == [pytest.approx(lambdas[-1])]


def test_a_resumed_run_continues_the_multipliers_bit_for_bit(tmp_path):
    loss = {"num_iterations": 2, "violation_target": 0.01, "violation_lambda_lr": 5.0, "violation_budget_bins": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_main("--config", tiny_config(tmp_path, "a.yaml", loss=loss, train={"num_epochs": 2}), "--output_dir", straight)
    train_main("--config", tiny_config(tmp_path, "b.yaml", loss=loss, train={"num_epochs": 1}), "--output_dir", resumed)
    train_main("--output_dir", resumed, "--resume", "--num_epochs", "2")

    def lambdas(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train/violation_lambda"]) for r in rows if "train/violation_lambda" in r]

    assert len(lambdas(straight)) == 6 and lambdas(resumed) == lambdas(straight)
    saved = torch.load(resumed / "checkpoints" / "latest.pt", weights_only=True)["violation_lambda"]
    assert len(saved["values"]) == 2
    assert saved == torch.load(straight / "checkpoints" / "latest.pt", weights_only=True)["violation_lambda"]
