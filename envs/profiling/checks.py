"""Argument checks shared by the profiler and the benchmarks (splits: envs.backends.base.check_split)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from envs.backends.vlm.config import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)


def check_model_dir(path: str | Path, field: str = "model_path") -> Path:
    """`path` must be a dir holding config.json, model.safetensors and tokenizer.json."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{field}={str(path)!r}: model directory does not exist; expected a dir with {', '.join(MODEL_FILES)}"
        )
    for name in MODEL_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{field}={str(path)!r}: model file {name} is missing ({path / name}); "
                f"expected {', '.join(MODEL_FILES)}"
            )
    return path


def check_positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}={value!r} is invalid; expected a positive int (> 0)")
    return value


def check_subset(field: str, values: Sequence | None, allowed: Sequence) -> tuple:
    """A user-chosen subset of a knob's values (None = all), in the knob space's order."""
    if values is None:
        return tuple(allowed)
    values = list(values)
    if not values:
        raise ValueError(f"{field}=[] is empty; expected a non-empty subset of {list(allowed)}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{field}={values}: value(s) {unknown} not in the knob space; expected a subset of {list(allowed)}")
    return tuple(v for v in allowed if v in values)
