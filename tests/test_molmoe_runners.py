"""The runners on the MolmoE backend (the fixture's tiny checkpoint, CPU): profile, train, evaluate, bench."""
import json

import pytest
import yaml

from helpers import ROOT, load_runner
from molmoe_fixture import FIXTURE, requires_fixture

pytestmark = requires_fixture


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("molmoe_profile")
    load_runner("profile_configs").main([
        "--backend", "molmoe", "--model_path", str(FIXTURE), "--output_dir", str(out), "--tiers", "low",
        "--split", "val", "--num_samples", "1", "--latency_samples", "1", "--importance_samples", "1",
        "--warmup", "0", "--max_new_tokens", "1", "--image_size", "640", "480",
    ])
    return out


def test_profile_covers_the_grid_the_env_reads(results_dir):
    profile = json.loads((results_dir / "profile.json").read_text())
    assert {(c["tier"], c["top_k"], c["num_blocks"]) for c in profile["configs"]} == {
        ("low", k, n) for k in (1, 2) for n in (1, 2, 3, 4)}
    lo, hi = profile["budget_range_ms"]
    assert 0 < lo < hi


def test_train_then_evaluate(results_dir, tmp_path):
    run = tmp_path / "run"
    load_runner("train").main([
        "--config", str(ROOT / "configs" / "molmoe_smoke.yaml"), "--backend", "molmoe", "--model_path", str(FIXTURE),
        "--results_dir", str(results_dir), "--output_dir", str(run),
    ])
    final = json.loads((run / "final_eval.json").read_text())
    assert final["num_episodes"] == 2 and final["latency_mean_ms"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["env"]["backend"] == "molmoe"
    out = load_runner("evaluate").main([
        "--checkpoint", str(run), "--output_dir", str(tmp_path / "eval"), "--num_samples", "2", "--num_budgets", "2",
        "--policies", "controller", "static:low,2,4", "lookup-p95", "--warmup", "0",
    ])
    assert out["meta"]["backend"]["backend"] == "MolmoEBackend"
    rows = {(r["policy"], r["budget_ms"]) for r in out["rows"]}
    assert len(rows) == 6


def test_bench_runs_on_the_backend(results_dir, tmp_path):
    """runners/bench.py --backend molmoe: meter overhead and latency-vs-knobs on MolmoEBackend episodes."""
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = load_runner("bench").main([
        "--backend", "molmoe", "--model_path", str(FIXTURE), "--results_dir", str(results_dir), "--split", "val",
        "--pairs", "1", "--knob_samples", "1", "--repeats", "1", "--warmup", "0", "--max_new_tokens", "2",
        "--image_size", "640", "480", "--output", str(out), "--markdown", str(md),
    ])
    assert result["backend"]["backend"] == "MolmoEBackend" and result["backend"]["image_size"] == [640, 480]
    assert result["model"] == f"given MolmoE checkpoint {FIXTURE}" and "molmoe_shape" not in result
    overhead = result["meter_overhead"]["full"]
    # hooked calls: the vision backbone once, then every run block and the LM head per generated token
    assert overhead["config"] == {"tier": "high", "top_k": 2, "num_blocks": 4, "insertion": 1}
    assert overhead["hooked_calls_per_episode"] == 1 + 2 * (4 + 1)
    knobs = result["knob_latency"]["configs"]
    assert list(knobs)[0] == "full (high, k=2, N=4)" and list(knobs)[-1] == "cheapest (low, k=1, N=1)"
    assert all(c["median_ms"] > 0 and c["n"] == 1 for c in knobs.values())
    assert "episode_knob_steps" in result["checks"] and "embedded_knob_steps" not in result["checks"]
    assert "given MolmoE checkpoint" in md.read_text()


def test_bench_molmoe_bad_input_names_the_flag(tmp_path):
    bench = load_runner("bench")
    out = ["--output", str(tmp_path / "b.json")]
    with pytest.raises(ValueError, match="--backend molmoe needs --model_path"):
        bench.main(["--backend", "molmoe", *out])
    with pytest.raises(FileNotFoundError, match=r"--model_path=.*: model directory does not exist; expected a MolmoE"):
        bench.main(["--backend", "molmoe", "--model_path", str(tmp_path / "none"), *out])
    with pytest.raises(ValueError, match="--image_size is an option of --backend molmoe"):
        bench.main(["--image_size", "64", "64", *out])
    with pytest.raises(ValueError, match=r"--dtype='float16' is not supported by --backend vlm"):
        bench.main(["--dtype", "float16", *out])
    assert not (tmp_path / "b.json").exists()
