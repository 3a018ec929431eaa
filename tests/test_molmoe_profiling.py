"""Profiling on the MolmoE backend (the fixture's tiny checkpoint, CPU): the batched evaluator,
importance and runners/profile_configs.py --backend molmoe."""

import pytest
import torch

from helpers import load_runner
from molmoe_fixture import FIXTURE, copy_checkpoint, requires_fixture, write_results

pytestmark = requires_fixture
IMAGE_SIZE = (640, 480)  # every SynthVQA scene resized alike: one crop grid per tier, so rows batch


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from envs.backends.molmoe import MolmoEBackend

    results = write_results(tmp_path_factory.mktemp("molmoe_results"))
    return MolmoEBackend(model_path=FIXTURE, results_dir=results, num_samples={"val": 6}, max_new_tokens=3,
                         image_size=IMAGE_SIZE)


def test_batched_evaluator_generates_what_episodes_generate(backend):
    """Batched rows (prefixes from MolmoEBackend.prefill_prefixes, first token before the budget
    position) must produce the ids of the batch-1 episodes."""
    from envs.profiling import BatchedEvaluator, StaticConfig, load_samples, run_episode

    samples, _ = load_samples(backend, "val", 6)
    evaluator = BatchedEvaluator(backend, samples, batch_size=4)
    assert any(len(batch) > 1 for batch in evaluator.batches("low"))  # real batching happens
    ks = backend.knob_space
    for config in (StaticConfig("low", 1, 3), StaticConfig("medium", 2, 4)):
        plan = config.plan(backend.importance, ks, backend.cfg.top_k)
        batched = evaluator.generate(config.tier, plan)
        for i, sample in enumerate(samples):
            result = run_episode(backend, sample, config, torch.zeros(backend.d_model))
            assert result.extras["blocks"] == [b for b, _ in plan]
            assert result.extras["generated_ids"] == batched[i], (config, i)


def test_importance_of_both_methods_on_molmoe(backend):
    from envs.profiling import BatchedEvaluator, compute_importance, load_samples

    samples, _ = load_samples(backend, "val", 2)
    records = compute_importance(BatchedEvaluator(backend, samples), backend.knob_space, backend.cfg.top_k)
    influence = records["block_influence"]["scores"]
    assert sorted(influence) == ["0", "1", "2", "3"]
    assert all(0 < s < 2 for s in influence.values())  # random weights still change the residual stream
    assert records["drop_accuracy"]["plan"] == [[b, 2] for b in range(4)]


def test_profile_configs_on_molmoe_writes_what_the_backend_reads(tmp_path):
    from envs.backends.molmoe import MolmoEBackend

    out = tmp_path / "profile"
    profile = load_runner("profile_configs").main([
        "--backend", "molmoe", "--model_path", str(FIXTURE), "--output_dir", str(out), "--split", "val",
        "--num_samples", "2", "--latency_samples", "1", "--importance_samples", "2", "--tiers", "low", "high",
        "--top_k", "1", "2", "--num_blocks", "2", "4", "--warmup", "0", "--max_new_tokens", "2",
        "--image_size", *map(str, IMAGE_SIZE),
    ])
    rows = profile["configs"]
    assert {(r["tier"], r["top_k"], r["num_blocks"]) for r in rows} == {
        (t, k, n) for t in ("low", "high") for k in (1, 2) for n in (2, 4)}
    # a 640x480 image at the low tier's budget of 2 grid crops: grid 1x2 + the global crop; the high
    # tier's many more crops keep the budget range [1.1 x fastest, slowest] non-empty under load (with
    # the low tier alone, 1 timed sample per config left it empty once in a loaded full-suite run)
    assert all(r["crops_mean"] == 3 for r in rows if r["tier"] == "low")
    assert all(r["crops_mean"] > 3 and r["latency_samples"] == 1 for r in rows if r["tier"] == "high")
    assert all(r["vision_tokens_mean"] > 0 and r["decode_ms_per_token"] > 0 for r in rows)
    assert all(len(r["blocks"]) == r["num_blocks"] and r["blocks"][0] == 0 for r in rows)
    meta = profile["meta"]
    assert meta["backend"] == "molmoe" and meta["image_size"] == list(IMAGE_SIZE)
    assert meta["latency_method"].startswith("batch-1 MolmoEBackend episodes")
    assert {p.name for p in out.glob("importance*.json")} == {"importance.json", "importance_block_influence.json"}
    backend = MolmoEBackend(model_path=FIXTURE, results_dir=out, image_size=IMAGE_SIZE)
    assert backend.importance_method == "drop_accuracy"
    assert backend.budget_range_ms == tuple(profile["budget_range_ms"])


def test_profile_configs_molmoe_bad_input_names_the_flag(tmp_path):
    runner = load_runner("profile_configs")
    base = ["--output_dir", str(tmp_path / "out"), "--num_samples", "1", "--latency_samples", "1"]
    broken = copy_checkpoint(tmp_path / "no_weights", skip=("model.safetensors",))
    with pytest.raises(FileNotFoundError, match=r"--model_path=.*no_weights.*no weights: expected model\.safetensors"):
        runner.main(["--backend", "molmoe", "--model_path", str(broken), *base])
    with pytest.raises(ValueError, match=r"--model_path=.*model_type=.*expected 'molmo'"):
        runner.main(["--backend", "molmoe", "--model_path", str(_embedded_model_dir(tmp_path)), *base])
    with pytest.raises(ValueError, match="--image_size is an option of --backend molmoe, not of --backend vlm"):
        runner.main(["--model_path", str(_embedded_model_dir(tmp_path)), "--image_size", "64", "64", *base])
    with pytest.raises(ValueError, match=r"--dtype='int8' is not supported by --backend molmoe"):
        runner.main(["--backend", "molmoe", "--model_path", str(FIXTURE), "--dtype", "int8", *base])
    with pytest.raises(ValueError, match=r"--backend='dummy' is not known"):
        runner.main(["--backend", "dummy", "--model_path", str(FIXTURE), *base])
    assert not (tmp_path / "out").exists()


def _embedded_model_dir(tmp_path):
    from helpers import make_tiny_model_dir

    path = tmp_path / "embedded"
    return path if path.is_dir() else make_tiny_model_dir(path)


def test_weights_hash_covers_every_shard(tmp_path):
    """A sharded checkpoint's hash (the profile's weights_sha256) changes with any shard."""
    from envs.backends.molmoe import MolmoEConfig, write_random_checkpoint
    from envs.profiling import weight_paths, weights_sha256

    ckpt = copy_checkpoint(tmp_path / "sharded", skip=("model.safetensors",))
    write_random_checkpoint(MolmoEConfig.load(ckpt), ckpt, shard_bytes=2 << 20)
    paths = weight_paths(ckpt)
    assert paths[0].name == "model.safetensors.index.json" and len(paths) > 2
    before = weights_sha256(ckpt)
    with open(paths[-1], "r+b") as f:  # one byte of the last shard
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert weights_sha256(ckpt) != before
