"""Stage 2's inputs (policy.stage2_inputs): the latency token, the request's measured elapsed and
remaining time, or both; the env measures elapsed at the end of Stage 1."""
import pytest
import torch
from tensordict import TensorDict

from agents.rollout import collect_rollouts
from envs import make_env, reset_to
from envs.backends.molmoe import MolmoEBackend
from envs.backends.vlm import VLMBackend
from envs.data.sample import VQASample
from helpers import make_tiny_model_dir
from molmoe_fixture import FIXTURE, cases, image, requires_fixture, write_results
from policies import STAGE2_INPUTS, ElapsedCode, HierarchicalController


def _actor(env, stage2_inputs):
    b = env.backend
    return HierarchicalController(b.knob_space, b.language_dim, b.d_model, b.budget_range_ms, hidden_dim=32,
                                  stage2_inputs=stage2_inputs)


def _stage2_logits(actor, td):
    network = actor.stage2_actor.module[0]
    with torch.no_grad():
        out = network.compute(*(td.get(k) for k in network.in_keys))
    return torch.cat([out["logits", h, "logits"] for h in ("top_k", "num_blocks")], dim=-1)


@pytest.fixture(scope="module")
def stage2_obs():
    """A Stage-2 observation of the dummy env (after a Stage-1 step)."""
    env = make_env("dummy", batch_size=4, group_size=1, seed=0)
    torch.manual_seed(0)
    traj = collect_rollouts(env, _actor(env, "token"))
    return env, traj[:, 1].exclude("next")


@pytest.mark.parametrize("option", STAGE2_INPUTS)
def test_each_option_changes_what_stage2_reads(stage2_obs, option):
    env, td = stage2_obs
    torch.manual_seed(1)
    actor = _actor(env, option)
    base = _stage2_logits(actor, td)
    other_token = td.clone()
    other_token["latency_token"] = torch.randn_like(td["latency_token"]) * 3
    later = td.clone()
    later["elapsed_ms"] = td["elapsed_ms"] + 40.0
    later["remaining_ms"] = td["remaining_ms"] - 40.0
    token_moves = not torch.allclose(_stage2_logits(actor, other_token), base)
    elapsed_moves = not torch.allclose(_stage2_logits(actor, later), base)
    assert token_moves == (option in ("token", "token+elapsed"))
    assert elapsed_moves == (option in ("token+elapsed", "elapsed"))
    keys = set(actor.stage2_actor.in_keys)
    assert ("latency_token" in keys) == token_moves and ({"elapsed_ms", "remaining_ms"} <= keys) == elapsed_moves


def test_elapsed_code_is_fixed_and_separates_times():
    code = ElapsedCode((20.0, 60.0), dim_per_value=16)
    assert code.dim == 32 and not list(code.parameters())
    t = torch.tensor([[10.0], [11.0], [40.0]])
    c = code(t, 60.0 - t)
    assert c.shape == (3, 32)
    assert (c[0] - c[2]).norm() > 5 * (c[0] - c[1]).norm()


def test_bad_option_is_refused_naming_the_field():
    env = make_env("dummy", batch_size=1, group_size=1)
    with pytest.raises(ValueError, match=r"policy.stage2_inputs='latency' is not known; expected one of"):
        _actor(env, "latency")


def test_dummy_env_measures_elapsed_at_the_end_of_stage1():
    env = make_env("dummy", batch_size=6, group_size=1, seed=0)
    torch.manual_seed(0)
    traj = collect_rollouts(env, _actor(env, "token+elapsed"), reset_to(6, budget_ms=torch.full((6,), 90.0)))
    assert (traj[:, 0]["elapsed_ms"] == 0).all()  # nothing spent before Stage 1
    s2 = traj[:, 1]
    info = s2["next", "episode"]
    elapsed = s2["elapsed_ms"]
    torch.testing.assert_close(s2["remaining_ms"], 90.0 - elapsed)
    torch.testing.assert_close(info["elapsed_ms"], elapsed)  # the episode records what Stage 2 read
    # elapsed = preprocess + vision + the first p blocks' share of the prefill + Stage-1 time
    start = info["preprocess_ms"] + info["vision_ms"] + info["stage1_controller_ms"]
    assert (elapsed > start).all() and (elapsed <= start + info["prefill_ms"] + 1e-4).all()
    # the episode's latency adds the rest of the prefill, the decode and Stage 2 to it
    assert (info["latency_ms"] > elapsed + info["decode_ms"] + info["stage2_controller_ms"] - 1e-4).all()


@pytest.fixture(scope="module")
def vlm_backend(tmp_path_factory):
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("tiny_vlm_elapsed"))
    return VLMBackend(model_path=model_dir, num_samples={"train": 4, "val": 4, "test": 4}, max_new_tokens=2)


def test_vlm_env_elapsed_is_the_meter_time_before_stage2(vlm_backend):
    env = make_env(vlm_backend, batch_size=2, group_size=1, split="val", seed=0)
    td = env.reset(reset_to(2, sample_index=[0, 1], budget_ms=[20.0, 20.0]))
    ks = vlm_backend.knob_space
    td["action"] = TensorDict(
        tier=torch.full((2, 1), len(ks.tiers) - 1), insertion=torch.tensor([[0], [len(ks.insertion_positions) - 1]]),
        top_k=torch.zeros(2, 1, dtype=torch.long), num_blocks=torch.full((2, 1), len(ks.num_blocks_values) - 1),
        budget_token=torch.zeros(2, vlm_backend.d_model), controller_ms=torch.tensor([[0.5], [0.5]]), batch_size=[2],
    )
    mid = env.step(td)["next"]
    elapsed = mid["elapsed_ms"].reshape(2)
    mid["action"] = td["action"].clone()
    mid["action", "controller_ms"] = torch.zeros(2, 1)
    info = env.step(mid)["next", "episode"]
    start = (info["preprocess_ms"] + info["vision_ms"]).reshape(2) + 0.5
    assert (elapsed > start).all()  # the first p blocks took time
    assert (elapsed < start + info["prefill_ms"].reshape(2)).all()  # the rest of the prefill comes after


def test_train_flag_reaches_the_checkpoint(tmp_path):
    from agents.checkpoint import build_actor, load_checkpoint
    from train_runs import tiny_config, train_main

    out = tmp_path / "run"
    train_main("--config", tiny_config(tmp_path, train={"num_epochs": 1}), "--output_dir", out,
               "--stage2_inputs", "elapsed")
    ckpt = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert ckpt["policy_meta"]["stage2_inputs"] == "elapsed" and ckpt["config"]["policy"]["stage2_inputs"] == "elapsed"
    actor = build_actor(ckpt["policy_meta"])
    actor.load_state_dict(ckpt["policy"])
    assert "latency_token" not in actor.stage2_actor.in_keys and "elapsed_ms" in actor.stage2_actor.in_keys


def test_a_checkpoint_of_another_stage2_input_is_refused():
    from agents.checkpoint import actor_meta, check_compatible

    backend = make_env("dummy", batch_size=1, group_size=1).backend
    token = actor_meta(backend, 32, 32)
    older = {k: v for k, v in token.items() if k != "stage2_inputs"}  # written before the option existed
    check_compatible(older, token, "old.pt")
    with pytest.raises(ValueError, match=r"old.pt does not match the policy: stage2_inputs='token', expected 'elapsed'"):
        check_compatible(older, actor_meta(backend, 32, 32, "elapsed"), "old.pt")


@requires_fixture
def test_molmoe_elapsed_is_the_meter_time_before_stage2(tmp_path):
    backend = MolmoEBackend(model_path=FIXTURE, results_dir=write_results(tmp_path), tier_max_crops={"low": 1},
                            prompt_templates={"synthvqa": "{question}"}, max_new_tokens=2)
    c = cases()[0]
    sample = VQASample(question=c["prompt"], answers=["red"] * 10, question_id=c["id"], dataset="synthvqa",
                       image_loader=lambda: image(c))
    ep = backend.start_episode(sample, "low", torch.zeros(backend.d_model))
    backend.run_to(ep, 2)
    elapsed = backend.elapsed_ms(ep)
    assert backend.elapsed_ms(ep) == elapsed  # reading it leaves the episode's timer as it was
    t = backend.finish(ep, 4, 4).timings_ms
    assert t["preprocess"] + t["vision"] < elapsed < t["preprocess"] + t["vision"] + t["prefill"]
