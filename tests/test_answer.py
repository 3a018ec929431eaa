"""runners/answer.py and agents.answer: one request through a trained controller (tiny VLM)."""
import json

import pytest
import torch
from PIL import Image

from agents.answer import PHASES, answer_request, load_controller, request_sample
from envs.shield import LatencyShield
from agents.checkpoint import save_checkpoint
from agents.config import config_from_dict
from agents.factory import make_actor, make_backend_from_config
from helpers import load_runner, make_tiny_model_dir

answer_runner = load_runner("answer")


def _config(model_dir, backend="vlm"):
    raw = {"env": {"backend": backend,
                   "backend_options": {"num_samples": {"train": 4, "val": 2, "test": 2}, "max_new_tokens": 2}},
           "data": {"dataset_names": ["synthvqa"], "model_path": str(model_dir)},
           "policy": {"hidden_dim": 16, "sinusoidal_dim": 16}}
    if backend == "dummy":
        raw["env"]["backend_options"] = {}
        raw["data"] = {}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 'trained' run: an untrained controller saved the way runners/train.py saves it."""
    tmp = tmp_path_factory.mktemp("answer")
    cfg = _config(make_tiny_model_dir(tmp / "model"))
    actor, meta = make_actor(cfg, make_backend_from_config(cfg))
    save_checkpoint(tmp / "run" / "checkpoints" / "best.pt", policy=actor.state_dict(), policy_meta=meta, step=3,
                    epoch=0, config=cfg.to_dict())
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp / "image.png")
    return tmp


def test_answer_request_reports_knobs_and_latency_by_phase(run_dir):
    controller = load_controller(run_dir / "run")
    out = answer_request(run_dir / "run", run_dir / "image.png", "what color is the big shape?", 20.0,
                         warmup=0, controller=controller)
    actor, backend, cfg = controller.actor, controller.backend, controller.cfg
    assert controller.shield is None  # the run trained without one
    assert not out["shielded"]
    ks = backend.knob_space
    assert out["knobs"]["tier"] in ks.tiers and out["knobs"]["top_k"] in ks.top_k_values
    assert set(out["latency_by_phase_ms"]) == set(PHASES)
    assert out["latency_ms"] == pytest.approx(sum(out["latency_by_phase_ms"].values()), rel=1e-5)
    assert all(v > 0 for v in out["latency_by_phase_ms"].values())
    assert out["violation"] == (out["latency_ms"] > 20.0) and out["accuracy"] is None
    assert out["checkpoint"].endswith("best.pt") and out["checkpoint_step"] == 3
    # The greedy knobs are the controller's argmax for this question and budget.
    question = backend.language_feature(request_sample(cfg, None, out["question"]))[None]
    with torch.no_grad():
        logits = actor.stage1(question.float(), actor.budget_encoder(torch.tensor([[20.0]])))
    assert out["knobs"]["tier"] == ks.tiers[int(logits["tier"].argmax())]
    # The answer is the backend's own decode under those knobs; with a reference it is scored.
    scored = answer_request(run_dir / "run", run_dir / "image.png", out["question"], 20.0, reference=out["answer"],
                            warmup=0, controller=controller)
    assert scored["answer"] == out["answer"] and scored["accuracy"] == 1.0


def test_a_shielded_run_answers_with_the_plan_its_shield_lets_through(run_dir):
    controller = load_controller(run_dir / "run")
    ks = controller.backend.knob_space
    table = torch.full((len(ks.tiers), len(ks.top_k_values), len(ks.num_blocks_values)), 100.0)
    table[0, 0, 0] = 1.0  # at a 20 ms budget only the cheapest plan fits
    shield = LatencyShield(ks, table, insertion_index=len(ks.insertion_positions) - 1)
    out = answer_request(run_dir / "run", run_dir / "image.png", "what color is the big shape?", 20.0, warmup=0,
                         controller=controller._replace(shield=shield))
    assert out["knobs"] == {"tier": ks.tiers[0], "insertion": ks.insertion_positions[-1], "top_k": ks.top_k_values[0],
                            "num_blocks": ks.num_blocks_values[0]}
    assert out["shielded"]


def test_cli_text_and_json(run_dir, capsys):
    args = ["--run", str(run_dir / "run"), "--image", str(run_dir / "image.png"), "--question", "what color is it?",
            "--budget_ms", "500", "--warmup", "0"]
    out = answer_runner.main(args)
    text = capsys.readouterr().out
    assert f"answer: {out['answer']}" in text and "outside the trained budget range" in text
    answer_runner.main([*args, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert set(data["knobs"]) == {"tier", "insertion", "top_k", "num_blocks"} and data["budget_ms"] == 500.0


@pytest.mark.parametrize("change,message", [
    ({"--image": "missing.png"}, "--image {tmp}/missing.png: no such file"),
    ({"--image": "not_an_image.txt"}, "cannot be read as an image"),
    ({"--budget_ms": "-5"}, "--budget_ms"),
    ({"--question": " "}, "--question ' ': expected a non-empty question"),
    ({"--run": "nowhere"}, "does not exist"),
])
def test_bad_input_is_one_line_and_status_2(run_dir, capsys, change, message):
    (run_dir / "not_an_image.txt").write_text("hello")
    args = {"--run": str(run_dir / "run"), "--image": str(run_dir / "image.png"), "--question": "what?",
            "--budget_ms": "20"}
    args.update({k: (str(run_dir / v) if k in ("--image", "--run") else v) for k, v in change.items()})
    with pytest.raises(SystemExit) as err:
        answer_runner.main([x for kv in args.items() for x in kv])
    assert err.value.code == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and message.format(tmp=run_dir) in line, line


def test_a_dummy_run_is_refused_clearly(tmp_path):
    cfg = _config(None, backend="dummy")
    actor, meta = make_actor(cfg, make_backend_from_config(cfg))
    save_checkpoint(tmp_path / "checkpoints" / "best.pt", policy=actor.state_dict(), policy_meta=meta, step=0,
                    epoch=0, config=cfg.to_dict())
    with pytest.raises(ValueError, match="trained on the dummy backend"):
        load_controller(tmp_path)


def test_the_trained_range_is_the_checkpoints_and_read_in_its_machines_units(tmp_path):
    cfg = _config(make_tiny_model_dir(tmp_path / "model"))
    actor, meta = make_actor(cfg, make_backend_from_config(cfg))
    meta = {**meta, "budget_range_ms": [10.0, 30.0]}  # trained at its machine's range (env.budget_range machine)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", policy=actor.state_dict(), policy_meta=meta, step=1,
                    epoch=0, config=cfg.to_dict())
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "image.png")
    controller = load_controller(tmp_path / "run")
    assert controller.backend.budget_range_ms == (10.0, 30.0)  # not the profile's

    def inside(budget_ms: float, time_scale: float) -> bool:
        return answer_request(tmp_path / "run", tmp_path / "image.png", "what color is it?", budget_ms, warmup=0,
                              controller=controller._replace(time_scale=time_scale))["budget_in_trained_range"]

    assert inside(20.0, 1.0) and not inside(40.0, 1.0)
    assert inside(40.0, 2.0)  # this machine twice as slow: 40 ms here reads 20 ms of the training machine
