"""The two-step env over the embedded VLM (tiny random-weight model): specs and the budget token."""
import pytest
import torch
from tensordict import TensorDict
from torchrl.envs.utils import check_env_specs

from envs import make_env, reset_to
from envs.backends.vlm import VLMBackend
from helpers import make_tiny_model_dir


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("tiny_vlm"))
    return VLMBackend(model_path=model_dir, num_samples={"train": 8, "val": 4, "test": 4}, max_new_tokens=2)


def test_check_env_specs_on_the_vlm_env(backend):
    check_env_specs(make_env(backend, batch_size=1, group_size=2, split="val", seed=0))


def test_a_different_budget_token_changes_the_next_latency_token(backend):
    env = make_env(backend, batch_size=3, group_size=1, split="val", seed=0)
    td = env.reset(reset_to(3, sample_index=[0, 0, 0], budget_ms=[20.0, 20.0, 20.0]))
    token = torch.randn(backend.d_model, generator=torch.Generator().manual_seed(0))
    other = torch.randn(backend.d_model, generator=torch.Generator().manual_seed(1))
    td["action"] = TensorDict(
        tier=torch.zeros(3, 1, dtype=torch.long), insertion=torch.ones(3, 1, dtype=torch.long),
        top_k=torch.zeros(3, 1, dtype=torch.long), num_blocks=torch.zeros(3, 1, dtype=torch.long),
        budget_token=torch.stack([token, token, other]), controller_ms=torch.zeros(3, 1), batch_size=[3],
    )
    latency_token = env.step(td)["next", "latency_token"]
    torch.testing.assert_close(latency_token[0], latency_token[1])  # same request, same token
    assert not torch.allclose(latency_token[0], latency_token[2], atol=1e-4)  # only the budget token differs
