"""Which validated policy becomes best.pt: agents.evaluation.beats_incumbent and eval.best_margin_se."""
import json
import math

import pytest
import torch
from train_runs import tiny_config, train_main

from agents.evaluation import beats_incumbent


def test_any_finite_candidate_beats_no_incumbent_and_a_nan_never_wins():
    assert beats_incumbent(torch.tensor([0.0, 0.0]), None, margin_se=2.0)
    assert not beats_incumbent(torch.tensor([1.0, math.nan]), None)
    assert not beats_incumbent(torch.tensor([1.0, math.nan]), torch.zeros(2))


def test_margin_zero_is_the_higher_mean_and_a_tie_keeps_the_incumbent():
    incumbent = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert beats_incumbent(torch.tensor([1.0, 1.0, 1.0, 0.0]), incumbent, margin_se=0.0)
    assert not beats_incumbent(torch.tensor([0.0, 1.0, 1.0, 0.0]), incumbent, margin_se=0.0)  # same mean


def test_the_margin_is_in_standard_errors_of_the_paired_difference():
    incumbent = torch.zeros(64)
    # 6 wins and 2 losses in 64 episodes: mean difference 4/64,
    # standard error sqrt((8 - 64 * 0.0625**2) / 63) / 8 = 0.0438 -> 1.43 SE.
    noisy = torch.zeros(64)
    noisy[:6], noisy[6:8] = 1.0, -1.0
    diff = noisy - incumbent
    z = float(diff.mean() / (diff.std() / 8))
    assert z == pytest.approx(1.4256, abs=1e-4)
    assert beats_incumbent(noisy, incumbent, margin_se=1.0)
    assert not beats_incumbent(noisy, incumbent, margin_se=2.0)
    # 10 wins, no loss: 3.4 SE.
    clear = torch.zeros(64)
    clear[:10] = 1.0
    assert beats_incumbent(clear, incumbent, margin_se=2.0)


def test_validation_episodes_must_be_the_same():
    with pytest.raises(ValueError, match=r"shape \(3,\) against the best checkpoint's \(4,\)"):
        beats_incumbent(torch.zeros(3), torch.zeros(4))


def test_an_unbeatable_margin_keeps_the_first_validated_policy(tmp_path):
    out = tmp_path / "run"
    train_main("--config", tiny_config(tmp_path, eval={"best_margin_se": 1e9}), "--output_dir", out)
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    final = json.loads((out / "final_eval.json").read_text())
    assert best["step"] == 0 and final["checkpoint_step"] == 0 and final["step"] > 0
    assert best["best_val_rewards"].shape == (best["config"]["eval"]["val_samples"],)


@pytest.mark.parametrize("margin", [-1.0, float("nan"), "two"])
def test_a_bad_margin_is_a_clear_error_before_anything_is_written(tmp_path, margin):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"eval\.best_margin_se=.*expected a finite number of standard errors >= 0"):
        train_main("--config", tiny_config(tmp_path, eval={"best_margin_se": margin}), "--output_dir", out)
    assert not (out / "checkpoints").exists()
