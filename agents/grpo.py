"""Joint GRPO: one group-relative advantage per trajectory, shared by both controller stages.

A trajectory is the two env steps of one episode, shape (N, 2) in the rollout. Its terminal reward
R (from step 2) gives A = (R - mean_group(R)) / (std_group(R) + eps); the policy ratio is taken
over the summed log-prob of the four heads (tier and insertion from step 1, top-k and num_blocks
from step 2), clipped to [1 - epsilon_low, 1 + epsilon_high] as in PPO/GRPO.

The current log-probs and entropies come from each stage's probabilistic tensordict actor
(`get_dist` on that step's rows); the KL anchor runs the same actors with a frozen copy of the
initial parameters swapped in (tensordict functional parameters, no copy of the modules).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import CompositeDistribution
from torchrl.objectives import LossModule

from agents.distributed import RankContext, all_gather_cat, any_rank, collective

SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale_rewards: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages and a per-row flag 'my group's rewards have zero std'.

    scale_rewards: "group" divides by the group's std (the GRPO paper), "batch" by the batch's
    std, "none" only centres (Dr. GRPO).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {SCALE_REWARDS}")
    rewards = rewards.reshape(-1).float()
    _, inverse = torch.unique(group_ids.reshape(-1), return_inverse=True)
    inverse = inverse.to(rewards.device)
    num = int(inverse.max()) + 1
    zeros = rewards.new_zeros(num)  # on the rewards' device (CUDA in a --device cuda run)
    count = zeros.clone().index_add_(0, inverse, torch.ones_like(rewards))
    mean = zeros.clone().index_add_(0, inverse, rewards) / count
    centred = rewards - mean[inverse]
    var = zeros.clone().index_add_(0, inverse, centred**2) / (count - 1).clamp(min=1)
    std = var.sqrt()[inverse]
    zero_std = std < 1e-6
    if scale_rewards == "group":
        return centred / (std + eps), zero_std
    if scale_rewards == "batch":
        return centred / (rewards.std() + eps), zero_std
    return centred, zero_std


class JointGRPOLoss(LossModule):
    """Clipped GRPO objective over both stages, with entropy bonus and optional k3 KL.

    actor: a controller with `stage_actors` (one probabilistic tensordict actor per env step) and
    `log_prob_keys`, e.g. policies.HierarchicalController.
    Input: a rollout TensorDict of shape (N, 2) from agents.rollout.collect_rollouts; step s holds
    the rows of stage s. Its keys are configurable with `set_keys` (see `_AcceptedKeys`).
    Output keys: loss_objective, loss_entropy, loss_kl and diagnostics (clip_fraction, approx_kl,
    entropy, entropy_<head>, kl_ref).

    pinned_heads: heads whose sampled value never runs because the env overrides it (the latency
    shield pins the insertion, envs/shield.py). Their log-probs are left out of the ratio and their
    entropies out of the bonus: the reward carries no signal about them, so their gradient would be
    noise and the bonus alone would drift them away from the warm start. Their entropy is still
    reported (entropy_<head>), not counted in `entropy`.
    """

    @dataclass
    class _AcceptedKeys:
        """Rollout keys the loss reads and writes (`loss.set_keys(advantage=...)`).

        Attributes:
            advantage: where compute_advantages writes, and forward reads, the advantage.
            reward: the per-step reward; the last step's is the trajectory's.
            group_id: the GRPO group of each row.
            reward_zero_std: per-row flag written by compute_advantages.
            sample_log_prob: the behaviour policy's per-head log-probs (default: the actor's
                log_prob_keys); a head that does not act at a step holds 0 there.
        """

        advantage: NestedKey = "advantage"
        reward: NestedKey = ("next", "reward")
        group_id: NestedKey = "group_id"
        reward_zero_std: NestedKey = "reward_zero_std"
        sample_log_prob: list = field(default_factory=list)

    default_keys = _AcceptedKeys

    def __init__(
        self,
        actor,
        epsilon_low: float = 0.2,
        epsilon_high: float | None = None,
        entropy_coef: float = 0.01,
        beta: float = 0.0,
        scale_rewards: str = "group",
        pinned_heads: tuple = (),
    ):
        super().__init__()
        if epsilon_low <= 0 or (epsilon_high is not None and epsilon_high <= 0):
            raise ValueError(f"epsilon_low={epsilon_low}, epsilon_high={epsilon_high}: expected > 0")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {SCALE_REWARDS}")
        self.actor = actor
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_low if epsilon_high is None else epsilon_high)
        self.entropy_coef = float(entropy_coef)
        self.beta = float(beta)
        self.scale_rewards = scale_rewards
        heads = [_head_of_log_prob_key(k) for k in actor.log_prob_keys]
        unknown = [h for h in pinned_heads if h not in heads]
        if unknown:
            raise ValueError(f"pinned_heads={list(pinned_heads)!r}: {unknown} are not heads of the actor; expected "
                             f"some of {heads}")
        self.pinned_heads = tuple(pinned_heads)
        self.set_keys(sample_log_prob=[k for k in actor.log_prob_keys if _head_of_log_prob_key(k) not in self.pinned_heads])
        # The KL anchor is the policy GRPO starts from (TRL's reference model): its parameters,
        # detached and cloned, swapped into the same modules when needed. The weights at build time
        # until anchor_reference moves it (to the warm-started policy, or a resumed run's anchor).
        self.reference_params = None
        if self.beta > 0:
            self.reference_params = TensorDictParams(TensorDict.from_module(actor).detach().clone(), no_convert=True)

    def anchor_reference(self, policy_state: dict | None = None) -> None:
        """The KL anchor becomes the actor's current weights, or `policy_state` (reference_state()'s
        dict: a resumed run's anchor); copied in place, so a DDP wrapper keeps the same buffers.
        Nothing to do when beta is 0."""
        if self.reference_params is None:
            return
        anchor = TensorDict.from_module(self.actor).detach()
        if policy_state is not None:
            saved = TensorDict(dict(policy_state), []).unflatten_keys(".")
            want = set(anchor.keys(include_nested=True, leaves_only=True))
            got = set(saved.keys(include_nested=True, leaves_only=True))
            if got != want:
                raise ValueError(f"the saved KL anchor does not fit the policy: {len(got ^ want)} parameter names "
                                 f"differ (e.g. {sorted(map(str, got ^ want))[:3]})")
            anchor = saved
        self.reference_params.data.update_(anchor)

    def reference_state(self) -> dict | None:
        """The KL anchor as a flat {parameter name: tensor} dict (for a checkpoint), None when beta is 0."""
        if self.reference_params is None:
            return None
        return {k: v.clone() for k, v in self.reference_params.data.flatten_keys(".").items()}

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass  # GRPO has no value estimator

    def compute_advantages(self, rollout: TensorDictBase, ranks: RankContext | None = None) -> TensorDictBase:
        """Write the terminal reward's group advantage into both steps of every trajectory.

        ranks: with several ranks, each holding its own rows of the batch, the advantages are
        those of the global batch (every rank's rewards gathered), so that "batch" scaling and
        the statistics do not depend on how the batch is split.
        """
        keys = self.tensor_keys
        reward = _read(rollout, keys.reward, "reward")[:, -1].reshape(-1)
        group_id = _read(rollout, keys.group_id, "group_id")[:, 0].reshape(-1)
        if ranks is not None and ranks.distributed:
            n = reward.shape[0]
            # Each rank's env numbers its own groups: tag them with the rank to keep them apart.
            global_id = group_id.to(reward.device).long() * ranks.world_size + ranks.rank
            rewards, offset = all_gather_cat(ranks, reward.float(), "the rewards' gather (group advantages)")
            group_ids, _ = all_gather_cat(ranks, global_id, "the group ids' gather (group advantages)")
            adv, zero_std = group_advantages(rewards, group_ids, self.scale_rewards)
            adv, zero_std = adv[offset : offset + n], zero_std[offset : offset + n]
        else:
            adv, zero_std = group_advantages(reward, group_id, self.scale_rewards)
        steps = rollout.shape[1]
        rollout.set(keys.advantage, adv[:, None, None].expand(-1, steps, 1).clone())
        rollout.set(keys.reward_zero_std, zero_std[:, None, None].expand(-1, steps, 1).clone())
        return rollout

    def _stage_log_prob_and_entropy(self, rollout: TensorDictBase) -> tuple[torch.Tensor, dict]:
        """Per trajectory: the current policy's summed log-prob (N,), and each head's entropy (N,)."""
        log_prob = torch.zeros(rollout.shape[0], device=rollout.device)
        entropy = {}
        for step, actor in enumerate(self.actor.stage_actors):
            rows = rollout[:, step]
            if not bool((rows.get("stage") == step).all()):
                raise ValueError(f"rollout step {step} holds rows of another stage; expected stage == {step} "
                                 f"(a (N, 2) rollout from collect_rollouts)")
            dist = actor.get_dist(rows)
            if not isinstance(dist, CompositeDistribution):
                raise TypeError(f"stage {step} actor gives a {type(dist).__name__}; expected a CompositeDistribution")
            lp = dist.log_prob(rows.select(*actor.dist_sample_keys))
            for key in actor.log_prob_keys:
                if _head_of_log_prob_key(key) not in self.pinned_heads:
                    log_prob = log_prob + lp.get(key).reshape(-1)
            ent = dist.entropy()
            for name in dist.dists:
                head = name[-1] if isinstance(name, tuple) else name
                entropy[head] = ent.get(_entropy_key(name)).reshape(-1)
        return log_prob, entropy

    def forward(self, rollout: TensorDictBase) -> TensorDict:
        keys = self.tensor_keys
        new_lp, head_entropy = self._stage_log_prob_and_entropy(rollout)
        old_lp = sum(_read(rollout, k, "sample_log_prob").reshape(rollout.shape) for k in keys.sample_log_prob).sum(-1)
        adv = _read(rollout, keys.advantage, "advantage")[:, 0].reshape(-1)

        log_ratio = new_lp - old_lp
        ratio = log_ratio.exp()
        clipped = ratio.clamp(1 - self.epsilon_low, 1 + self.epsilon_high)
        objective = torch.minimum(ratio * adv, clipped * adv)
        # Per-trajectory entropy: each head acts once per trajectory.
        total_entropy = sum(e for h, e in head_entropy.items() if h not in self.pinned_heads)

        out = TensorDict(
            loss_objective=-objective.mean(),
            loss_entropy=-self.entropy_coef * total_entropy.mean(),
            clip_fraction=((ratio - clipped).abs() > 1e-6).float().mean().detach(),
            approx_kl=((ratio - 1) - log_ratio).mean().detach(),
            entropy=total_entropy.mean().detach(),
            batch_size=[],
        )
        for h, e in head_entropy.items():
            out.set(f"entropy_{h}", e.mean().detach())
        if self.reference_params is not None:
            with torch.no_grad(), self.reference_params.to_module(self.actor):
                ref_lp, _ = self._stage_log_prob_and_entropy(rollout)
            # k3 estimator of KL(pi || pi_ref) on the sampled actions (Schulman 2020).
            delta = ref_lp - new_lp
            kl = delta.exp() - delta - 1
            out.set("loss_kl", self.beta * kl.mean())
            out.set("kl_ref", kl.mean().detach())
        else:
            out.set("loss_kl", torch.zeros((), device=new_lp.device))
        return out


def _read(td: TensorDictBase, key, name: str) -> torch.Tensor:
    value = td.get(key, None)
    if value is None:
        raise KeyError(f"rollout has no {key!r} (the loss's {name} key); write it there or point the loss at "
                       f"it with loss.set_keys({name}=...)")
    return value


def _head_of_log_prob_key(key) -> str:
    """CompositeDistribution writes a head's log-prob beside its sample: ("action", "tier_log_prob") -> "tier"."""
    name = key[-1] if isinstance(key, tuple) else key
    return name.removesuffix("_log_prob")


def _entropy_key(sample_key) -> tuple:
    """CompositeDistribution.entropy writes a head's entropy beside its sample: ("action", "tier_entropy")."""
    key = sample_key if isinstance(sample_key, tuple) else (sample_key,)
    return (*key[:-1], f"{key[-1]}_entropy")


def grpo_update(loss, optimizer: torch.optim.Optimizer, rollout: TensorDictBase, parameters, num_iterations: int,
                max_grad_norm: float, ranks: RankContext | None = None,
                rank_share: float = 1.0) -> tuple[TensorDictBase, torch.Tensor, str | None]:
    """`num_iterations` clipped optimisation steps on one collected batch (advantages written).

    loss: a JointGRPOLoss, or one wrapped in DistributedDataParallel (agents.distributed.wrap_ddp),
    whose backward averages the ranks' gradients. rank_share: this rank's rows x world size / the
    global batch's rows; each rank's loss is a mean over its own rows, so scaled by its share the
    ranks' average gradient is that of the global batch's mean, for uneven splits too.
    A non-finite loss (on any rank) or gradient norm stops before the step that would apply it:
    returns (the last iteration's loss terms, the gradient norm, what was non-finite or None).
    """
    ranks = ranks or RankContext()
    parameters = list(parameters)
    losses, grad_norm = None, torch.tensor(math.nan)
    for _ in range(num_iterations):
        with collective(ranks, "the buffer broadcast of DDP's forward"):  # a stalled rank can time out here too
            losses = loss(rollout)
        total = losses["loss_objective"] + losses["loss_entropy"] + losses["loss_kl"]
        optimizer.zero_grad()
        # Every rank takes the same branch: a rank that skipped backward would leave DDP's all-reduce waiting.
        if any_rank(ranks, not bool(torch.isfinite(total)), "the non-finite loss check"):
            return losses, grad_norm, f"loss {float(total.detach())}"
        with collective(ranks, "the gradient all-reduce (DDP backward)"):
            (total * rank_share).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        if not bool(torch.isfinite(grad_norm)):  # of the averaged gradient: the same on every rank
            optimizer.zero_grad()
            return losses, grad_norm, f"gradient norm {float(grad_norm)}"
        optimizer.step()
    return losses, grad_norm, None


def make_optimizer(actor, lr: float, stage1_lr_ratio: float = 1.0, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW with Stage 2 at lr and Stage 1 + the budget encoder (Stage 1's input) at
    lr * stage1_lr_ratio; each group records its `lr_ratio` (see `set_learning_rate`).

    stage1_lr_ratio = 0 freezes Stage 1 and the budget encoder: their parameters leave the
    optimizer and stop needing grad, so Stage 1's logits (and the budget token) stay bit-identical.
    """
    check_learning_rate(lr, stage1_lr_ratio)
    groups = [{"params": actor.stage2_parameters(), "lr": lr, "lr_ratio": 1.0, "name": "stage2"}]
    if stage1_lr_ratio > 0:
        groups.append({"params": actor.stage1_parameters(), "lr": lr * stage1_lr_ratio, "lr_ratio": stage1_lr_ratio,
                       "name": "stage1_and_budget_encoder"})
    else:
        for p in actor.stage1_parameters():
            p.requires_grad_(False)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def check_learning_rate(lr: float, stage1_lr_ratio: float = 1.0) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr}: expected > 0")
    if not (math.isfinite(stage1_lr_ratio) and stage1_lr_ratio >= 0):
        raise ValueError(f"stage1_lr_ratio={stage1_lr_ratio}: expected >= 0")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group to lr * its lr_ratio (after load_state_dict, which restores the saved lr)."""
    check_learning_rate(lr)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_ratio"]
