"""runners/profile_configs.py and envs.profiling on a tiny random-weight model: schemas, the batched accuracy
path against batch-1 episodes, importance files, the Pareto/budget-range rule, bad inputs.
No timing is asserted."""
import json
import math
import shutil

import pytest
import torch

from envs.backends.vlm import VLMBackend
from envs.data import synthvqa
from envs.profiling import (
    BatchedEvaluator,
    StaticConfig,
    budget_range,
    compute_importance,
    evaluation_backend,
    load_samples,
    pareto_frontier,
    run_episode,
    static_configs,
)

from helpers import load_runner, make_tiny_model_dir

LAYERS = 6


profile_runner = load_runner("profile_configs")


def make_model_dir(path, seed=0):
    """Tiny model of the real classes with SynthVQA's vocabulary (so its questions tokenize)."""
    return make_tiny_model_dir(path, seed=seed, results=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def profiled(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile_out")
    profile_runner.main([
        "--model_path", str(model_dir), "--output_dir", str(out), "--num_samples", "6", "--latency_samples", "2",
        "--importance_samples", "4", "--tiers", "low", "high", "--top_k", "4", "8", "--num_blocks", "5", "6",
        "--warmup", "1", "--batch_size", "4",
    ])
    return out


def test_profile_json_schema(profiled):
    data = json.loads((profiled / "profile.json").read_text())
    assert data["num_samples"] == 6 and data["latency_samples"] == 2
    configs = data["configs"]
    assert len(configs) == 2 * 2 * 2
    assert {(c["tier"], c["top_k"], c["num_blocks"]) for c in configs} == {
        (t, k, n) for t in ("low", "high") for k in (4, 8) for n in (5, 6)
    }
    for c in configs:
        assert c["insertion"] == 1 and c["blocks"][0] == 0 and len(c["blocks"]) == c["num_blocks"]
        assert 0.0 <= c["accuracy_mean"] <= 1.0
        assert set(c["accuracy_by_family"]) <= set(synthvqa.FAMILIES)
        assert all(0.0 <= a <= 1.0 for a in c["accuracy_by_family"].values())
        for key in ("latency_mean_ms", "latency_p50_ms", "latency_p95_ms", "vision_ms", "prefill_ms", "decode_ms"):
            assert math.isfinite(c[key]) and c[key] > 0, key
        assert math.isfinite(c["latency_std_ms"]) and c["latency_std_ms"] >= 0
        assert c["latency_samples"] == 2 and c["num_samples"] == 6
    lo, hi = data["budget_range_ms"]
    assert 0 < lo < hi
    assert any(c["on_pareto_frontier"] for c in configs)
    assert {"cpu_model", "cpu_cores", "torch_version"} <= set(data["machine"])
    assert data["machine"]["torch_version"] == torch.__version__
    assert "zero budget token" in data["meta"]["budget_token"]
    assert data["meta"]["importance"]["method"] == "drop_accuracy"


def test_importance_files_cover_every_block(profiled):
    written = json.loads((profiled / "importance.json").read_text())
    other = json.loads((profiled / "importance_block_influence.json").read_text())
    assert written["method"] == "drop_accuracy" and other["method"] == "block_influence"
    for data in (written, other):
        assert set(data["scores"]) == {str(i) for i in range(LAYERS)}
        assert all(isinstance(v, float) and math.isfinite(v) for v in data["scores"].values())
    # block influence of a random block is strictly positive (its output is not its input)
    assert all(v > 0 for v in other["scores"].values())


def test_profiled_dir_is_a_backend_results_dir(model_dir, profiled):
    backend = VLMBackend(model_path=model_dir, results_dir=profiled)
    data = json.loads((profiled / "profile.json").read_text())
    assert list(backend.budget_range_ms) == data["budget_range_ms"]
    assert backend.importance_method == "drop_accuracy"


def test_importance_file_option_and_no_silent_overwrite(model_dir, profiled, tmp_path):
    args = ["--model_path", str(model_dir), "--num_samples", "3", "--latency_samples", "3", "--tiers", "low",
            "--top_k", "8", "--num_blocks", "6", "--warmup", "0"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        profile_runner.main([*args, "--output_dir", str(profiled)])
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"method": "custom", "scores": {str(i): float(-i) for i in range(LAYERS)}}))
    out = tmp_path / "out"
    # One configuration has no budget range (1.1 x its p95 is above its p95): the profile is written,
    # then the runner says the range is missing.
    with pytest.raises(ValueError, match="without budget_range_ms"):
        profile_runner.main([*args, "--output_dir", str(out), "--importance_file", str(custom), "--skip_importance",
                             "--num_blocks", "4"])
    data = json.loads((out / "profile.json").read_text())
    assert data["budget_range_ms"] is None and data["meta"]["importance"]["method"] == "custom"
    assert json.loads((out / "importance.json").read_text())["method"] == "custom"
    assert data["configs"][0]["blocks"] == [0, 1, 2, 3]  # scores favour early blocks


def test_batched_accuracy_path_equals_batch1_episodes(model_dir, tmp_path):
    """The batched evaluator must generate what VLMBackend episodes generate (same elastic path)."""
    scores = {str(i): float((i * 7) % 4) for i in range(LAYERS)}  # non-trivial block choice
    (tmp_path / "importance.json").write_text(json.dumps({"method": "test", "scores": scores}))
    backend = VLMBackend(model_path=model_dir, results_dir=tmp_path, budget_range_ms=(1.0, 2.0),
                         num_samples={"test": 12}, max_new_tokens=3)
    samples, _ = load_samples(backend, "test", 12)
    evaluator = BatchedEvaluator(backend, samples, batch_size=8)
    assert any(len(batch) > 1 for batch in evaluator.batches("high"))  # real batching happens
    ks = backend.knob_space
    firsts, state = [], {"prefill": False}  # logits of the first generated token after each prefill

    def on_block0(block, args):
        state["prefill"] = args[0].shape[1] > 1

    def on_logits(module, args, out):
        if state["prefill"]:
            firsts.append(out.detach().clone())
            state["prefill"] = False

    handles = [backend.model.blocks[0].register_forward_pre_hook(on_block0),
               backend.model.lm_head.register_forward_hook(on_logits)]
    try:
        for config in (StaticConfig("high", 8, 6), StaticConfig("medium", 5, 4), StaticConfig("low", 4, 3)):
            plan = config.plan(backend.importance, ks, backend.cfg.top_k)
            firsts.clear()
            batched = evaluator.generate(config.tier, plan)
            batches = evaluator.batches(config.tier)
            assert len(firsts) == len(batches)
            first_batched = {i: out[row, 0] for batch, out in zip(batches, firsts) for row, i in enumerate(batch)}
            for i, sample in enumerate(samples):
                firsts.clear()
                result = run_episode(backend, sample, config, torch.zeros(backend.d_model))
                assert result.extras["blocks"] == [b for b, _ in plan]
                assert result.extras["generated_ids"] == batched[i], (config, i)
                torch.testing.assert_close(firsts[0][0, 0], first_batched[i], rtol=1e-4, atol=1e-5)
    finally:
        for h in handles:
            h.remove()


def test_shared_prefix_evaluation_equals_one_plan_at_a_time(model_dir):
    """generate_many reuses common plan prefixes; every plan must get what generate() gives it alone."""
    with evaluation_backend(model_dir, num_samples={"test": 8}, max_new_tokens=3) as eb:
        samples, _ = load_samples(eb, "test", 8)
        evaluator = BatchedEvaluator(eb, samples, batch_size=4)
        full = [(b, 8) for b in range(LAYERS)]
        plans = {
            "full": full,
            "drop3": [x for x in full if x[0] != 3],
            "drop0": full[1:],
            "k4": [(0, 8)] + [(b, 4) for b in range(1, LAYERS)],
            "k4_short": [(0, 8)] + [(b, 4) for b in range(1, 4)],
        }
        many = evaluator.generate_many("medium", plans)
        for name, plan in plans.items():
            assert many[name] == evaluator.generate("medium", plan), name


def test_compute_importance_scores_block_zero_and_is_finite(model_dir):
    with evaluation_backend(model_dir, num_samples={"val": 4}) as eb:
        samples, _ = load_samples(eb, "val", 4)
        records = compute_importance(BatchedEvaluator(eb, samples), eb.knob_space, eb.cfg.top_k)
    assert set(records) == {"drop_accuracy", "block_influence"}
    for name, rec in records.items():
        assert rec["method"] == name
        assert set(rec["scores"]) == {str(i) for i in range(LAYERS)}
        assert all(math.isfinite(v) for v in rec["scores"].values())
    assert set(records["drop_accuracy"]["accuracy_without_block"]) == {str(i) for i in range(LAYERS)}


def test_pareto_frontier_and_budget_range_rule():
    def c(acc, mean, p95):
        return {"accuracy_mean": acc, "latency_mean_ms": mean, "latency_p95_ms": p95}

    configs = [
        c(0.9, 100, 120),  # 0 best accuracy: frontier
        c(0.8, 50, 60),    # 1 frontier
        c(0.7, 60, 70),    # 2 dominated by 1 (less accurate and slower)
        c(0.5, 20, 25),    # 3 fastest: frontier
        c(0.9, 110, 300),  # 4 dominated by 0 (same accuracy, slower) despite the largest p95
        c(0.5, 20, 22),    # 5 exact tie with 3 in (accuracy, mean): neither dominates
        c(0.8, 50, 55),    # 6 exact tie with 1
    ]
    assert pareto_frontier(configs) == [0, 1, 3, 5, 6]
    (lo, hi), rule, front = budget_range(configs)
    # lo: 1.1 x the fastest frontier config's p95 (config 5: 22 ms); hi: the frontier's largest p95
    assert (lo, hi) == (pytest.approx(24.2), 120) and rule == "pareto_frontier" and front == [0, 1, 3, 5, 6]
    # every config equally accurate: a one-point frontier has an empty span, so all configs are used
    flat = [c(0.0, 30, 40), c(0.0, 10, 12), c(0.0, 20, 25)]
    (lo, hi), rule, _ = budget_range(flat)
    assert (lo, hi) == (pytest.approx(13.2), 40) and rule.startswith("all_configs")


def test_static_configs_full_grid_and_subsets(model_dir):
    with evaluation_backend(model_dir) as eb:
        ks = eb.knob_space
        assert len(static_configs(ks)) == len(ks.tiers) * len(ks.top_k_values) * len(ks.num_blocks_values)
        assert all(c.insertion == 1 for c in static_configs(ks))
        with pytest.raises(ValueError, match=r"tiers=\['ultra'\].*subset of \['low', 'medium', 'high'\]"):
            static_configs(ks, tiers=["ultra"])
        with pytest.raises(ValueError, match=r"top_k=\[9\]"):
            static_configs(ks, top_k=[9])


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (["--num_samples", "0"], ValueError, r"--num_samples=0 is invalid; expected a positive int"),
        (["--num_samples", "-3"], ValueError, r"--num_samples=-3"),
        (["--latency_samples", "0"], ValueError, r"--latency_samples=0"),
        (["--num_samples", "2", "--latency_samples", "5"], ValueError, r"--latency_samples=5 .*<= --num_samples=2"),
        (["--split", "dev"], ValueError, r"--split='dev' is not a known split; expected one of \('train', 'val', 'test'\)"),
        (["--importance_split", "eval"], ValueError, r"--importance_split='eval'"),
        (["--importance_method", "magic"], ValueError, r"--importance_method='magic'.*drop_accuracy"),
    ],
)
def test_bad_arguments_name_field_value_and_expectation(model_dir, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        profile_runner.main(["--model_path", str(model_dir), "--output_dir", str(tmp_path / "o"), *extra])


def test_missing_model_dir_or_file_is_named(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--model_path=.*nowhere.*does not exist"):
        profile_runner.main(["--model_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")])
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        broken = tmp_path / f"no_{name}"
        shutil.copytree(model_dir, broken)
        (broken / name).unlink()
        with pytest.raises(FileNotFoundError, match=f"model file {name} is missing"):
            profile_runner.main(["--model_path", str(broken), "--output_dir", str(tmp_path / "o")])
    # the CLI turns these into a one-line error and exit status 2
    assert profile_runner.cli(["--model_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")]) == 2


def test_accuracy_from_reuses_accuracy_and_remeasures_latency(model_dir, profiled, tmp_path):
    """--accuracy_from: the accuracy rows of an earlier profile of the same weights and samples are
    kept as they are, latency is measured anew; anything that differs is refused by name."""
    earlier = json.loads((profiled / "profile.json").read_text())
    args = ["--model_path", str(model_dir), "--num_samples", "6", "--latency_samples", "2", "--tiers", "low", "high",
            "--top_k", "4", "8", "--num_blocks", "5", "6", "--warmup", "0",
            "--importance_file", str(profiled / "importance.json"), "--skip_importance"]
    out = tmp_path / "again"
    again = profile_runner.main([*args, "--output_dir", str(out), "--accuracy_from", str(profiled / "profile.json")])
    for old, new in zip(earlier["configs"], again["configs"]):
        assert (new["accuracy_mean"], new["accuracy_by_family"], new["blocks"]) == \
            (old["accuracy_mean"], old["accuracy_by_family"], old["blocks"])
        assert new["latency_samples"] == 2 and new["latency_mean_ms"] > 0
    other = dict(earlier, num_samples=5)
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="num_samples is 5, this profile's is 6"):
        profile_runner.main([*args, "--output_dir", str(tmp_path / "x"), "--accuracy_from", str(tmp_path / "other.json")])
