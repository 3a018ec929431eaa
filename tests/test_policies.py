import pytest
import torch
from tensordict.nn import CompositeDistribution, ProbabilisticTensorDictSequential
from torch.distributions import Categorical
from torchrl.envs.utils import ExplorationType, set_exploration_type

from envs import make_env
from policies import HierarchicalController, LatencyBudgetEncoder, sinusoidal_code


def _actor(env, **kwargs):
    b = env.backend
    return HierarchicalController(b.knob_space, b.language_dim, b.d_model, b.budget_range_ms, hidden_dim=32, **kwargs)


def test_budget_encoder_shapes_and_normalisation():
    enc = LatencyBudgetEncoder(d_model=48, budget_range_ms=(50, 150))
    out = enc(torch.tensor([[50.0], [100.0], [150.0]]))
    assert out.shape == (3, 48)
    assert torch.allclose(enc.normalise(torch.tensor([50.0, 150.0])), torch.tensor([0.0, 1.0]))
    # the sinusoidal code is fixed: only the MLP has parameters
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in enc.mlp.parameters())


def _far_over_near(**code_kwargs) -> float:
    """Smallest code distance of budgets >= 10% of the range apart over the largest of budgets
    <= 2% apart: > 1 means no far budget looks like a near one."""
    x = torch.linspace(0, 1, 201).unsqueeze(-1)
    dist = torch.cdist(sinusoidal_code(x, 256, **code_kwargs), sinusoidal_code(x, 256, **code_kwargs))
    dx = (x - x.T).abs()
    return float(dist[dx >= 0.1].min() / dist[(dx > 0) & (dx <= 0.02 + 1e-6)].max())


def test_budget_code_does_not_alias_across_the_range():
    # The default run relies on it: with transformer position scales (x*1000, period up to 1e4)
    # budgets far apart got codes as close as budgets 2% apart (ratio 1.2), and the tier head
    # collapsed before it could learn budget-dependent choices.
    assert _far_over_near() > 3.0
    assert _far_over_near(max_period=1e4, scale=1000.0) < 1.5


def test_stages_are_probabilistic_tensordict_actors():
    env = make_env("dummy", batch_size=2, group_size=2)
    actor = _actor(env)
    s1, s2 = actor.stage_actors
    assert isinstance(s1, ProbabilisticTensorDictSequential) and isinstance(s2, ProbabilisticTensorDictSequential)
    assert s1.log_prob_keys == [("action", "tier_log_prob"), ("action", "insertion_log_prob")]
    assert s2.dist_sample_keys == [("action", "top_k"), ("action", "num_blocks")]
    td = env.reset()
    assert isinstance(s1.get_dist(td.clone()), CompositeDistribution)
    # every parameter once, under the predictors' names (checkpoints keep their keys)
    names = [n for n, _ in actor.named_parameters()]
    assert len(names) == len(set(names)) and all(n.startswith(("stage1.", "stage2.", "budget_encoder.")) for n in names)


def test_greedy_mode_is_the_argmax_and_writes_budget_token():
    env = make_env("dummy", batch_size=2, group_size=3)
    actor = _actor(env)
    td = env.reset()
    with torch.no_grad():
        logits = actor.stage1(td["language_feature"], actor.budget_encoder(td["budget_ms"]))
        expected_token = actor.budget_encoder(td["budget_ms"])
    for mode in (ExplorationType.DETERMINISTIC, ExplorationType.MODE):
        with set_exploration_type(mode), torch.no_grad():
            a = actor(td.clone())
        assert torch.equal(a["action", "tier"].reshape(-1), logits["tier"].argmax(-1)), mode
        assert torch.equal(a["action", "insertion"].reshape(-1), logits["insertion"].argmax(-1)), mode
    assert torch.allclose(a["action", "budget_token"], expected_token, atol=1e-6)
    # the stored log-prob is the sampled action's under the stage's distribution
    lp = Categorical(logits=logits["tier"]).log_prob(a["action", "tier"].reshape(-1))
    assert torch.allclose(a["action", "tier_log_prob"].reshape(-1), lp, atol=1e-5)
    # at Stage 1 only the Stage-1 heads act
    assert (a["action", "top_k_log_prob"] == 0).all() and (a["action", "tier_log_prob"] < 0).all()


def test_random_mode_samples_every_action():
    env = make_env("dummy", batch_size=16, group_size=8)
    actor = _actor(env)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        a = actor(env.reset())
    assert a["action", "tier"].unique().numel() == env.knob_space.head_sizes["tier"]


def test_controller_time_is_measured_per_request_or_fixed():
    env = make_env("dummy", batch_size=2, group_size=2)
    with torch.no_grad():
        measured = _actor(env)(env.reset())["action", "controller_ms"]
        fixed = _actor(env, fixed_controller_ms=0.25)(env.reset())["action", "controller_ms"]
    assert measured.shape == (4, 1) and (measured > 0).all() and measured.unique().numel() > 1
    assert (fixed == 0.25).all()
    with pytest.raises(ValueError, match="fixed_controller_ms=-1"):
        _actor(env, fixed_controller_ms=-1)


def test_each_request_runs_alone_at_batch_size_one():
    env = make_env("dummy", batch_size=3, group_size=2)
    actor = _actor(env)
    batch_sizes = []
    handle = actor.stage1.register_forward_pre_hook(
        lambda m, args, kwargs: batch_sizes.append(kwargs["language_feature"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        actor(env.reset())
    handle.remove()
    assert batch_sizes == [1] * 6


def test_config_fixes_the_controller_time_for_training():
    from agents.config import config_from_dict
    from agents.factory import make_actor, make_backend_from_config

    cfg = config_from_dict({"policy": {"hidden_dim": 16, "sinusoidal_dim": 16, "fixed_controller_ms": 0.3}})
    actor, _ = make_actor(cfg, make_backend_from_config(cfg))
    env = make_env("dummy", batch_size=1, group_size=2)
    with torch.no_grad():
        assert (actor(env.reset())["action", "controller_ms"] == 0.3).all()


def test_compiled_stages_act_as_the_eager_ones_and_a_new_time_scale_does_not_recompile():
    import torch._dynamo

    from agents.config import config_from_dict
    from agents.factory import make_actor, make_backend_from_config

    cfg = config_from_dict({"policy": {"hidden_dim": 16, "sinusoidal_dim": 16, "controller_runtime": "compiled"}})
    backend = make_backend_from_config(cfg)
    compiled, _ = make_actor(cfg, backend)
    eager, _ = make_actor(config_from_dict({"policy": {"hidden_dim": 16, "sinusoidal_dim": 16}}), backend)
    eager.load_state_dict(compiled.state_dict())
    assert compiled.runtime == "compiled" and eager.runtime == "eager"
    env = make_env(backend, batch_size=3, group_size=1)
    td = env.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for scale in (1.0, 1.3, 0.7):
            compiled.time_scale = eager.time_scale = scale
            a, b = compiled(td.clone()), eager(td.clone())
            assert torch.allclose(a["action", "budget_token"], b["action", "budget_token"], atol=1e-5)
            for head in ("tier", "insertion"):
                assert (a["action", head] == b["action", head]).all()
        for actor in (compiled, eager):  # an optimiser step: the compiled graph reads the new weights
            actor.budget_encoder.mlp[0].bias.add_(0.5)
        tokens = [actor(td.clone())["action", "budget_token"] for actor in (compiled, eager)]
        assert torch.allclose(*tokens, atol=1e-5)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1  # Stage 1 compiled once, whatever the time scale
