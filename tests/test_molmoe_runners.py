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


def test_bench_measurements_accept_the_backend(results_dir):
    """envs.profiling's meter-overhead and knob-latency benchmarks (runners/bench.py) on MolmoEBackend."""
    from envs.backends.molmoe import MolmoEBackend
    from envs.profiling import StaticConfig, knob_latency, meter_overhead

    backend = MolmoEBackend(model_path=FIXTURE, results_dir=results_dir, num_samples=1, max_new_tokens=2)
    samples = list(backend.dataset("val"))
    overhead = meter_overhead(backend, samples, StaticConfig("low", 2, 4), pairs=1, warmup=0)
    # hooked calls: the vision backbone once, then every run block and the LM head per generated token
    assert overhead["hooked_calls_per_episode"] == 1 + 2 * (4 + 1)
    latency = knob_latency(backend, samples, {"cheap": StaticConfig("low", 1, 1), "full": StaticConfig("high", 2, 4)},
                           warmup=0)
    assert set(latency["configs"]) == {"cheap", "full"} and latency["slowest_over_fastest"] >= 1
