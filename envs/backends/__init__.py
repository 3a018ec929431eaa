"""Backends the environment can drive (see envs.backends.base for the protocol)."""
from __future__ import annotations

import inspect

from envs.backends.base import BACKEND_PHASES, SPLITS, Backend, EpisodeResult


def backend_class(name: str):
    """The class of the named backend."""
    # Imported lazily: the VLM backend pulls in transformers, which the dummy backend never needs.
    if name == "dummy":
        from envs.backends.dummy import DummyBackend

        return DummyBackend
    if name == "vlm":
        from envs.backends.vlm import VLMBackend

        return VLMBackend
    if name == "molmoe":
        from envs.backends.molmoe import MolmoEBackend

        return MolmoEBackend
    raise ValueError(f"backend={name!r} is not known; expected one of {BACKEND_NAMES}")


BACKEND_NAMES = ("dummy", "vlm", "molmoe")


def backend_parameters(name: str) -> set[str]:
    """Keyword arguments the named backend accepts."""
    return set(inspect.signature(backend_class(name)).parameters)


def make_backend(name: str, **kwargs) -> Backend:
    """Build a backend by name; unknown keyword arguments are an error naming them."""
    cls = backend_class(name)
    unknown = set(kwargs) - backend_parameters(name)
    if unknown:
        raise ValueError(
            f"backend {name!r} got unknown option(s) {sorted(unknown)}; expected a subset of "
            f"{sorted(backend_parameters(name))}"
        )
    return cls(**kwargs)


__all__ = ["BACKEND_NAMES", "BACKEND_PHASES", "SPLITS", "Backend", "EpisodeResult", "backend_class", "make_backend"]
