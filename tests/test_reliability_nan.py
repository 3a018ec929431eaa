"""No NaN reaches an update: a non-finite loss skips the update and is counted; three in a row stop
the run with a resumable checkpoint; a checkpoint with non-finite weights is never written."""
import math

import pytest
import torch

import envs.budget_env
from agents.checkpoint import save_checkpoint
from train_runs import metrics_rows, tiny_config, train_main


def _nan_rewards_at_steps(monkeypatch, bad_steps, rows_per_step=16):
    """NaN terminal rewards for every episode of the given training steps (1-based, train split)."""
    real = envs.budget_env.BudgetVLMEnv._run_stage2
    calls = {"n": 0}

    def run_stage2(env, row, action):
        info, reward = real(env, row, action)
        if env.split != "train":
            return info, reward
        calls["n"] += 1
        return info, (math.nan if (calls["n"] - 1) // rows_per_step + 1 in bad_steps else reward)

    monkeypatch.setattr(envs.budget_env.BudgetVLMEnv, "_run_stage2", run_stage2)


def _weights_finite(path):
    ckpt = torch.load(path, weights_only=True)
    return all(bool(torch.isfinite(v).all()) for v in ckpt["policy"].values() if v.is_floating_point())


def test_nan_reward_skips_the_update_and_is_counted(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    # One epoch of 3 steps (validation only at its end): step 2 gets NaN rewards.
    _nan_rewards_at_steps(monkeypatch, {2})
    train_main("--config", tiny_config(tmp_path, train={"num_epochs": 1}), "--output_dir", out)
    assert "step 2: update skipped, non-finite loss nan (1 in a row)" in capsys.readouterr().err
    skipped = {r["step"]: r["train/skipped_updates"] for r in metrics_rows(out) if "train/skipped_updates" in r}
    assert skipped == {1: 0, 2: 1, 3: 1}
    assert _weights_finite(out / "checkpoints" / "latest.pt")


def test_three_skipped_updates_in_a_row_stop_with_a_resumable_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path, train={"num_epochs": 2})
    _nan_rewards_at_steps(monkeypatch, {4, 5, 6})  # the whole second epoch
    with pytest.raises(SystemExit, match=r"3 updates in a row were skipped for a non-finite loss or gradient "
                                         r"\(step 6: loss nan\); stopped\. The weights are finite and saved in"):
        train_main("--config", cfg, "--output_dir", out)
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"], ckpt["skipped_updates"]) == (6, 1, 3, 3)
    assert _weights_finite(out / "checkpoints" / "latest.pt")
    assert not (out / "final_eval.json").exists()
    # The cause fixed, the run resumes from where it stopped and finishes.
    monkeypatch.undo()
    final = train_main("--output_dir", out, "--resume")
    assert final["step"] == 6
    rows = metrics_rows(out)
    assert [r["train/skipped_updates"] for r in rows if "train/skipped_updates" in r][-1] == 3
    assert sum(1 for r in rows if "val/reward_mean" in r) == 3  # initial, epoch 1, epoch 2 (after the resume)


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, policy={"w": torch.ones(2)}, step=1)
    with pytest.raises(ValueError, match=r"weight 'w' holds NaN or inf; a checkpoint with non-finite weights is never"):
        save_checkpoint(path, policy={"w": torch.tensor([1.0, math.inf])}, step=2)
    assert torch.load(path, weights_only=True)["step"] == 1
