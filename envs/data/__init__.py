"""Datasets (SynthVQA, official VQA formats) and their answer metrics."""
from envs.data.sample import ImageLoadError, VQASample

__all__ = ["ImageLoadError", "VQASample"]
