"""Shared test helpers."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_runner(name):
    """Import runners/<name>.py as a module (runners/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"budgetvlm_runner_{name}", ROOT / "runners" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
