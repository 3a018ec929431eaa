"""The hierarchical controller: one TorchRL actor acting at both env steps.

At a Stage-1 row (stage == 0) it encodes the budget, runs Knob1PredictorBudgetLanguage and writes
tier, insertion and the budget token; at a Stage-2 row it runs Knob2Knob3Predictor on the latency
token and writes top-k, num_blocks and its own measured time (part of the request's latency).
Actions are sampled, or the argmax under torchrl's DETERMINISTIC/MODE exploration type (greedy).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch.distributions import Categorical
from torchrl.envs.utils import ExplorationType, exploration_type

from envs.budget_env import ACTION_HEADS, STAGE1_HEADS, STAGE2_HEADS
from envs.knobs import KnobSpace
from policies.budget_encoder import LatencyBudgetEncoder
from policies.predictors import Knob1PredictorBudgetLanguage, Knob2Knob3Predictor


class HierarchicalController(TensorDictModuleBase):
    """Budget encoder + Stage-1 and Stage-2 predictors behind one TensorDict interface."""

    def __init__(
        self,
        knob_space: KnobSpace,
        language_dim: int,
        d_model: int,
        budget_range_ms: Sequence[float],
        hidden_dim: int = 256,
        sinusoidal_dim: int = 256,
        fixed_controller_ms: float | None = None,
    ):
        super().__init__()
        # Replaces the measured Stage-2 time by a constant, for runs that must be bit-identical.
        if fixed_controller_ms is not None and not float(fixed_controller_ms) >= 0:
            raise ValueError(f"fixed_controller_ms={fixed_controller_ms}: expected None or a time >= 0")
        self.fixed_controller_ms = None if fixed_controller_ms is None else float(fixed_controller_ms)
        self.knob_space = knob_space
        sizes = knob_space.head_sizes
        self.budget_encoder = LatencyBudgetEncoder(d_model, budget_range_ms, sinusoidal_dim)
        self.stage1 = Knob1PredictorBudgetLanguage(
            language_dim, d_model, hidden_dim, sizes["tier"], sizes["insertion"]
        )
        self.stage2 = Knob2Knob3Predictor(
            d_model, hidden_dim, sizes["insertion"], sizes["top_k"], sizes["num_blocks"]
        )
        self.d_model = d_model
        self.in_keys = ["language_feature", "budget_ms", "stage", "latency_token", "insertion"]
        self.out_keys = (
            [("action", h) for h in ACTION_HEADS]
            + [("action", "budget_token"), ("action", "controller_ms")]
            + [("log_prob", h) for h in ACTION_HEADS]
        )

    # ------------------------------------------------------------- helpers
    def stage1_logits(self, language_feature, budget_ms):
        budget_feature = self.budget_encoder(budget_ms)
        return self.stage1(language_feature, budget_feature), budget_feature

    def stage2_logits(self, latency_token, insertion):
        return self.stage2(latency_token, insertion.reshape(-1))

    def evaluate(self, td: TensorDictBase) -> tuple[dict, dict]:
        """Log-prob and entropy of the stored actions, per head, shape (n,); a head that does not
        act at a row's stage contributes 0. Differentiable (used by the loss)."""
        stage = td["stage"].reshape(-1)
        n = stage.shape[0]
        log_prob = {h: torch.zeros(n, device=stage.device) for h in ACTION_HEADS}
        entropy = {h: torch.zeros(n, device=stage.device) for h in ACTION_HEADS}
        for rows, heads, logits_fn in (
            (stage == 0, STAGE1_HEADS, lambda r: self.stage1_logits(td["language_feature"][r], td["budget_ms"][r])[0]),
            (stage == 1, STAGE2_HEADS, lambda r: self.stage2_logits(td["latency_token"][r], td["insertion"][r])),
        ):
            if not bool(rows.any()):
                continue
            logits = logits_fn(rows)
            for h in heads:
                dist = Categorical(logits=logits[h])
                log_prob[h] = log_prob[h].masked_scatter(rows, dist.log_prob(td["action", h][rows].reshape(-1)))
                entropy[h] = entropy[h].masked_scatter(rows, dist.entropy())
        return log_prob, entropy

    # ------------------------------------------------------------- forward
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        stage = td["stage"].reshape(-1)
        n, device = stage.shape[0], stage.device
        greedy = exploration_type() in (ExplorationType.DETERMINISTIC, ExplorationType.MODE)
        actions = {h: torch.zeros(n, 1, dtype=torch.long, device=device) for h in ACTION_HEADS}
        log_probs = {h: torch.zeros(n, 1, device=device) for h in ACTION_HEADS}
        budget_token = torch.zeros(n, self.d_model, device=device)
        controller_ms = torch.zeros(n, 1, device=device)

        def act(logits: dict, heads, rows):
            for h in heads:
                dist = Categorical(logits=logits[h])
                a = logits[h].argmax(-1) if greedy else dist.sample()
                actions[h][rows] = a.unsqueeze(-1)
                log_probs[h][rows] = dist.log_prob(a).unsqueeze(-1)

        s1 = stage == 0
        if bool(s1.any()):
            logits, budget_feature = self.stage1_logits(td["language_feature"][s1], td["budget_ms"][s1])
            act(logits, STAGE1_HEADS, s1)
            budget_token[s1] = budget_feature
        s2 = stage == 1
        if bool(s2.any()):
            # The Stage-2 controller runs inside the request, so its time is part of the latency.
            _sync(device)
            start = time.perf_counter()
            act(self.stage2_logits(td["latency_token"][s2], td["insertion"][s2]), STAGE2_HEADS, s2)
            _sync(device)
            measured = (time.perf_counter() - start) * 1e3
            controller_ms[s2] = measured if self.fixed_controller_ms is None else self.fixed_controller_ms
        for h in ACTION_HEADS:
            td.set(("action", h), actions[h])
            td.set(("log_prob", h), log_probs[h])
        td.set(("action", "budget_token"), budget_token)
        td.set(("action", "controller_ms"), controller_ms)
        return td

    def stage1_parameters(self):
        """Stage 1 and the budget encoder: the encoder is Stage 1's input, so freezing Stage 1 freezes
        it too. Its output is also the budget token of the prefill, which gets gradient only through
        Stage 1's log-probs (the env is not differentiable), so no separate path is lost."""
        return list(self.stage1.parameters()) + list(self.budget_encoder.parameters())

    def stage2_parameters(self):
        return list(self.stage2.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
