"""Controller checkpoints: policy, optimizer, step, RNG states and what the policy was built for."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.knobs import KnobSpace
from policies.controller import HierarchicalController


def actor_meta(backend, hidden_dim: int, sinusoidal_dim: int) -> dict:
    """Everything needed to build an actor for a backend, and to check a checkpoint fits it."""
    return {
        "knob_space": backend.knob_space.to_dict(),
        "language_dim": backend.language_dim,
        "d_model": backend.d_model,
        "budget_range_ms": list(backend.budget_range_ms),
        "hidden_dim": hidden_dim,
        "sinusoidal_dim": sinusoidal_dim,
        "backend": backend.describe(),
    }


def build_actor(meta: dict) -> HierarchicalController:
    return HierarchicalController(
        KnobSpace.from_dict(meta["knob_space"]),
        meta["language_dim"],
        meta["d_model"],
        meta["budget_range_ms"],
        hidden_dim=meta["hidden_dim"],
        sinusoidal_dim=meta["sinusoidal_dim"],
    )


def check_compatible(meta: dict, expected: dict, path: str | Path) -> None:
    """Raise a ValueError naming the first field where a checkpoint does not fit the policy."""
    for key in ("knob_space", "language_dim", "d_model", "hidden_dim", "sinusoidal_dim"):
        if meta.get(key) != expected.get(key):
            raise ValueError(
                f"checkpoint {path} does not match the policy: {key}={meta.get(key)!r}, expected {expected.get(key)!r}"
            )


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: str | Path, **payload: Any) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        # A training output_dir: take its best checkpoint, else its latest.
        for name in ("best.pt", "latest.pt"):
            if (path / "checkpoints" / name).is_file():
                path = path / "checkpoints" / name
                break
        else:
            raise FileNotFoundError(f"{path} holds no checkpoints/best.pt or checkpoints/latest.pt")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"checkpoint {path} cannot be read: {err}") from err
    for key in ("policy", "policy_meta", "step"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} lacks {key!r}; it is not a BudgetVLM controller checkpoint")
    ckpt["path"] = str(path)
    return ckpt


def load_stage1_weights(actor: HierarchicalController, path: str | Path, expected_meta: dict) -> None:
    """Initialise Stage 1 (and the budget encoder it reads) from another run's checkpoint."""
    ckpt = load_checkpoint(path)
    check_compatible(ckpt["policy_meta"], expected_meta, path)
    state = {k: v for k, v in ckpt["policy"].items() if k.startswith(("stage1.", "budget_encoder."))}
    missing, unexpected = actor.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(("stage1.", "budget_encoder."))]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: Stage-1 weights missing {missing} / unexpected {unexpected}")
