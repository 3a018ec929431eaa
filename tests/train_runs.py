"""Helpers of the tests that run runners/train.py: a tiny dummy-backend config, a subprocess run,
and the rows of a run's metrics.jsonl."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import load_runner

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "runners" / "train.py"

# Seconds of work on 2 CPU cores; the measured controller time is replaced by a fixed value so
# that two runs of one seed are bit-identical.
TINY = {
    "env": {"backend": "dummy",
            "backend_options": {"num_samples": {"train": 64, "val": 16, "test": 16}, "d_model": 16,
                                "language_dim": 8}},
    "policy": {"hidden_dim": 16, "sinusoidal_dim": 16, "fixed_controller_ms": 0.05},
    "loss": {"num_iterations": 2},
    "optim": {"lr": 1e-3},
    "train": {"batch_size": 4, "group_size": 4, "num_epochs": 3, "steps_per_epoch": 3, "seed": 3, "num_threads": 1},
    "eval": {"val_samples": 16, "test_samples": 16, "batch_size": 16, "sweep_budgets": 0},
    "logging": {"log_every": 1, "histograms": False},
}


def tiny_config(tmp_path: Path, name: str = "tiny.yaml", **sections) -> Path:
    """TINY with sections updated (e.g. train={"num_epochs": 1}), written to tmp_path/name."""
    cfg = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_command(*args) -> list[str]:
    return [sys.executable, str(TRAIN), *map(str, args)]


def train_env() -> dict:
    # The worktree's packages, whatever is installed in the venv.
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run_train(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(*args), capture_output=True, text=True, cwd=REPO, env=train_env(),
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_main(*args) -> dict:
    """runners/train.py's main in this process (no interpreter start-up: seconds, not tens)."""
    if "module" not in _TRAIN:
        _TRAIN["module"] = load_runner("train")
    return _TRAIN["module"].main([str(a) for a in args])


_TRAIN: dict = {}


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows without their wall-clock time."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]
