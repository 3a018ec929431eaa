"""What the profiler reads and writes: the weights' hash, importance files, samples, and a backend
for a model that has no importance.json yet (JSON is written atomically by envs.files.write_json)."""
from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

from envs.backends.vlm import VLMBackend, load_importance
from envs.backends.vlm.backend import IMPORTANCE_FILE, load_image
from envs.backends.vlm.config import CONFIG_FILE, WEIGHTS_FILE
from envs.data.sample import ImageLoadError, VQASample
from envs.files import write_json  # noqa: F401  (re-exported: profile_configs.py and bench.py write through it)


def weights_sha256(model_path: str | Path) -> str:
    """sha256 of the model dir's model.safetensors (which weights a profile or benchmark measured)."""
    digest = hashlib.sha256()
    with open(Path(model_path) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_importance(path: str | Path, num_layers: int) -> tuple[str, dict[int, float]]:
    """An importance.json anywhere (validated like VLMBackend reads it)."""
    path = Path(path)
    if path.is_dir():
        path = path / IMPORTANCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"importance_file={str(path)!r} does not exist")
    if path.name != IMPORTANCE_FILE:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, IMPORTANCE_FILE).write_text(path.read_text())
            return load_importance(Path(tmp), num_layers, None)
    return load_importance(path.parent, num_layers, None)


@contextmanager
def evaluation_backend(model_path: Path, **kwargs):
    """A VLMBackend for data, prompts and model pieces when no importance.json exists yet.

    VLMBackend requires results_dir/importance.json; this one gets a placeholder (all zeros) in a
    temporary dir. Its `importance` must never decide anything: the batched evaluator takes
    explicit block plans.
    """
    with tempfile.TemporaryDirectory(prefix="budgetvlm-profile-") as tmp:
        cfg = json.loads((Path(model_path) / CONFIG_FILE).read_text())
        layers = int(cfg.get("num_layers", 16))
        Path(tmp, IMPORTANCE_FILE).write_text(
            json.dumps({"method": "placeholder", "scores": {str(i): 0.0 for i in range(layers)}})
        )
        yield VLMBackend(model_path=model_path, results_dir=tmp, budget_range_ms=(1.0, 2.0), **kwargs)


def load_samples(backend: VLMBackend, split: str, count: int) -> tuple[list[VQASample], int]:
    """The first `count` loadable samples of `split` and how many were skipped (unreadable images)."""
    data = backend.dataset(split)
    samples, skipped = [], 0
    for i in range(len(data)):
        if len(samples) == count:
            break
        sample = data[i]
        try:
            load_image(sample)
        except ImageLoadError:
            skipped += 1
            continue
        samples.append(sample)
    return samples, skipped
