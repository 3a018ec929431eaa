"""Shared test helpers: runner import, the one tiny-model builder."""
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_LAYERS = 6  # PRESETS["test"]


def load_runner(name):
    """Import runners/<name>.py as a module (runners/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"budgetvlm_runner_{name}", ROOT / "runners" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(words=None, seed=0):
    """(model, tokenizer): random weights of the real classes at the seconds-fast "test" preset.
    words: the tokenizer's vocabulary (default SynthVQA's, so its questions tokenize)."""
    from envs.backends.vlm import VLMConfig, WordTokenizer, build_model
    from envs.backends.vlm.config import PRESETS
    from envs.data import synthvqa

    tok = WordTokenizer.build(synthvqa.vocabulary() if words is None else words)
    cfg = VLMConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, **PRESETS["test"])
    return build_model(cfg, seed=seed), tok


def make_tiny_model_dir(path, words=None, seed=0, results=True, budget_range_ms=(5.0, 50.0), scores=None):
    """A model dir VLMBackend loads. results: also importance.json (`scores` {block: score}, default
    favouring late blocks, so select_blocks skips middle ones) and, unless budget_range_ms is None,
    a profile.json holding only budget_range_ms."""
    path = Path(path)
    model, tok = tiny_model(words, seed)
    model.save(path, tok, dtype=torch.float32)
    if results:
        if scores is None:
            scores = {i: float(i % 3) for i in range(model.cfg.num_layers)}
        scores = {str(b): float(s) for b, s in scores.items()}
        (path / "importance.json").write_text(json.dumps({"method": "test", "scores": scores}))
        if budget_range_ms is not None:
            (path / "profile.json").write_text(json.dumps({"budget_range_ms": list(budget_range_ms)}))
    return path
