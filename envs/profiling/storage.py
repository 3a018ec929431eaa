"""What the profiler reads and writes: the weights' hash, importance files, samples, and a backend
(embedded or MolmoE) for a model that has no importance.json yet (JSON is written atomically by
envs.files.write_json)."""
from __future__ import annotations

import hashlib
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from envs.backends.molmoe.weights import INDEX_FILE as WEIGHTS_INDEX_FILE
from envs.backends.vlm import ExecutorBackend, VLMConfig, load_importance
from envs.backends.vlm.backend import IMPORTANCE_FILE, load_image
from envs.backends.vlm.config import WEIGHTS_FILE
from envs.data.sample import ImageLoadError, VQASample
from envs.files import write_json  # noqa: F401  (re-exported: profile_configs.py and bench.py write through it)


def weight_paths(model_path: str | Path) -> list[Path]:
    """The files holding a model dir's weights: model.safetensors, or a sharded checkpoint's index
    and the shards it names (as MolmoE publishes them)."""
    model_path = Path(model_path)
    index = model_path / WEIGHTS_INDEX_FILE
    if index.is_file():
        shards = sorted({model_path / name for name in json.loads(index.read_text())["weight_map"].values()})
        return [index, *shards]
    return [model_path / WEIGHTS_FILE]


def weights_sha256(model_path: str | Path) -> str:
    """Which weights a profile or benchmark measured: the sha256 of model.safetensors, or for a
    sharded checkpoint the sha256 of its index's and shards' own sha256s (hashed in parallel:
    MolmoE-1B's 14 GB take a single core about 20 s)."""
    paths = weight_paths(model_path)
    if len(paths) == 1:
        return _file_sha256(paths[0])
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:  # hashlib releases the GIL
        digests = list(pool.map(_file_sha256, paths))
    return hashlib.sha256("".join(f"{p.name} {d}\n" for p, d in zip(paths, digests)).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_importance(path: str | Path, num_layers: int) -> tuple[str, dict[int, float]]:
    """An importance.json anywhere (validated like the backends read it)."""
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
def evaluation_backend(model_path: Path, backend: str = "vlm", **kwargs):
    """A backend ("vlm" or "molmoe") for data, prompts and model pieces when no importance.json exists yet.

    The backends require results_dir/importance.json; this one gets a placeholder (all zeros) in a
    temporary dir. Its `importance` must never decide anything (the batched evaluator takes
    explicit block plans) until the real files are read (`read_results`).
    """
    from envs.backends import make_backend

    with tempfile.TemporaryDirectory(prefix="budgetvlm-profile-") as tmp:
        layers = model_num_layers(model_path, backend)
        Path(tmp, IMPORTANCE_FILE).write_text(
            json.dumps({"method": "placeholder", "scores": {str(i): 0.0 for i in range(layers)}})
        )
        yield make_backend(backend, model_path=model_path, results_dir=tmp, budget_range_ms=(1.0, 2.0), **kwargs)


def model_num_layers(model_path: Path, backend: str = "vlm") -> int:
    """Decoder blocks of a model dir, from its config alone (no weights read)."""
    if backend == "molmoe":
        from envs.backends.molmoe import MolmoEConfig

        return MolmoEConfig.load(model_path).num_layers
    return VLMConfig.load(model_path).num_layers


def load_samples(backend: ExecutorBackend, split: str, count: int) -> tuple[list[VQASample], int]:
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
