"""policy.controller_runtime: how each request's stage networks run (eager, compiled, native C)."""
import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from agents.config import config_from_dict
from envs import make_env
from policies import HierarchicalController
from policies.native import native_library

ACTION_KEYS = [("action", h) for h in ("tier", "insertion", "top_k", "num_blocks")]


def _pair(env, stage2_inputs="token+elapsed", runtime="native"):
    """(runtime actor, eager actor) with the same weights."""
    b = env.backend
    make = lambda: HierarchicalController(b.knob_space, b.language_dim, b.d_model, b.budget_range_ms,  # noqa: E731
                                          hidden_dim=24, sinusoidal_dim=32, stage2_inputs=stage2_inputs)
    fast, eager = make(), make()
    eager.load_state_dict(fast.state_dict())
    fast.set_runtime(runtime)
    return fast.eval(), eager.eval()


def _both_steps(native, eager, env, td):
    """Each actor's greedy outputs on the same Stage-1 observation `td`, then on the same Stage-2
    observation (the env stepped with the native actor's Stage-1 action); and that observation."""
    a1, b1 = native(td.clone()), eager(td.clone())
    observation = env.step(a1.clone())["next"]
    return (a1, b1), (native(observation.clone()), eager(observation.clone())), observation


def _assert_same(a, b):
    assert torch.allclose(a["action", "budget_token"], b["action", "budget_token"], atol=1e-5)
    for key in ACTION_KEYS:
        assert (a[key] == b[key]).all()
        assert torch.allclose(a["action", f"{key[1]}_log_prob"], b["action", f"{key[1]}_log_prob"], atol=1e-5)


@pytest.mark.parametrize("stage2_inputs", ["token", "token+elapsed", "elapsed"])
def test_native_stages_compute_what_the_torch_networks_compute(stage2_inputs):
    env = make_env("dummy", batch_size=4, group_size=2)
    native, eager = _pair(env, stage2_inputs)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for scale in (1.0, 1.3, 0.7):  # the times each stage reads are divided by the time scale
            native.time_scale = eager.time_scale = scale
            td = env.reset()
            first, second, observation = _both_steps(native, eager, env, td)
            _assert_same(*first)
            _assert_same(*second)
            # each stage network's logits, row by row in C, against the batched torch forward
            for actor, other, source in zip(native.stage_actors, eager.stage_actors, (td, observation)):
                net = actor.module[0]
                inputs = [source.get(k) for k in net.in_keys]
                fast, times = net.native.run(inputs, net.time_scale)
                slow = other.module[0].compute(*inputs)
                assert fast.keys() == slow.keys() and len(times) == source.shape[0]
                for key in slow:
                    assert fast[key].shape == slow[key].shape
                    assert torch.allclose(fast[key], slow[key], atol=1e-5)


def test_native_stages_read_in_place_updates_and_replaced_parameters():
    env = make_env("dummy", batch_size=3, group_size=1)
    native, eager = _pair(env)
    td = env.reset()
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for actor in (native, eager):  # an optimiser step (in place)
            actor.budget_encoder.mlp[0].bias.add_(0.5)
            actor.stage1.tier_head.weight.mul_(-2.0)
            actor.stage2.num_blocks_head.bias.add_(torch.arange(5.0))
        for outputs in _both_steps(native, eager, env, td)[:2]:
            _assert_same(*outputs)
        replacement = torch.randn_like(eager.stage1.trunk[0].weight)
        for actor in (native, eager):  # a parameter's storage replaced: read at the next request
            actor.stage1.trunk[0].weight.data = replacement.clone()
        _assert_same(native(td.clone()), eager(td.clone()))
        assert native.stage1.trunk[0].weight.data_ptr() in native.stage_actors[0].module[0].native.addresses


def test_native_time_is_each_request_call_measured_alone():
    env = make_env("dummy", batch_size=3, group_size=2)
    native, _ = _pair(env)
    with torch.no_grad():
        ms = native(env.reset())["action", "controller_ms"]
    assert ms.shape == (6, 1) and (ms > 0).all() and ms.unique().numel() > 1


def test_factory_runs_the_configured_runtime_and_names_bad_values():
    from agents.factory import make_actor, make_backend_from_config

    cfg = config_from_dict({"policy": {"hidden_dim": 16, "sinusoidal_dim": 16, "controller_runtime": "native"}})
    actor, _ = make_actor(cfg, make_backend_from_config(cfg))
    assert actor.runtime == "native"
    assert all(a.module[0].native is not None and a.module[0].compiled is None for a in actor.stage_actors)
    with pytest.raises(ValueError, match=r"policy.controller_runtime='fast': expected one of \['eager', 'compiled', "
                                         r"'native'\]"):
        make_actor(config_from_dict({"policy": {"controller_runtime": "fast"}}), make_backend_from_config(cfg))
    cuda = config_from_dict({"policy": {"controller_runtime": "native"}, "train": {"device": "cuda"}})
    with pytest.raises(ValueError, match=r"policy.controller_runtime='native' runs the stage networks on the CPU, but "
                                         r"train.device='cuda'"):
        make_actor(cuda, make_backend_from_config(cfg))


def test_older_configs_boolean_compile_key_reads_as_a_runtime():
    assert config_from_dict({"policy": {"compile_controller": True}}).policy.controller_runtime == "compiled"
    assert config_from_dict({"policy": {"compile_controller": False}}).policy.controller_runtime == "eager"
    with pytest.raises(ValueError, match="policy.compile_controller='yes': expected true or false"):
        config_from_dict({"policy": {"compile_controller": "yes"}})
    with pytest.raises(KeyError, match="policy.compile_controller and policy.controller_runtime are both set"):
        config_from_dict({"policy": {"compile_controller": True, "controller_runtime": "native"}})


def test_a_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc")
    native_library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"policy.controller_runtime='native' compiles native_stages.c with a C "
                                               r"compiler, and 'no-such-cc' \(the CC environment variable"):
            native_library()
    finally:
        native_library.cache_clear()


def test_native_stage_inputs_of_the_wrong_width_or_insertion_fail_naming_them():
    env = make_env("dummy", batch_size=2, group_size=1)
    native, _ = _pair(env)
    stage1, stage2 = (a.module[0].native for a in native.stage_actors)
    language = torch.zeros(2, env.backend.language_dim + 1)
    with pytest.raises(ValueError, match=rf"native Stage 1 input 'language_feature': expected a CPU \(rows, "
                                         rf"{env.backend.language_dim}\) tensor, got \(2, {env.backend.language_dim + 1}\)"):
        stage1.run([language, torch.full((2, 1), 80.0)], 1.0)
    token, times = torch.zeros(2, env.backend.d_model), torch.ones(2, 1)
    with pytest.raises(ValueError, match=r"native Stage 2 input 'insertion_index'=5: expected an index in \[0, 4\]"):
        stage2.run([token, torch.tensor([[0], [5]]), times, times], 1.0)
