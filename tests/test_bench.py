"""runners/bench.py on a tiny random-weight model: output schema only (no timing is asserted)."""
import json
import math

import pytest
import torch


from helpers import load_runner, make_tiny_model_dir

LAYERS = 6


bench = load_runner("bench")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # bench sets --threads itself


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_vlm"))


FAST = ["--pairs", "3", "--knob_samples", "2", "--repeats", "1", "--warmup", "1", "--controller_rounds", "0"]


def test_bench_output_schema(model_dir, tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = bench.main(["--model_path", str(model_dir), *FAST, "--controller_rounds", "2", "--output", str(out),
                         "--markdown", str(md)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    controller = result["controller"]
    for name in ("eager", "compiled", "native"):
        assert controller[name]["n"] == 2 and 0 < controller[name]["median_ms"] <= controller[name]["p95_ms"]
    for name in ("compiled", "native"):
        assert controller[f"{name}_over_eager"] == pytest.approx(
            controller[name]["median_ms"] / controller["eager"]["median_ms"])
    assert result["model"].startswith("given checkpoint")
    assert {"cpu_model", "cpu_cores", "torch_version"} <= set(result["machine"])
    assert set(result["meter_overhead"]) == {"full", "cheapest"}
    for o in result["meter_overhead"].values():
        assert o["pairs"] == 3
        for key in ("median_on_ms", "median_off_ms", "ratio_on_off", "overhead_pct", "median_metered_ms"):
            assert math.isfinite(o[key])
        assert o["median_on_ms"] > 0 and o["median_off_ms"] > 0 and o["hooked_calls_per_episode"] > 0
    knobs = result["knob_latency"]
    names = list(knobs["configs"])
    assert names[0].startswith("full (high, k=8, N=6)") and names[-1].startswith("cheapest (low, k=4, N=2)")
    assert {"tier medium", "tier low", "top-k 4", "blocks 2"} <= set(names)
    for c in knobs["configs"].values():
        assert c["n"] == 2 and c["median_ms"] > 0 and c["iqr_ms"] >= 0 and c["std_ms"] >= 0
    medians = {name: c["median_ms"] for name, c in knobs["configs"].items()}
    assert knobs["slowest"] == max(medians, key=medians.get) and knobs["fastest"] == min(medians, key=medians.get)
    assert knobs["slowest_over_fastest"] == pytest.approx(max(medians.values()) / min(medians.values()))
    text = md.read_text()
    assert "Meter overhead" in text and "Slowest / fastest median" in text and result["machine"]["cpu_model"] in text
    assert "| compiled | 2 |" in text and "| native | 2 |" in text and "median / eager" in text
    assert result["device"] == "cpu" and "molmoe_shape" not in result  # the MolmoE shape defaults to CUDA runs
    assert result["backend"]["expert_kernel"] == "grouped_mm" and result["backend"]["executor"]["decode"] == "eager"
    assert result["checks"]["meter_overhead_pct"]["target"] == "<= 2" and "Target checks" in text
    assert "episode_knob_steps_per_request" not in result["checks"]  # one repeat: no request seen twice


def test_per_request_steps_separate_request_lengths_from_noise():
    from envs.profiling import paired_knob_steps

    # three requests of very different lengths, each 1 ms faster after the step, +-0.1 ms noise
    slow = [[10.0, 10.1, 9.9], [20.0, 20.1, 19.9], [30.0, 30.1, 29.9]]
    fast = [[v - 1.0 for v in r] for r in slow]
    rows = {"a": {"per_request_ms": slow}, "b": {"per_request_ms": fast}}
    (step,) = paired_knob_steps(rows, [("a", "b")])
    assert step["drop_ms"] == pytest.approx(1.0) and step["iqr_ms"] == pytest.approx(0.1) and step["met"]
    assert not bench.knob_steps({"a": {"median_ms": 20.0, "iqr_ms": 10.0}, "b": {"median_ms": 19.0, "iqr_ms": 10.0}},
                                [("a", "b")])[0]["met"]  # over all episodes the lengths hide the step
    with pytest.raises(ValueError, match="needs >= 2 repeats"):
        paired_knob_steps({"a": {"per_request_ms": [[1.0]]}, "b": {"per_request_ms": [[0.5]]}}, [("a", "b")])


def test_molmoe_shape_section_schema(tmp_path):
    """The MolmoE-shape section on its test shape (the code the CUDA run uses, on CPU, seconds)."""
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    result = bench.main(["--random_model", "--preset", "test", *FAST, "--molmoe_shape", "test", "--molmoe_reps", "2",
                         "--decode_tokens", "2", "--stock_implementations", "eager", "grouped_mm",
                         "--stock_caches", "dynamic", "--stock_reps", "1", "--output", str(out), "--markdown", str(md)])
    m = result["molmoe_shape"]
    ks, ns = m["top_k_values"], m["num_blocks_values"]
    assert {f"default/k{k}/N{n}" for k in ks for n in ns} <= set(m["decode"])
    assert {f"eager/k{ks[-1]}/N{ns[-1]}", f"eager/k{ks[0]}/N{ns[0]}"} <= set(m["decode"])
    assert set(m["prefill"]["tokens"]) == set(m["crops"]) == {"low", "medium", "high"}
    assert m["prefill"]["tokens"]["high"] == 3 * m["vision_tokens_per_crop"] + m["prompt_tokens"] + 1
    assert {"full", "tier medium", "tier low", "cheapest"} <= set(m["request"])
    assert {"eager/dynamic", "grouped_mm/dynamic"} == set(m["stock"])
    for row in [*m["request"].values(), *(v for k, v in m["decode"].items() if "/" in k)]:
        assert row["n"] == 2 and row["median_ms"] > 0 and row["iqr_ms"] >= 0
    checks = result["checks"]
    assert {"decode_full_ms_per_token", "request_full_ms", "request_cheapest_ms", "decode_knob_steps"} <= set(checks)
    assert len(checks["decode_knob_steps"]) == (len(ks) - 1) * len(ns) + (len(ns) - 1) * len(ks)
    steps = [(c["from"], c["to"]) for c in checks["request_knob_steps"]]
    assert steps[:2] == [("full", "tier medium"), ("tier medium", "tier low")]  # consecutive steps down
    assert ("full", f"top-k {ks[-2]}") in steps and ("full", f"blocks {ns[-2]}") in steps
    assert "MolmoE-1B shape" in md.read_text() and "Stock transformers" in md.read_text()


def test_negative_controller_rounds_fail_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--controller_rounds=-1: expected >= 0"):
        bench.main(["--random_model", "--preset", "test", *FAST, "--controller_rounds", "-1",
                    "--output", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()


def test_bench_random_model_says_so(tmp_path):
    result = bench.main(["--random_model", "--preset", "test", *FAST, "--output", str(tmp_path / "b.json")])
    assert result["model"].startswith("random weights, preset test")


def test_meter_hooks_are_restored(model_dir, tmp_path):
    from envs.backends.vlm import VLMBackend
    from envs.profiling import StaticConfig, load_samples, meter_overhead, run_episode

    backend = VLMBackend(model_path=model_dir, budget_range_ms=(1.0, 2.0), num_samples={"test": 2})
    samples, _ = load_samples(backend, "test", 2)
    meter_overhead(backend, samples, StaticConfig("low", 8, 6), pairs=2, warmup=0)
    result = run_episode(backend, samples[0], StaticConfig("low", 8, 6), torch.zeros(backend.d_model))
    assert result.timings_ms["prefill"] > 0 and result.timings_ms["vision"] > 0  # hooks attached again


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--pairs", "0"], r"--pairs=0 is invalid; expected a positive int"),
        (["--split", "dev"], r"--split='dev' is not a known split"),
        (["--model_path", "/nonexistent/model"], r"--model_path='/nonexistent/model': model directory does not exist"),
        (["--device", "npu"], r"--device='npu' is not a device"),
        (["--molmoe_reps", "0"], r"--molmoe_reps=0 is invalid"),
    ],
)
def test_bench_bad_inputs(tmp_path, extra, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        bench.main([*extra, "--output", str(tmp_path / "b.json")])
