"""The MolmoE reference fixture (../shared/fixtures/molmoe-reference beside the repo) for tests."""
import json
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "molmoe-reference"
requires_fixture = pytest.mark.skipif(
    not (FIXTURE / "cases.json").is_file(),
    reason=f"MolmoE reference fixture not found at {FIXTURE} (CI lays shared/ beside the clone)",
)
CHECKPOINT_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "generation_config.json",
                    "model.safetensors")


@lru_cache(maxsize=1)
def cases() -> list[dict]:
    # No cases without the fixture: parametrize calls this at collection, before requires_fixture skips.
    if not (FIXTURE / "cases.json").is_file():
        return []
    return json.loads((FIXTURE / "cases.json").read_text())["cases"]


@lru_cache(maxsize=1)
def tensors() -> dict:
    from safetensors.torch import load_file

    return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(FIXTURE / "cases.safetensors")).items()}


def image(case: dict) -> Image.Image:
    return Image.open(FIXTURE / case["image"]).convert("RGB")


def image_tensor(case: dict) -> torch.Tensor:
    return torch.from_numpy(np.array(image(case))).permute(2, 0, 1).contiguous()


def copy_checkpoint(dest: Path, skip: tuple = ()) -> Path:
    """A writable copy of the fixture's checkpoint files (the fixture itself is read-only)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if name not in skip:
            shutil.copy(FIXTURE / name, dest / name)
    return dest


def write_results(dest: Path, num_layers: int = 4, scores=None) -> Path:
    """importance.json (favouring the last block, so select_blocks skips a middle one) and profile.json."""
    dest.mkdir(parents=True, exist_ok=True)
    scores = scores or {str(i): float(i == num_layers - 1) + 0.1 * (i == 1) for i in range(num_layers)}
    (dest / "importance.json").write_text(json.dumps({"method": "test", "scores": scores}))
    (dest / "profile.json").write_text(json.dumps({"budget_range_ms": [5.0, 500.0]}))
    return dest
