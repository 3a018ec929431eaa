"""Bad inputs that docs/RELIABILITY.md lists and no other test file tries: each gets an error that
names the field, the value and what was expected, and nothing already written is lost."""
import io
import math
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from agents.checkpoint import build_actor, load_checkpoint, load_stage1_weights, save_checkpoint
from envs import make_env, reset_to
from envs.backends.vlm import VLMBackend
from envs.backends.vlm.backend import load_image
from envs.data import ImageLoadError
from envs.data.sample import VQASample
from helpers import make_tiny_model_dir
from train_runs import tiny_config, train_main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def backend(model_dir):
    return VLMBackend(model_path=model_dir, max_new_tokens=2)


def _sample(question="what color is the big shape?", image=None):
    image = image if image is not None else Image.new("RGB", (48, 48), (200, 30, 30))
    return VQASample(question=question, answers=["red"], question_id=5, dataset="synthvqa",
                     image_loader=lambda: image)


def _variant(model_dir, tmp_path, edit):
    d = tmp_path / "variant"
    shutil.copytree(model_dir, d)
    edit(d)
    return d


# ------------------------------------------------------------------ requests
@pytest.mark.parametrize("budget", [1e7, 1e30])
def test_absurdly_large_budget_is_rejected(budget):
    env = make_env("dummy", batch_size=1, group_size=1)
    with pytest.raises(ValueError, match=r"budget_ms=(10000000.0|1.0000000150474662e\+30) is invalid; expected a finite latency budget > 0 ms "
                                         r"and <= 1e\+06 ms"):
        env.reset(reset_to(1, budget_ms=[budget]))


def test_question_of_unknown_words_only_is_rejected(backend):
    with pytest.raises(ValueError, match=r"synthvqa question_id=5: question 'xyzzy plugh' has no word the model's "
                                         r"tokenizer knows \(\d+ words\)"):
        backend.language_feature(_sample("xyzzy plugh"))
    backend.language_feature(_sample("what xyzzy is the shape?"))  # one known word is enough


@pytest.mark.parametrize("size", [(0, 0), (0, 40), (40, 0)])
def test_zero_size_image_is_an_unreadable_image(backend, size):
    with pytest.raises(ImageLoadError, match=rf"question_id=5: image is {size[0]}x{size[1]} pixels; expected at "
                                             rf"least 1x1"):
        backend.start_episode(_sample(image=Image.new("RGB", size)), "low", torch.zeros(backend.d_model))


def test_truncated_image_file_is_an_unreadable_image(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    def open_image():
        with Image.open(path) as im:
            return im.convert("RGB")

    sample = VQASample("what color?", ["green"], 9, "synthvqa", image_loader=open_image)
    with pytest.raises(ImageLoadError, match=r"synthvqa question_id=9: image cannot be decoded: OSError"):
        load_image(sample)


def test_very_wide_image_is_cropped_like_any_other(backend):
    episode = backend.start_episode(_sample(image=Image.new("RGB", (20000, 20), (0, 0, 200))), "high",
                                    torch.zeros(backend.d_model))
    backend.run_to(episode, 2)
    result = backend.finish(episode, 8, 6)
    assert all(math.isfinite(v) and v >= 0 for v in result.timings_ms.values())


def test_dataset_with_no_readable_image_stops_clearly(monkeypatch):
    env = make_env("dummy", batch_size=1, group_size=1, num_samples=8)

    def unreadable(sample, tier, token):
        raise ImageLoadError(f"image of sample {sample.index} cannot be decoded")

    monkeypatch.setattr(env.backend, "start_episode", unreadable)
    td = env.reset()
    td["action", "tier"] = torch.zeros(1, 1, dtype=torch.long)
    for head in ("insertion", "top_k", "num_blocks"):
        td["action", head] = torch.zeros(1, 1, dtype=torch.long)
    td["action", "budget_token"] = torch.zeros(1, env.backend.d_model)
    td["action", "controller_ms"] = torch.zeros(1, 1)
    with pytest.raises(RuntimeError, match=r"32 samples in a row had unreadable images in split 'train'"):
        env.step(td)
    assert env.skipped_samples == 32


# ------------------------------------------------------------------ model and results files
def test_mis_shaped_weights_are_named(model_dir, tmp_path):
    def grow_lm_head(d):
        weights = load_file(d / "model.safetensors")
        w = weights["decoder.lm_head.weight"]
        weights["decoder.lm_head.weight"] = torch.zeros(w.shape[0] + 1, w.shape[1])
        save_file(weights, d / "model.safetensors")

    with pytest.raises(ValueError, match=r"model.safetensors: decoder.lm_head.weight has shape \((\d+), 32\), "
                                         r"config.json implies \((\d+), 32\)"):
        VLMBackend(model_path=_variant(model_dir, tmp_path, grow_lm_head))


def test_importance_scoring_a_block_twice_is_rejected(model_dir, tmp_path):
    scores = ", ".join(f'"{i}": 1.0' for i in range(6))
    text = f'{{"method": "test", "scores": {{{scores}, "3": 2.0}}}}'
    d = _variant(model_dir, tmp_path, lambda d: (d / "importance.json").write_text(text))
    with pytest.raises(ValueError, match=r"importance.json: key\(s\) \['3'\] appear more than once; expected each "
                                         r"block scored once"):
        VLMBackend(model_path=d)


@pytest.mark.parametrize("text, message", [
    ("{not json", r"latency profile file .*profile.json is not valid JSON"),
    ("[5, 50]", r"latency profile file .*profile.json: expected a JSON object, got list"),
    ('{"configs": []}', r"profile.json: field 'budget_range_ms' is missing"),
    ('{"budget_range_ms": "fast"}', r"profile.json: budget_range_ms='fast': expected \[lo, hi\] in ms"),
    ('{"budget_range_ms": [NaN, 5]}', r"profile.json: budget_range_ms=\[nan, 5\]: expected 0 < lo < hi < inf"),
    ('{"budget_range_ms": [50, 5]}', r"profile.json: budget_range_ms=\[50, 5\]: expected 0 < lo < hi < inf"),
])
def test_malformed_profile_is_named(model_dir, tmp_path, text, message):
    d = _variant(model_dir, tmp_path, lambda d: (d / "profile.json").write_text(text))
    with pytest.raises(ValueError, match=message):
        VLMBackend(model_path=d)


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    train_main("--config", tiny_config(tmp, train={"num_epochs": 1}), "--output_dir", tmp / "run")
    return tmp / "run"


@pytest.mark.parametrize("field, value, message", [
    ("knob_space", {"tiers": ["low", "high"]}, r"knob_space=\{'tiers': \['low', 'high'\]"),
    ("d_model", 32, r"d_model=32, expected 16"),
    ("language_dim", 4, r"language_dim=4, expected 8"),
])
def test_checkpoint_of_another_knob_space_or_model_is_refused(trained, tmp_path, field, value, message):
    ckpt = load_checkpoint(trained / "checkpoints" / "latest.pt")
    meta = dict(ckpt["policy_meta"])
    meta[field] = {**meta[field], **value} if isinstance(value, dict) else value
    other = tmp_path / "other.pt"
    save_checkpoint(other, **{**{k: v for k, v in ckpt.items() if k != "path"}, "policy_meta": meta})
    with pytest.raises(ValueError, match=rf"checkpoint {other} does not match the policy: {message}"):
        load_stage1_weights(build_actor(ckpt["policy_meta"]), other, ckpt["policy_meta"])


def test_bad_resume_checkpoint_loses_nothing(trained, tmp_path):
    before = {p.relative_to(trained): p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    cut = tmp_path / "cut.pt"
    cut.write_bytes((trained / "checkpoints" / "latest.pt").read_bytes()[:1000])
    with pytest.raises(SystemExit, match=rf"checkpoint {cut} cannot be read"):
        train_main("--output_dir", trained, "--resume", cut)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(SystemExit, match="holds a list, not a BudgetVLM controller checkpoint"):
        train_main("--output_dir", trained, "--resume", tmp_path / "list.pt")
    after = {p.relative_to(trained): p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    assert after == before
