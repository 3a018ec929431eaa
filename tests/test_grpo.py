import copy
import math

import pytest
import torch
from tensordict import TensorDict

from agents.grpo import JointGRPOLoss, group_advantages, grpo_update, make_optimizer
from agents.rollout import collect_rollouts
from envs import make_env
from policies import HierarchicalController
from torch.distributions import Categorical


def _setup(batch=3, group=4, seed=0):
    torch.manual_seed(seed)
    env = make_env("dummy", batch_size=batch, group_size=group, seed=seed)
    b = env.backend
    actor = HierarchicalController(b.knob_space, b.language_dim, b.d_model, b.budget_range_ms, hidden_dim=32)
    return env, actor


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    groups = torch.tensor([7, 7, 7, 9, 9, 9])
    adv, zero = group_advantages(rewards, groups, "group", eps=0.0)
    # group 7: mean 2, unbiased std 1 -> (-1, 0, 1); group 9: std 0 -> 0/0 avoided by eps below
    assert torch.allclose(adv[:3], torch.tensor([-1.0, 0.0, 1.0]))
    adv, zero = group_advantages(rewards, groups, "group", eps=1e-4)
    assert torch.equal(adv[3:], torch.zeros(3)) and zero.tolist() == [False] * 3 + [True] * 3
    adv, _ = group_advantages(rewards, groups, "none")
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    adv, _ = group_advantages(rewards, groups, "batch", eps=0.0)
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / rewards.std())
    with pytest.raises(ValueError, match="scale_rewards='mean'"):
        group_advantages(rewards, groups, "mean")


def test_advantage_is_shared_by_both_steps():
    env, actor = _setup()
    rollout = collect_rollouts(env, actor)
    JointGRPOLoss(actor).compute_advantages(rollout)
    assert torch.equal(rollout["advantage"][:, 0], rollout["advantage"][:, 1])
    reward = rollout["next", "reward"][:, 1].reshape(-1)
    expected, _ = group_advantages(reward, rollout["group_id"][:, 0])
    assert torch.allclose(rollout["advantage"][:, 0].reshape(-1), expected)


def test_clipped_objective_by_hand():
    env, actor = _setup(batch=2, group=2)
    rollout = collect_rollouts(env, actor)
    loss = JointGRPOLoss(actor, epsilon_low=0.1, epsilon_high=0.3, entropy_coef=0.0)
    loss.compute_advantages(rollout)
    # Pretend the behaviour policy had other log-probs so ratios leave the clip range.
    shift = torch.tensor([0.5, -0.5, 0.05, 0.4])
    rollout["action", "tier_log_prob"][:, 0] -= shift[:, None]
    out = loss(rollout)
    # The current log-prob by hand: the predictors' logits through plain torch Categoricals.
    s1, s2 = rollout[:, 0], rollout[:, 1]
    logits1 = actor.stage1(s1["language_feature"], actor.budget_encoder(s1["budget_ms"]))
    logits2 = actor.stage2(s2["latency_token"], s2["insertion"])
    traj = sum(Categorical(logits=logits1[h]).log_prob(s1["action", h].reshape(-1)) for h in ("tier", "insertion"))
    traj = traj + sum(Categorical(logits=logits2[h]).log_prob(s2["action", h].reshape(-1)) for h in ("top_k", "num_blocks"))
    old = sum(rollout[key].reshape(4, 2) for key in actor.log_prob_keys).sum(-1)
    ratio = (traj - old).exp()
    adv = rollout["advantage"][:, 0].reshape(-1)
    hand = -torch.minimum(ratio * adv, ratio.clamp(0.9, 1.3) * adv).mean()
    assert torch.allclose(out["loss_objective"], hand, atol=1e-6)
    assert torch.allclose(ratio, shift.exp(), atol=1e-5)
    assert float(out["clip_fraction"]) == pytest.approx(0.75)  # e^.5, e^-.5, e^.4 are outside [0.9, 1.3]
    entropy = Categorical(logits=logits1["tier"]).entropy().mean().detach()
    assert float(out["entropy_tier"]) == pytest.approx(float(entropy), abs=1e-5)


def test_set_keys_moves_what_the_loss_reads():
    env, actor = _setup(batch=2, group=2)
    rollout = collect_rollouts(env, actor)
    loss = JointGRPOLoss(actor, entropy_coef=0.0)
    loss.compute_advantages(rollout)
    expected = loss(rollout)["loss_objective"]
    rollout.rename_key_("advantage", "my_advantage")
    rollout.rename_key_(("action", "tier_log_prob"), ("behaviour", "tier"))
    with pytest.raises(KeyError, match=r"set_keys\(sample_log_prob=\.\.\.\)"):
        loss(rollout)
    keys = [("behaviour", "tier")] + [k for k in actor.log_prob_keys if k != ("action", "tier_log_prob")]
    loss.set_keys(advantage="my_advantage", sample_log_prob=keys)
    assert torch.allclose(loss(rollout)["loss_objective"], expected)
    with pytest.raises(ValueError, match="not an accepted tensordict key"):
        loss.set_keys(advantages="x")


def test_reference_policy_is_a_parameter_copy_not_a_module_copy():
    env, actor = _setup()
    loss = JointGRPOLoss(actor, beta=0.1)
    ref = loss.reference_params
    assert set(ref.keys(include_nested=True, leaves_only=True)) == set(
        TensorDict.from_module(actor).keys(include_nested=True, leaves_only=True))
    # frozen and apart from the live weights: an update moves the actor, not the reference
    w = actor.stage2.top_k_head.weight
    assert not ref["stage2", "top_k_head", "weight"].requires_grad
    with torch.no_grad():
        w.add_(1.0)
    assert not torch.equal(ref["stage2", "top_k_head", "weight"], w)
    # no second module: the loss holds one actor
    assert sum(isinstance(m, HierarchicalController) for m in loss.modules()) == 1


def test_kl_to_reference_is_zero_at_start_and_positive_after_update():
    env, actor = _setup()
    rollout = collect_rollouts(env, actor)
    loss = JointGRPOLoss(actor, beta=0.5)
    loss.compute_advantages(rollout)
    assert float(loss(rollout)["kl_ref"]) == pytest.approx(0.0, abs=1e-6)
    opt = make_optimizer(actor, 1e-2)
    for _ in range(3):
        out = loss(rollout)
        opt.zero_grad()
        (out["loss_objective"] + out["loss_kl"]).backward()
        opt.step()
    assert float(loss(rollout)["kl_ref"]) > 0


def test_anchor_reference_moves_the_kl_anchor_to_the_current_or_a_saved_policy():
    env, actor = _setup()
    rollout = collect_rollouts(env, actor)
    loss = JointGRPOLoss(actor, beta=0.5)
    loss.compute_advantages(rollout)
    initial = loss.reference_state()
    assert set(initial) == set(actor.state_dict())
    with torch.no_grad():  # a warm start moves the policy after the loss was built
        for p in actor.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert float(loss(rollout)["kl_ref"]) > 1e-3
    buffers = [b.data_ptr() for b in loss.reference_params.values(include_nested=True, leaves_only=True)]
    loss.anchor_reference()
    assert float(loss(rollout)["kl_ref"]) == pytest.approx(0.0, abs=1e-6)
    # in place: a DDP wrapper registered these buffers
    assert [b.data_ptr() for b in loss.reference_params.values(include_nested=True, leaves_only=True)] == buffers
    loss.anchor_reference(initial)  # a resumed run's saved anchor
    assert all(torch.equal(v, initial[k]) for k, v in loss.reference_state().items())
    with pytest.raises(ValueError, match="KL anchor does not fit the policy"):
        loss.anchor_reference({k: v for k, v in initial.items() if not k.startswith("stage2.")})
    unanchored = JointGRPOLoss(actor, beta=0.0)
    unanchored.anchor_reference()
    assert unanchored.reference_state() is None


def test_all_heads_and_budget_encoder_get_gradient():
    env, actor = _setup()
    rollout = collect_rollouts(env, actor)
    loss = JointGRPOLoss(actor, entropy_coef=0.0)
    loss.compute_advantages(rollout)
    out = loss(rollout)
    out["loss_objective"].backward()
    heads = {
        "tier": actor.stage1.tier_head,
        "insertion": actor.stage1.insertion_head,
        "top_k": actor.stage2.top_k_head,
        "num_blocks": actor.stage2.num_blocks_head,
    }
    for name, head in heads.items():
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0, name
    for name, p in actor.budget_encoder.mlp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"budget_encoder.mlp.{name}"


def test_stage1_lr_ratio_zero_freezes_stage1_bit_identically():
    env, actor = _setup()
    before = copy.deepcopy(actor.stage1.state_dict())
    enc_before = copy.deepcopy(actor.budget_encoder.state_dict())
    opt = make_optimizer(actor, 1e-2, stage1_lr_ratio=0.0)
    loss = JointGRPOLoss(actor)
    for _ in range(3):
        rollout = collect_rollouts(env, actor)
        loss.compute_advantages(rollout)
        grpo_update(loss, opt, rollout, actor.parameters(), num_iterations=1, max_grad_norm=math.inf)
    for k, v in actor.stage1.state_dict().items():
        assert torch.equal(v, before[k]), k
    # The budget encoder is Stage 1's input: frozen with it (tests/test_reliability_freeze.py).
    assert all(torch.equal(v, enc_before[k]) for k, v in actor.budget_encoder.state_dict().items())


def test_param_groups_learning_rates():
    _, actor = _setup()
    opt = make_optimizer(actor, 1e-3, stage1_lr_ratio=0.1)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"stage2": 1e-3, "stage1_and_budget_encoder": pytest.approx(1e-4)}
    with pytest.raises(ValueError, match="stage1_lr_ratio=-1"):
        make_optimizer(actor, 1e-3, stage1_lr_ratio=-1)


def test_a_pinned_head_is_left_out_of_the_ratio_and_the_entropy_bonus():
    env, actor = _setup(batch=2, group=2)
    rollout = collect_rollouts(env, actor)
    full = JointGRPOLoss(actor, entropy_coef=0.1)
    pinned = JointGRPOLoss(actor, entropy_coef=0.1, pinned_heads=("insertion",))
    pinned.compute_advantages(rollout)
    before = pinned(rollout)
    # The behaviour policy's insertion log-probs no longer matter: the ratio stays 1.
    rollout["action", "insertion_log_prob"][:, 0] -= 0.7
    out = pinned(rollout)
    assert torch.allclose(out["loss_objective"], before["loss_objective"]) and float(out["clip_fraction"]) == 0.0
    assert float(full(rollout)["clip_fraction"]) == 1.0  # e^0.7 is outside [0.8, 1.2]
    others = sum(float(out[f"entropy_{h}"]) for h in ("tier", "top_k", "num_blocks"))
    assert float(out["entropy"]) == pytest.approx(others, abs=1e-5)
    assert float(out["entropy_insertion"]) > 0  # still reported
    (out["loss_objective"] + out["loss_entropy"]).backward()
    assert actor.stage1.insertion_head.weight.grad is None or not actor.stage1.insertion_head.weight.grad.any()
    assert actor.stage1.tier_head.weight.grad.abs().sum() > 0
    assert actor.stage2.top_k_head.weight.grad.abs().sum() > 0


def test_an_unknown_pinned_head_fails_naming_the_field():
    _, actor = _setup(batch=2, group=2)
    with pytest.raises(ValueError, match=r"pinned_heads=\['blocks'\]: \['blocks'\] are not heads of the actor"):
        JointGRPOLoss(actor, pinned_heads=("blocks",))
