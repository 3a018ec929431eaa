"""stage1_lr_ratio 0 freezes Stage 1: its logits for every input, and the budget token (the same
budget encoder's output), stay bit-identical through training; Stage 2 still learns."""
import math

import torch

from agents.checkpoint import build_actor
from agents.grpo import JointGRPOLoss, grpo_update, make_optimizer
from agents.rollout import collect_rollouts
from envs import make_env
from policies import HierarchicalController
from train_runs import tiny_config, train_main


def _inputs(env):
    """Every training sample's language feature, each at 9 budgets over the range."""
    language = torch.stack([env.backend.language_feature(s).float() for s in env.samples])
    budgets = torch.linspace(env.budget_lo, env.budget_hi, 9)
    return language.repeat_interleave(9, 0), budgets.repeat(len(env.samples)).reshape(-1, 1)


def _stage1_outputs(actor, language, budget):
    """Stage 1's logits and the budget token (the encoder's output, also Stage 1's input)."""
    with torch.no_grad():
        budget_token = actor.budget_encoder(budget)
        return {**actor.stage1(language, budget_token), "budget_token": budget_token}


def _stage2_logits(actor, env):
    with torch.no_grad():
        token = torch.randn(16, env.backend.d_model, generator=torch.Generator().manual_seed(0))
        return actor.stage2(token, torch.zeros(16, dtype=torch.long))


def test_ratio_zero_keeps_stage1_logits_and_budget_token_bit_identical():
    torch.manual_seed(0)
    env = make_env("dummy", batch_size=4, group_size=4, seed=0, num_samples=64)
    b = env.backend
    actor = HierarchicalController(b.knob_space, b.language_dim, b.d_model, b.budget_range_ms, hidden_dim=32)
    language, budget = _inputs(env)
    before, stage2_before = _stage1_outputs(actor, language, budget), _stage2_logits(actor, env)
    optimizer = make_optimizer(actor, 1e-2, stage1_lr_ratio=0.0)
    loss = JointGRPOLoss(actor, entropy_coef=0.05)
    for _ in range(5):
        rollout = collect_rollouts(env, actor)
        loss.compute_advantages(rollout)
        grpo_update(loss, optimizer, rollout, actor.parameters(), num_iterations=1, max_grad_norm=math.inf)
    after = _stage1_outputs(actor, language, budget)
    for key in ("tier", "insertion", "budget_token"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(_stage2_logits(actor, env)["top_k"], stage2_before["top_k"])


def test_ratio_zero_in_the_runner_trains_stage2_only(tmp_path):
    runs = {}
    for epochs in (1, 2):
        out = tmp_path / f"run{epochs}"
        cfg = tiny_config(tmp_path, name=f"tiny{epochs}.yaml", train={"num_epochs": epochs})
        train_main("--config", cfg, "--output_dir", out, "--stage1_lr_ratio", "0")
        ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
        actor = build_actor(ckpt["policy_meta"])
        actor.load_state_dict(ckpt["policy"])
        runs[epochs] = actor
    env = make_env("dummy", batch_size=1, group_size=1, num_samples={"train": 64, "val": 16, "test": 16},
                   d_model=16, language_dim=8)
    language, budget = _inputs(env)
    one, two = (_stage1_outputs(runs[e], language, budget) for e in (1, 2))
    for key in ("tier", "insertion", "budget_token"):
        assert torch.equal(one[key], two[key]), key
    stage2 = [_stage2_logits(runs[e], env) for e in (1, 2)]
    assert not torch.equal(stage2[0]["top_k"], stage2[1]["top_k"])
