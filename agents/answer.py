"""Use a trained controller on one request: image + question + latency budget -> answer.

The run's best checkpoint (else its latest) is loaded with the backend it was trained on (from the
config stored in the checkpoint), and the request goes through the env like any evaluation
episode: greedy Stage 1, the backend up to the insertion point, greedy Stage 2, the rest of the
prefill and the decode. What comes back is the answer, the chosen knobs and the latency measured
by phase, both controller stages included. A run trained with policy.latency_shield answers
through its shield, rebuilt at load time for this machine (the profile rescaled by a start-up
measurement, plus the controller's own time); the knobs reported are the plan that ran.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, UnidentifiedImageError

from agents.checkpoint import actor_meta, check_compatible, load_checkpoint
from agents.config import config_from_dict
from agents.factory import (controller_time_scale, load_actor, make_backend_from_config, make_env, make_latency_shield,
                            measure_profile_drift)
from agents.rollout import collect_rollouts
from envs.budget_env import reset_to
from envs.data.sample import VQASample
from envs.reward import check_budget
from envs.shield import LatencyShield, following_time_scale

PHASES = ("preprocess", "vision", "prefill", "decode", "stage1_controller", "stage2_controller")


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--image {path}: cannot be read as an image ({err})") from None


class Controller(NamedTuple):
    actor: Any  # in eval mode
    backend: Any
    cfg: Any
    ckpt: dict
    shield: LatencyShield | None  # the run's latency shield on this machine, None when it trained without
    time_scale: float  # this machine's latency / the training run's (agents.factory.controller_time_scale)


def load_controller(run: str | Path, device: str | None = None) -> Controller:
    """The Controller of a training run dir or checkpoint file. Sets torch's CPU threads to the
    run's train.num_threads."""
    ckpt = load_checkpoint(run)
    if ckpt.get("config") is None:
        raise ValueError(f"--run {run}: checkpoint {ckpt['path']} stores no config, so its backend is unknown")
    cfg = config_from_dict(ckpt["config"])
    if cfg.env.backend == "dummy":
        raise ValueError(f"--run {run}: trained on the dummy backend, which reads no image or question; "
                         f"answer needs a run trained on --backend vlm")
    if device is not None:
        cfg.train.device = device
    if cfg.train.num_threads:
        # The run's CPU threads: its latencies (and so its budgets) were measured with them.
        torch.set_num_threads(cfg.train.num_threads)
    backend = make_backend_from_config(cfg)
    # The range the controller trained at (with env.budget_range "machine", its machine's, not the
    # profile's): the shield's budget bins and budget_in_trained_range read it.
    backend.budget_range_ms = tuple(ckpt["policy_meta"]["budget_range_ms"])
    policy = cfg.policy
    expected = actor_meta(backend, policy.hidden_dim, policy.sinusoidal_dim, policy.stage2_inputs)
    check_compatible(ckpt["policy_meta"], expected, ckpt["path"])
    actor = load_actor(ckpt, cfg)
    drift = measure_profile_drift(backend) if cfg.policy.latency_shield or ckpt.get("latency_scales") else None
    shield = (make_latency_shield(cfg, backend, actor, drift, requests=ckpt["policy_meta"].get("family_requests"))
              if cfg.policy.latency_shield else None)
    return Controller(actor, backend, cfg, ckpt, shield, controller_time_scale(ckpt.get("latency_scales"), drift))


def request_sample(cfg, image: Image.Image, question: str, reference: str | None = None) -> VQASample:
    """The request as a sample of the run's (first) training dataset, so the model gets the prompt
    template it was trained with. The env scores every episode; without a reference the score is
    against a placeholder and dropped."""
    dataset = cfg.data.dataset_names[0] if cfg.data.dataset_names else "synthvqa"
    return VQASample(question=question.strip(), answers=[reference if reference is not None else ""],
                     question_id="request", dataset=dataset, image_loader=lambda: image)


def answer_request(run: str | Path, image: str | Path | Image.Image, question: str, budget_ms: float,
                   reference: str | None = None, device: str | None = None, warmup: int = 1,
                   controller=None) -> dict:
    """Answer one request with a trained controller; returns a JSON-able dict.

    reference: a reference answer to score against (the VQA metric); without one, no accuracy.
    warmup: identical requests run first, so the measured one does not pay one-time start-up costs.
    controller: load_controller's Controller, to answer many requests with one load.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"--question {question!r}: expected a non-empty question")
    check_budget(torch.tensor([float(budget_ms)]), "--budget_ms")
    if int(warmup) < 0:
        raise ValueError(f"--warmup {warmup}: expected >= 0")
    picture = image if isinstance(image, Image.Image) else load_image(image)
    actor, backend, cfg, ckpt, shield, time_scale = controller or load_controller(run, device)
    sample = request_sample(cfg, picture, question, reference)
    env = make_env(cfg, backend, "test", 1, 1, samples=[sample], shield=shield)
    reset = reset_to(1, sample_index=[0], budget_ms=[float(budget_ms)])
    for _ in range(int(warmup) + 1):
        actor.time_scale = following_time_scale(time_scale, shield, float(budget_ms))  # as evaluate.py --time_rescale on
        trajectory = collect_rollouts(env, actor, reset.clone(), greedy=True)
    result = env.last_results[0]
    info = trajectory["next", "episode"][0, 1]
    ks = backend.knob_space
    lo, hi = backend.budget_range_ms
    return {
        "answer": result.answer,
        "accuracy": float(info["accuracy"]) if reference is not None else None,
        "question": sample.question,
        "budget_ms": float(budget_ms),
        # in the training machine's ms, as the controller reads it (evaluate.py's controller_trained_ranges)
        "budget_in_trained_range": bool(lo <= float(budget_ms) / time_scale <= hi),
        # the plan that ran
        "knobs": {head: values[int(info[f"{head}_index"])] for head, values in ks.head_values.items()},
        "shielded": bool(info["shielded"]),  # the latency shield changed the controller's choice
        "shield_cut": bool(info["shield_cut"]),  # ... by lowering the tier, top-k or blocks for the budget
        "latency_ms": float(info["latency_ms"]),
        "latency_by_phase_ms": {phase: float(info[f"{phase}_ms"]) for phase in PHASES},
        "violation": bool(info["violation"]),
        "checkpoint": ckpt["path"],
        "checkpoint_step": ckpt.get("step"),
        "backend": backend.describe()["backend"],
        "device": cfg.train.device,
    }
