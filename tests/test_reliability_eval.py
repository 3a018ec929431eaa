"""Evaluation records what really ran: the substituted sample when an image cannot be read, and
the checkpoint file whose weights final_eval.json scores (never a missing best.pt)."""
import json
import math
from pathlib import Path

import torch

import envs.budget_env
from agents.evaluation import run_episodes, summarize
from envs import make_env
from envs.data import ImageLoadError
from policies import HierarchicalController
from train_runs import tiny_config, train_main


def test_evaluation_records_the_substituted_sample(monkeypatch):
    env = make_env("dummy", batch_size=4, group_size=1, seed=0, num_samples=32)
    b = env.backend
    actor = HierarchicalController(b.knob_space, b.language_dim, b.d_model, b.budget_range_ms, hidden_dim=16)
    real_start = b.start_episode

    def start(sample, tier, token):
        if sample.index == 2:
            raise ImageLoadError("image of sample 2 is truncated")
        return real_start(sample, tier, token)

    monkeypatch.setattr(b, "start_episode", start)
    episodes = run_episodes(env, actor, torch.arange(4), torch.full((4,), 100.0))
    assert episodes["requested_sample_index"].tolist() == [0, 1, 2, 3]
    ran = episodes["sample_index"].tolist()
    assert ran[:2] == [0, 1] and ran[3] == 3 and ran[2] != 2
    assert episodes["substituted"].tolist() == [False, False, True, False]
    assert summarize(episodes)["num_substituted_samples"] == 1


def test_final_eval_never_names_a_missing_best_checkpoint(tmp_path, monkeypatch):
    # Validation rewards NaN: no validation beats -inf, so best.pt is never written.
    real = envs.budget_env.BudgetVLMEnv._run_stage2

    def run_stage2(env, row, action):
        info, reward = real(env, row, action)
        return info, (math.nan if env.split == "val" else reward)

    monkeypatch.setattr(envs.budget_env.BudgetVLMEnv, "_run_stage2", run_stage2)
    out = tmp_path / "run"
    train_main("--config", tiny_config(tmp_path, train={"num_epochs": 1}), "--output_dir", out)
    final = json.loads((out / "final_eval.json").read_text())
    assert not (out / "checkpoints" / "best.pt").exists()
    assert final["checkpoint"] == str(out / "checkpoints" / "latest.pt") and Path(final["checkpoint"]).is_file()
    assert final["checkpoint_step"] == final["step"] == 3
