import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from envs import make_env
from policies import HierarchicalController, LatencyBudgetEncoder, sinusoidal_code


def test_budget_encoder_shapes_and_normalisation():
    enc = LatencyBudgetEncoder(d_model=48, budget_range_ms=(50, 150))
    out = enc(torch.tensor([[50.0], [100.0], [150.0]]))
    assert out.shape == (3, 48)
    assert torch.allclose(enc.normalise(torch.tensor([50.0, 150.0])), torch.tensor([0.0, 1.0]))
    code = sinusoidal_code(torch.tensor([[0.5]]), 256)
    assert code.shape == (1, 256)
    # the sinusoidal code is fixed: only the MLP has parameters
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in enc.mlp.parameters())


def test_greedy_mode_is_deterministic_and_writes_budget_token():
    env = make_env("dummy", batch_size=2, group_size=3)
    b = env.backend
    actor = HierarchicalController(b.knob_space, b.language_dim, b.d_model, b.budget_range_ms, hidden_dim=32)
    td = env.reset()
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        a = actor(td.clone())
        c = actor(td.clone())
    assert torch.equal(a["action", "tier"], c["action", "tier"])
    with torch.no_grad():
        expected = actor.budget_encoder(td["budget_ms"])
    assert torch.allclose(a["action", "budget_token"], expected)
    # at Stage 1 only the Stage-1 heads act
    assert (a["log_prob", "top_k"] == 0).all() and (a["log_prob", "tier"] < 0).all()
