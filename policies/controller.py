"""The hierarchical controller: two probabilistic tensordict actors, one per env step.

`stage1_actor` (budget encoder -> Knob1PredictorBudgetLanguage -> one categorical per head) writes
("action", "tier"), ("action", "insertion") and the budget token ("action", "budget_token");
`stage2_actor` (Knob2Knob3Predictor -> one categorical per head) reads the latency token and/or
the request's measured elapsed and remaining time (`stage2_inputs`) and writes ("action", "top_k")
and ("action", "num_blocks"). Both are tensordict `ProbabilisticTensorDictSequential`s over a
`CompositeDistribution`, so sampling, the per-head log-prob keys ("action", "<head>_log_prob"),
entropies and the greedy switch (torchrl's `set_exploration_type(DETERMINISTIC or MODE)`) are
tensordict's. `HierarchicalController` dispatches each env row to the actor of its `stage`.

The controller runs inside the request, so its time is part of the request's latency: each row's
stage networks run alone at batch size 1 (as a deployed controller serves one request), through torch,
torch.compile or one C call (`set_runtime`, policy.controller_runtime), and the wall time of that call
is written to ("action", "controller_ms"); the actions are drawn from exactly those logits.
`fixed_controller_ms` replaces the measurement by a constant (the networks then run batched), for
tests that need bit-identical episodes.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import (
    CompositeDistribution,
    InteractionType,
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModuleBase,
)
from torch import distributions as D

from envs.knobs import KnobSpace
from policies.budget_encoder import LatencyBudgetEncoder
from policies.native import NativeStage
from policies.predictors import Knob1PredictorBudgetLanguage, Knob2Knob3Predictor

STAGE_HEADS = (("tier", "insertion"), ("top_k", "num_blocks"))
CONTROLLER_RUNTIMES = ("eager", "compiled", "native")  # policy.controller_runtime (HierarchicalController.set_runtime)
ACTION_KEY = "action"


def log_prob_key(head: str) -> tuple[str, str]:
    """Where tensordict's CompositeDistribution writes a head's log-prob (no aggregation)."""
    return (ACTION_KEY, f"{head}_log_prob")


def _categorical_heads(heads: Sequence[str]) -> ProbabilisticTensorDictModule:
    """One categorical per head, reading ("logits", head) and writing ("action", head)."""
    return ProbabilisticTensorDictModule(
        in_keys={"params": "logits"},
        out_keys=[(ACTION_KEY, h) for h in heads],
        distribution_class=CompositeDistribution,
        distribution_kwargs={
            "distribution_map": {h: D.Categorical for h in heads},
            "name_map": {h: (ACTION_KEY, h) for h in heads},
        },
        return_log_prob=True,
        default_interaction_type=InteractionType.RANDOM,
    )


# The stage networks' inputs that are times (ms): the budget, and Stage 2's elapsed and remaining time.
TIME_ARGUMENTS = ("budget_feature", "elapsed_ms", "remaining_ms")


class _StageNetwork(TensorDictModuleBase):
    """A stage's networks as a tensordict module: reads in_keys (passed to the predictor as the
    keyword arguments `inputs` maps them to), writes each head's (n, 1, K) logits under
    ("logits", head, "logits") (so that actions have the env's (n, 1) shape) and, for Stage 1, the
    budget feature as ("action", "budget_token"). `compute` is the same on plain tensors: the part
    the controller times per request.
    """

    def __init__(self, predictor: torch.nn.Module, heads: Sequence[str], inputs: dict[str, str],
                 budget_encoder: LatencyBudgetEncoder | None = None):
        super().__init__()
        self.predictor = predictor
        self.budget_encoder = budget_encoder
        self.heads = tuple(heads)
        self.in_keys = list(inputs)
        self.argument_names = list(inputs.values())
        self.out_keys = [("logits", h, "logits") for h in self.heads]
        if budget_encoder is not None:
            self.out_keys.append((ACTION_KEY, "budget_token"))
        self.time_scale = 1.0  # HierarchicalController.time_scale
        # How each request's call runs (HierarchicalController.set_runtime): torch.compile of `_outputs`,
        # whether it has run (compiled) yet, or the C stage (policies/native.py)
        self.compiled = None
        self.compiled_warm = False
        self.native: NativeStage | None = None

    def compute(self, *inputs: torch.Tensor, compiled: bool = False) -> dict:
        """in_keys' tensors -> {out_key: tensor}; `compiled`: through the compiled networks. The times
        are scaled outside them, so that a new time_scale never recompiles."""
        if self.time_scale != 1.0:
            inputs = [x / self.time_scale if name in TIME_ARGUMENTS else x
                      for x, name in zip(inputs, self.argument_names)]
        return (self.compiled if compiled else self._outputs)(*inputs)

    def _outputs(self, *inputs: torch.Tensor) -> dict:
        kwargs = dict(zip(self.argument_names, inputs))
        out = {}
        if self.budget_encoder is not None:  # Stage 1: the budget token is its budget feature
            kwargs["budget_feature"] = out[(ACTION_KEY, "budget_token")] = self.budget_encoder(kwargs["budget_feature"])
        logits = self.predictor(**kwargs)
        for h in self.heads:
            out[("logits", h, "logits")] = logits[h].unsqueeze(-2)
        return out

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        for key, value in self.compute(*(td.get(k) for k in self.in_keys)).items():
            td.set(key, value)
        return td


class HierarchicalController(TensorDictModuleBase):
    """Budget encoder + Stage-1 and Stage-2 actors behind one TensorDict interface."""

    def __init__(
        self,
        knob_space: KnobSpace,
        language_dim: int,
        d_model: int,
        budget_range_ms: Sequence[float],
        hidden_dim: int = 256,
        sinusoidal_dim: int = 256,
        fixed_controller_ms: float | None = None,
        stage2_inputs: str = "token",
    ):
        """stage2_inputs: what Stage 2 reads besides the insertion (see Knob2Knob3Predictor)."""
        super().__init__()
        if fixed_controller_ms is not None and not float(fixed_controller_ms) >= 0:
            raise ValueError(f"fixed_controller_ms={fixed_controller_ms}: expected None or a time >= 0")
        self.knob_space = knob_space
        sizes = knob_space.head_sizes
        self.d_model = d_model
        self.fixed_controller_ms = None if fixed_controller_ms is None else float(fixed_controller_ms)
        self.budget_encoder = LatencyBudgetEncoder(d_model, budget_range_ms, sinusoidal_dim)
        self.stage1 = Knob1PredictorBudgetLanguage(language_dim, d_model, hidden_dim, sizes["tier"], sizes["insertion"])
        self.stage2 = Knob2Knob3Predictor(d_model, hidden_dim, sizes["insertion"], sizes["top_k"], sizes["num_blocks"],
                                          inputs=stage2_inputs, budget_range_ms=budget_range_ms)
        self.stage2_inputs = stage2_inputs
        s1, s2 = STAGE_HEADS
        stage1_actor = ProbabilisticTensorDictSequential(
            _StageNetwork(self.stage1, s1, {"language_feature": "language_feature", "budget_ms": "budget_feature"},
                          self.budget_encoder),
            _categorical_heads(s1),
        )
        stage2_keys = {"latency_token": "latency_token"} if self.stage2.reads_token else {}
        stage2_keys["insertion"] = "insertion_index"
        if self.stage2.elapsed_code is not None:
            stage2_keys.update(elapsed_ms="elapsed_ms", remaining_ms="remaining_ms")
        stage2_actor = ProbabilisticTensorDictSequential(
            _StageNetwork(self.stage2, s2, stage2_keys),
            _categorical_heads(s2),
        )
        # A plain tuple: the actors are views over the predictors registered above, so every
        # parameter (and state_dict key) appears once, under stage1. / stage2. / budget_encoder.
        self.stage_actors = (stage1_actor, stage2_actor)
        self.in_keys = ["stage", *dict.fromkeys(k for actor in self.stage_actors for k in actor.in_keys)]
        self.out_keys = self.action_keys + [(ACTION_KEY, "budget_token"), (ACTION_KEY, "controller_ms")] + self.log_prob_keys

    @property
    def time_scale(self) -> float:
        """This machine's speed over the training machine's (its latency / theirs): both stages read
        every time input (budget, elapsed, remaining) divided by it, i.e. in the units the policy was
        trained in; the env, the shield and the reward keep the measured milliseconds. 1 in training."""
        return self.stage_actors[0].module[0].time_scale

    @time_scale.setter
    def time_scale(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"controller time_scale={value}: expected a finite ratio > 0")
        for actor in self.stage_actors:
            actor.module[0].time_scale = value

    def set_runtime(self, runtime: str) -> None:
        """How each request's stage networks run (the timed, gradient-free calls; the loss's batched calls
        stay eager): "eager" (torch), "compiled" (torch.compile, one fused graph per stage instead of
        ~25 small kernels; each stage compiles on its first request, outside the timed part) or
        "native" (one C call per stage over the same parameters, policies/native.py; CPU)."""
        if runtime not in CONTROLLER_RUNTIMES:
            raise ValueError(f"policy.controller_runtime={runtime!r}: expected one of {list(CONTROLLER_RUNTIMES)}")
        for actor in self.stage_actors:
            network = actor.module[0]
            network.compiled = torch.compile(network._outputs, dynamic=False) if runtime == "compiled" else None
            network.compiled_warm = False
            network.native = NativeStage(network) if runtime == "native" else None

    @property
    def runtime(self) -> str:
        """The runtime set_runtime last set ("eager" until then)."""
        network = self.stage_actors[0].module[0]
        return "native" if network.native is not None else "compiled" if network.compiled is not None else "eager"

    @property
    def stage1_actor(self) -> ProbabilisticTensorDictSequential:
        return self.stage_actors[0]

    @property
    def stage2_actor(self) -> ProbabilisticTensorDictSequential:
        return self.stage_actors[1]

    @property
    def action_keys(self) -> list:
        return [(ACTION_KEY, h) for heads in STAGE_HEADS for h in heads]

    @property
    def log_prob_keys(self) -> list:
        return [log_prob_key(h) for heads in STAGE_HEADS for h in heads]

    # ------------------------------------------------------------- forward
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        """Act on every row with the actor of its stage; heads of the other stage get action 0 and
        log-prob 0 (they do not act at that step)."""
        stage = td["stage"].reshape(-1)
        n, device = stage.shape[0], stage.device
        out = TensorDict(
            {
                **{k: torch.zeros(n, 1, dtype=torch.long, device=device) for k in self.action_keys},
                **{k: torch.zeros(n, 1, device=device) for k in self.log_prob_keys},
                (ACTION_KEY, "budget_token"): torch.zeros(n, self.d_model, device=device),
                (ACTION_KEY, "controller_ms"): torch.zeros(n, 1, device=device),
            },
            batch_size=[n],
        )
        for s, actor in enumerate(self.stage_actors):
            rows = (stage == s).nonzero().flatten()
            if rows.numel() == 0:
                continue
            # CPU indices index tensors on any device (the env's entries need not sit on the policy's)
            acted = self._act_per_request(actor, td[rows.cpu()].select(*actor.in_keys, strict=False), device)
            for key in acted.keys(include_nested=True, leaves_only=True):
                if key in out.keys(include_nested=True):
                    out.get(key)[rows] = acted.get(key).to(out.get(key).dtype)
        td.update(out)
        return td

    def _act_per_request(self, actor, td: TensorDictBase, device: torch.device) -> TensorDictBase:
        """Run the stage's networks on each row alone (batch size 1), timing each call, then draw
        every row's actions from those logits with the actor's categorical heads.

        The draw (a sample or an argmax over a handful of logits per head) runs batched and is not
        in the timed part. With fixed_controller_ms the networks run batched (nothing is timed); with
        gradients on (not a request) they run through torch whatever the runtime.
        """
        network, heads = actor.module[0], actor.module[-1]
        inputs = [td.get(k) for k in network.in_keys]
        n = td.shape[0]
        if self.fixed_controller_ms is not None:
            outputs = network.compute(*inputs)
            controller_ms = torch.full((n, 1), self.fixed_controller_ms, device=device)
        elif network.native is not None and not torch.is_grad_enabled():
            network.native.refresh()
            outputs, times = network.native.run(inputs, network.time_scale)
            controller_ms = torch.tensor(times, device=device).reshape(n, 1)
        else:
            compiled = network.compiled is not None and not torch.is_grad_enabled()
            if compiled and not network.compiled_warm:  # compiles here, not in a request's time
                for _ in range(2):
                    network.compute(*(x[:1] for x in inputs), compiled=True)
                network.compiled_warm = True
            pieces, times = [], []
            for i in range(n):
                row = [x[i : i + 1] for x in inputs]
                _sync(device)
                start = time.perf_counter()
                pieces.append(network.compute(*row, compiled=compiled))
                _sync(device)
                times.append((time.perf_counter() - start) * 1e3)
            outputs = {key: torch.cat([p[key] for p in pieces]) for key in pieces[0]}
            controller_ms = torch.tensor(times, device=device).reshape(n, 1)
        for key, value in outputs.items():
            td.set(key, value)
        td = heads(td)
        td.set((ACTION_KEY, "controller_ms"), controller_ms)
        return td

    # ------------------------------------------------------------- parameters
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
