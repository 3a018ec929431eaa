"""Controller checkpoints: policy, optimizer, step, RNG states and what the policy was built for.

A multi-rank run saves every rank's RNG and env states (`rank_states_payload`); a resume on any
number of ranks reads them back with `saved_rank_states`.

A checkpoint holds tensors and plain Python values only (RNG states included), so it loads with
`torch.load(weights_only=True)`: a file from someone else cannot run code when it is loaded.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from envs.files import atomic_writer
from envs.knobs import KnobSpace
from policies.controller import HierarchicalController


def actor_meta(backend, hidden_dim: int, sinusoidal_dim: int, stage2_inputs: str = "token") -> dict:
    """Everything needed to build an actor for a backend, and to check a checkpoint fits it."""
    return {
        "stage2_inputs": stage2_inputs,
        "knob_space": backend.knob_space.to_dict(),
        "language_dim": backend.language_dim,
        "d_model": backend.d_model,
        "budget_range_ms": list(backend.budget_range_ms),
        "hidden_dim": hidden_dim,
        "sinusoidal_dim": sinusoidal_dim,
        "backend": backend.describe(),
    }


def build_actor(meta: dict, fixed_controller_ms: float | None = None) -> HierarchicalController:
    """fixed_controller_ms: how the actor reports its own time (None: measured); not part of meta,
    since a checkpoint's weights do not depend on it."""
    return HierarchicalController(
        KnobSpace.from_dict(meta["knob_space"]),
        meta["language_dim"],
        meta["d_model"],
        meta["budget_range_ms"],
        hidden_dim=meta["hidden_dim"],
        sinusoidal_dim=meta["sinusoidal_dim"],
        fixed_controller_ms=fixed_controller_ms,
        stage2_inputs=meta.get("stage2_inputs", "token"),  # checkpoints before the option: the token
    )


def check_compatible(meta: dict, expected: dict, path: str | Path) -> None:
    """Raise a ValueError naming the first field where a checkpoint does not fit the policy."""
    defaults = {"stage2_inputs": "token"}  # fields older checkpoints do not store
    for key in ("knob_space", "language_dim", "d_model", "hidden_dim", "sinusoidal_dim", "stage2_inputs"):
        value, want = meta.get(key, defaults.get(key)), expected.get(key, defaults.get(key))
        if value != want:
            raise ValueError(f"checkpoint {path} does not match the policy: {key}={value!r}, expected {want!r}")


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and python generators (all three go into checkpoints)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """The global torch (CPU and CUDA), numpy and python RNG states and those of the named
    generators, as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                        "pos": int(np_state["state"]["pos"])}},
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def set_rng_state(state: dict, generators: Mapping[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np_state["state"]["key"].numpy().astype(np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    random.setstate(_as_tuples(state["python"]))
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise ValueError(f"checkpoint has no state for generator {name!r}; it holds {sorted(state['generators'])}")
        g.set_state(state["generators"][name])


def rank_states_payload(states: list[dict]) -> dict:
    """The checkpoint fields of every rank's {"rng", "env"} state, in rank order: rank 0's where a
    one-rank checkpoint keeps them (`rng`, `env`), the other ranks' in `other_ranks`."""
    return {"rng": states[0]["rng"], "env": states[0]["env"], "other_ranks": list(states[1:]),
            "world_size": len(states)}


def saved_rank_states(ckpt: Mapping[str, Any]) -> list[dict]:
    """Every saved rank's {"rng", "env"} state, in rank order (one for a one-rank run's checkpoint)."""
    return [{"rng": ckpt["rng"], "env": ckpt["env"]}, *ckpt.get("other_ranks", [])]


def _as_tuples(value):
    """random.setstate wants the tuples that getstate gave (a round trip may turn them into lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_finite_weights(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    for name, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what}: weight {name!r} holds NaN or inf; a checkpoint with non-finite weights "
                             f"is never written")


def save_checkpoint(path: str | Path, **payload: Any) -> None:
    """Write atomically (temp file + fsync + rename): a kill or a full disk during the write leaves
    the previous file intact. Refuses non-finite policy weights."""
    path = Path(path)
    check_finite_weights(payload.get("policy", {}), f"checkpoint {path}")
    with atomic_writer(path) as fh:
        torch.save(payload, fh)


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
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses anything that is not a tensor or plain value
        # torch's message advises weights_only=False; keep only the line naming what was refused.
        lines = [line for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        reason = lines[0].strip() if lines else type(err).__name__
        raise ValueError(f"checkpoint {path} is refused: it holds Python objects other than tensors and plain "
                         f"values, which could run code when loaded ({reason})") from err
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"checkpoint {path} cannot be read: {err}") from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a BudgetVLM controller checkpoint")
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
