"""The runners on the MolmoE backend (the fixture's tiny checkpoint, CPU): the GPU script's CPU path
(profile and training as it runs them), then evaluate and bench on its outputs."""
import json

import pytest
import yaml

from helpers import ROOT, load_runner
from molmoe_fixture import FIXTURE, requires_fixture

pytestmark = requires_fixture
SMOKE = ROOT / "configs" / "molmoe_smoke.yaml"


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """runners/bench_molmoe.py on CPU: its profile (the low tier's 8 configurations) and a 2-step run."""
    out = tmp_path_factory.mktemp("molmoe_gpu") / "run"
    report = load_runner("bench_molmoe").main([
        "--model_path", str(FIXTURE), "--output_dir", str(out), "--device", "cpu", "--train_config", str(SMOKE),
        "--num_samples", "1", "--latency_samples", "1", "--warmup", "0", "--tiers", "low", "--threads", "1",
    ])
    return out, report


def test_gpu_script_report(gpu_run):
    out, report = gpu_run
    assert json.loads((out / "molmoe_gpu.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["stages_s"]) == {"profile_s", "train_s", "total_s"}  # the fixture has weights: none built
    assert report["model"]["decoder"] == {"d_model": 32, "blocks": 4, "experts": 8, "top_k": 2}
    assert report["commands"]["profile"][2:6] == ["--backend", "molmoe", "--model_path", str(FIXTURE)]
    assert report["commands"]["train"][-6:-4] == ["--output_dir", str(out / "train")]
    rows = report["profile"]["configs"]
    grid = {("low", k, n) for k in (1, 2) for n in range(1, 5)}
    assert {(r["tier"], r["top_k"], r["num_blocks"]) for r in rows} == grid
    # max_new_tokens 2 (the smoke config's): one decode step after the first token
    assert all(r["latency_samples"] == 1 and r["decode_ms_per_token"] == r["decode_ms"] > 0 for r in rows)
    decode = report["decode_ms_per_token"]
    assert decode["tier"] == "low" and len(decode["rows"]) == 8
    train = report["train"]
    assert train["steps"] == 2 and [c["step"] for c in train["curve"]] == [1, 2]
    assert train["final_eval"]["num_episodes"] == 2 and "uniform_random" in train["final_eval"]
    text = (out / "molmoe_gpu.md").read_text()
    assert "| low/k2/N4 |" in text and "Decode ms per token at the low tier" in text and "| uniform random |" in text
    assert report["machine"]["cpu_model"] in text


def test_profile_is_what_the_env_reads(gpu_run):
    from envs.backends.molmoe import MolmoEBackend

    out, report = gpu_run
    backend = MolmoEBackend(model_path=FIXTURE, results_dir=out / "profile")
    lo, hi = backend.budget_range_ms
    assert 0 < lo < hi and [lo, hi] == report["profile"]["budget_range_ms"]
    assert backend.importance_method == "drop_accuracy" and sorted(backend.importance) == [0, 1, 2, 3]


def test_train_then_evaluate(gpu_run, tmp_path):
    out, _ = gpu_run
    run = out / "train"
    assert yaml.safe_load((run / "config.yaml").read_text())["env"]["backend"] == "molmoe"
    result = load_runner("evaluate").main([
        "--checkpoint", str(run), "--output_dir", str(tmp_path / "eval"), "--num_samples", "2", "--num_budgets", "2",
        "--policies", "controller", "static:low,2,4", "lookup-p95", "--warmup", "0",
    ])
    assert result["meta"]["backend"]["backend"] == "MolmoEBackend"
    rows = {(r["policy"], r["budget_ms"]) for r in result["rows"]}
    assert len(rows) == 6


def test_bench_runs_on_the_backend(gpu_run, tmp_path):
    """runners/bench.py --backend molmoe: meter overhead and latency-vs-knobs on MolmoEBackend episodes."""
    out, _ = gpu_run
    bench_json, md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = load_runner("bench").main([
        "--backend", "molmoe", "--model_path", str(FIXTURE), "--results_dir", str(out / "profile"), "--split", "val",
        "--pairs", "1", "--knob_samples", "1", "--repeats", "1", "--warmup", "0", "--max_new_tokens", "2",
        "--image_size", "640", "480", "--output", str(bench_json), "--markdown", str(md),
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


def test_gpu_script_bad_input_writes_nothing(gpu_run, tmp_path):
    runner = load_runner("bench_molmoe")
    base = ["--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(FileNotFoundError, match=r"--model_path=.*empty.*holds no weights; pass --random_from"):
        runner.main(["--model_path", str(tmp_path / "empty"), *base])
    with pytest.raises(FileNotFoundError, match=r"--random_from=.*expected a MolmoE checkpoint dir"):
        runner.main(["--model_path", str(tmp_path / "empty"), "--random_from", str(tmp_path), *base])
    with pytest.raises(ValueError, match=r"env.backend is 'dummy', expected 'molmoe'"):
        runner.main(["--model_path", str(FIXTURE), "--train_config", str(ROOT / "configs" / "smoke.yaml"), *base])
    with pytest.raises(ValueError, match=r"--latency_samples=9 is invalid; expected <= --num_samples=8"):
        runner.main(["--model_path", str(FIXTURE), "--latency_samples", "9", *base])
    assert not (tmp_path / "out").exists() and not (tmp_path / "empty").exists()
    with pytest.raises(FileExistsError, match=r"already holds \['profile', 'train', 'molmoe_gpu.json'\]"):
        runner.main(["--model_path", str(FIXTURE), "--output_dir", str(gpu_run[0]), "--device", "cpu"])
