"""Backends the environment can drive (see envs.backends.base for the protocol)."""
from envs.backends.base import BACKEND_PHASES, SPLITS, Backend, EpisodeResult
