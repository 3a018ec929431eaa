"""Argument checks shared by the profiler and the benchmarks (splits: envs.backends.base.check_split)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from envs.backends.vlm.config import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE

MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
PROFILE_BACKENDS = ("vlm", "molmoe")  # the backends the profiler and the benchmarks run on


def check_model_dir(path: str | Path, field: str = "model_path", backend: str = "vlm") -> Path:
    """`path` must be a model dir of `backend`: for "vlm" config.json, model.safetensors and
    tokenizer.json; for "molmoe" a published MolmoE checkpoint (its config, preprocessor and
    tokenizer files, and model.safetensors or the index and every shard it names)."""
    path = Path(path)
    if backend not in PROFILE_BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; expected one of {PROFILE_BACKENDS}")
    if backend == "molmoe":
        return _check_molmoe_dir(path, field)
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


def _check_molmoe_dir(path: Path, field: str) -> Path:
    from envs.backends.molmoe.config import TOKENIZER_FILE as MOLMOE_TOKENIZER, MolmoEConfig
    from envs.backends.molmoe.weights import weight_files

    if not path.is_dir():
        raise FileNotFoundError(f"{field}={str(path)!r}: model directory does not exist; expected a MolmoE "
                                f"checkpoint directory as published")
    try:
        MolmoEConfig.load(path)
        if not (path / MOLMOE_TOKENIZER).is_file():
            raise FileNotFoundError(f"tokenizer file {path / MOLMOE_TOKENIZER} does not exist")
        weight_files(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{field}={str(path)!r}: {err}") from None
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
