"""runners/evaluate.py on the dummy backend, with a checkpoint from a tiny runners/train.py run."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_runner
import yaml

from envs.knobs import KnobSpace
from envs.shield import LatencyShield

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "runners" / "train.py"
EVALUATE = REPO / "runners" / "evaluate.py"
ROW_KEYS = ("policy", "budget_ms", "accuracy_mean", "latency_mean_ms", "latency_p50_ms", "latency_p95_ms",
            "violation_rate", "reward_mean", "num_episodes", "choices", "accuracy_by_family", "violation_rate_by_family",
            "in_training_range")
META_KEYS = ("machine", "checkpoint", "split", "num_samples", "budgets", "profile_source", "policies", "calibration",
             "interleaving", "structural_headroom")


def _tiny_config(path: Path) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["env"]["backend_options"]["num_samples"] = {"train": 64, "val": 32, "test": 32}
    cfg["policy"].update({"hidden_dim": 32, "sinusoidal_dim": 32})
    cfg["train"].update({"num_epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "group_size": 4})
    cfg["eval"].update({"val_samples": 8, "test_samples": 8, "batch_size": 32})
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    out = tmp / "run"
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(_tiny_config(tmp / "tiny.yaml")),
                           "--output_dir", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def evaluate_main():
    return load_runner("evaluate").main


def test_end_to_end_subprocess_writes_json_csv_and_plots(run_dir, tmp_path, evaluate_main):
    out = tmp_path / "eval"
    policies = ["controller", "static:low,4,12", "static:high,8,16", "lookup-calibrated", "family-oracle",
                "lookup-mean", "lookup-p95", "oracle", "random"]
    proc = subprocess.run(
        [sys.executable, str(EVALUATE), "--checkpoint", str(run_dir), "--output_dir", str(out), "--num_samples", "12",
         "--num_budgets", "3", "--calibration_samples", "16", "--policies", *policies],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,  # another cwd: the runner finds the repo itself
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "eval.json").read_text())
    rows, meta = data["rows"], data["meta"]
    for key in META_KEYS:
        assert key in meta, key
    assert meta["checkpoint"].endswith("best.pt") and meta["split"] == "test" and meta["num_samples"] == 12
    assert meta["budgets"] == [50.0, 115.0, 180.0]  # 3 evenly over the dummy's training range
    assert meta["profile_source"]["source"] == "closed_form"
    assert meta["calibration"]["split"] == "val" and meta["calibration"]["num_samples"] == 16
    assert meta["interleaving"]["rounds"] == 12 and data["rows_outside_training_range"] == []
    headroom = {h["budget_ms"]: h for h in meta["structural_headroom"]}
    assert len(rows) == len(policies) * 3
    assert {(r["policy"], r["budget_ms"]) for r in rows} == {(p, b) for p in policies for b in meta["budgets"]}
    for r in rows:
        for key in ROW_KEYS:
            assert key in r, (r["policy"], key)
        assert r["num_episodes"] == 12
        assert set(r["accuracy_by_family"]) <= {"coarse", "detail", "reasoning"}
        assert 0 <= r["violation_rate"] <= 1 and r["latency_p95_ms"] >= r["latency_p50_ms"]
    by = {(r["policy"], r["budget_ms"]): r for r in rows}
    # the least violating measured configuration violates no more than either static row
    feasibility = {f["budget_ms"]: f for f in meta["budget_feasibility"]}
    assert sorted(feasibility) == meta["budgets"]
    for b, f in feasibility.items():
        assert f["violation_rate"] <= min(by[p, b]["violation_rate"] for p in ("static:low,4,12", "static:high,8,16"))
        assert f["feasible"] == (f["violation_rate"] <= 0.05)
    for b in meta["budgets"]:
        # the oracle meets every budget some measured config meets, and is at least as accurate as
        # every static config that meets the budget on all samples
        assert by["oracle", b]["violation_rate"] == by["oracle", b]["fallback_rate"]
        for p in ("static:low,4,12", "static:high,8,16"):
            if by[p, b]["violation_rate"] == 0:
                assert by["oracle", b]["accuracy_mean"] >= by[p, b]["accuracy_mean"]
        assert by["static:high,8,16", b]["choices"]["tier"]["high"] == 1.0
        assert "optimal_expected_reward_mean" in by["controller", b]
        # the family oracle may pick the lookup's configuration for every family, never worse on calibration
        fam = by["family-oracle", b]
        assert set(fam["family_choice"]) == set(fam["accuracy_by_family"])
        assert headroom[b]["headroom"] == pytest.approx(fam["accuracy_mean"] - by["lookup-calibrated", b]["accuracy_mean"])
    with open(out / "eval.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) and "choice_top_k_8" in table[0] and "accuracy_family_detail" in table[0]
    assert "violation_family_detail" in table[0]
    for name in ("accuracy_vs_budget", "latency_vs_budget", "violation_vs_budget", "controller_knobs_vs_budget"):
        assert (out / f"{name}.png").stat().st_size > 1000
    # every env policy's episodes, one record each, summing to its rows
    with open(out / "episodes.csv") as fh:
        records = list(csv.DictReader(fh))
    assert {r["policy"] for r in records} == {"controller", "random"} and len(records) == 2 * 3 * 12
    for (policy, b), row in by.items():
        if policy not in ("controller", "random"):
            continue
        mine = [r for r in records if r["policy"] == policy and float(r["budget_ms"]) == b]
        assert sorted(int(r["round"]) for r in mine) == list(range(12))
        assert [int(r["sample_index"]) for r in mine] == meta["sample_index"]
        assert sum(int(r["violation"]) for r in mine) / 12 == pytest.approx(row["violation_rate"])
        assert all(0.0 < float(r["elapsed_ms"]) < float(r["latency_ms"]) for r in mine)
        assert sum(float(r["latency_ms"]) for r in mine) / 12 == pytest.approx(row["latency_mean_ms"], rel=1e-5)
        assert sum(float(r["accuracy"]) for r in mine) / 12 == pytest.approx(row["accuracy_mean"], rel=1e-5)
        assert all(r["tier"] in ("low", "medium", "high") and 4 <= int(r["top_k"]) <= 8
                   and 12 <= int(r["num_blocks"]) <= 16 and float(r["controller_ms"]) >= 0 for r in mine)
        assert [r["family"] for r in mine] == meta["sample_families"]
    # a second run does not overwrite the first
    before = (out / "eval.json").read_text()
    assert "already holds eval.json" in _error(evaluate_main, "--checkpoint", run_dir, "--output_dir", out)
    assert (out / "eval.json").read_text() == before


def test_calibration_first_runs_only_the_chosen_configurations_on_the_test_samples(run_dir, tmp_path, evaluate_main):
    policies = ["controller", "lookup-calibrated", "family-oracle", "lookup-p95"]
    args = ["--checkpoint", str(run_dir), "--num_samples", "6", "--num_budgets", "3", "--calibration_samples", "16",
            "--calibration_phase", "first"]
    result = evaluate_main([*args, "--output_dir", str(tmp_path / "first"), "--policies", *policies])
    meta, rows = result["meta"], result["rows"]
    assert meta["calibration"]["phase"] == "first" and meta["calibration"]["num_samples"] == 16
    by = {(r["policy"], r["budget_ms"]): r for r in rows}
    read = {by["lookup-calibrated", b]["config"] for b in meta["budgets"]} | {by["lookup-p95", b]["config"] for b in meta["budgets"]}
    read |= {c for b in meta["budgets"] for c in by["family-oracle", b]["family_choice"].values()}
    assert len(read) <= meta["num_configs_measured"] < 75  # the test rounds ran the read ones, not all 75
    assert all(r["num_episodes"] == 6 for r in rows)
    headroom = {h["budget_ms"]: h for h in meta["structural_headroom"]}
    for b in meta["budgets"]:
        assert headroom[b]["headroom"] == pytest.approx(by["family-oracle", b]["accuracy_mean"]
                                                        - by["lookup-calibrated", b]["accuracy_mean"])
    # with the oracle every configuration runs on the test samples
    with_oracle = evaluate_main([*args, "--output_dir", str(tmp_path / "oracle"), "--policies", "lookup-calibrated",
                                 "oracle"])
    assert with_oracle["meta"]["num_configs_measured"] == 75


def test_two_pass_calibration_measures_the_frontier_again_interleaved_and_chooses_on_it(run_dir, tmp_path,
                                                                                       evaluate_main):
    result = evaluate_main(["--checkpoint", str(run_dir), "--num_samples", "6", "--num_budgets", "3",
                            "--calibration_samples", "16", "--calibration_phase", "two-pass", "--policies",
                            "controller", "lookup-calibrated", "family-oracle", "oracle", "--output_dir",
                            str(tmp_path / "two")])
    meta, rows = result["meta"], result["rows"]
    assert meta["calibration"]["phase"] == "two-pass" and meta["calibration"]["num_samples"] == 16
    assert meta["latency_reference"]["setting"] == "calibration"
    # the second pass ran interleaved with the 6 test rounds: 16 calibration samples, 2-3 per round
    assert meta["interleaving"]["calibration_samples_per_round"] == [2, 3]
    assert meta["num_configs_measured"] < 75
    assert meta["timings_s"]["calibration_first_pass"] > 0
    chosen = {r["config"] for r in rows if r["policy"] == "lookup-calibrated"}
    chosen |= {c for r in rows if r["policy"] == "family-oracle" for c in r["family_choice"].values()}
    assert chosen and all(r["num_episodes"] == 6 for r in rows)
    # the oracle chooses per sample among the re-measured frontier, which holds every calibrated choice
    assert chosen <= set(meta["oracle_configs"]) and len(meta["oracle_configs"]) <= meta["num_configs_measured"]
    by = {(r["policy"], r["budget_ms"]): r for r in rows}
    for b in meta["budgets"]:  # it meets every budget some re-measured configuration meets on that sample
        assert by["oracle", b]["violation_rate"] == by["oracle", b]["fallback_rate"]
        assert by["oracle", b]["num_episodes"] == 6
    # paired on the same samples: the family oracle's difference per budget is the structural headroom
    paired = meta["paired_differences"]
    assert set(paired) == {"controller - lookup-calibrated", "family-oracle - lookup-calibrated",
                           "oracle - lookup-calibrated", "controller - family-oracle"}
    headroom = [h["headroom"] for h in sorted(meta["structural_headroom"], key=lambda h: h["budget_ms"])]
    fo = paired["family-oracle - lookup-calibrated"]
    assert [e["accuracy"]["mean"] for e in fo["per_budget"]] == pytest.approx(headroom)
    assert fo["accuracy"]["mean"] == pytest.approx(sum(headroom) / len(headroom)) and fo["num_samples"] == 6
    # eval.json keeps the measured tables per sample, and every episode's latency in run order
    tables = meta["config_tables"]
    assert tables["test"]["configs"] == meta["oracle_configs"] and len(tables["test"]["latency_ms"]) == 6
    assert len(tables["calibration"]["accuracy"]) == len(tables["calibration_first_pass"]["accuracy"]) == 16
    assert len(meta["sample_families"]) == 6 and len(tables["calibration"]["families"]) == 16
    assert len(tables["calibration_first_pass"]["configs"]) == 75 and len(tables["calibration"]["configs"]) < 75
    column = tables["test"]["configs"].index(by["lookup-calibrated", meta["budgets"][0]]["config"])
    lc = by["lookup-calibrated", meta["budgets"][0]]["per_sample"]
    assert lc["latency_ms"] == pytest.approx([row[column] for row in tables["test"]["latency_ms"]], abs=1e-3)
    assert all(len(r["per_sample"]["latency_ms"]) == 6 for r in rows)


def test_calibration_reference_sets_the_budget_range_and_the_controller_shield(run_dir, tmp_path, evaluate_main):
    args = ["--checkpoint", str(run_dir), "--num_samples", "4", "--num_budgets", "3", "--calibration_samples", "8",
            "--calibration_phase", "first", "--policies", "controller", "lookup-calibrated", "--latency_shield", "on",
            "--latency_shield_tracking", "0"]
    calibrated = evaluate_main([*args, "--output_dir", str(tmp_path / "cal")])["meta"]
    assert calibrated["latency_reference"]["setting"] == "calibration"  # the default with the calibration first
    lo, hi = calibrated["budget_range_ms"]
    assert calibrated["budgets"][0] == pytest.approx(lo) and calibrated["budgets"][-1] == pytest.approx(hi)
    assert "calibration gives" in calibrated["budget_source"]
    start_up = evaluate_main([*args, "--latency_reference", "start-up", "--output_dir", str(tmp_path / "start")])["meta"]
    assert start_up["budget_range_ms"] == start_up["latency_reference"]["profile_budget_range_ms"]
    tables = [torch.tensor(m["latency_shield"]["tables"]["controller"]["p95_ms"]) for m in (calibrated, start_up)]
    assert not torch.allclose(tables[0], tables[1])  # the measured calibration, not the rescaled profile
    msg = _error(evaluate_main, "--checkpoint", str(run_dir), "--policies", "controller", "--latency_reference",
                 "calibration", "--output_dir", str(tmp_path / "bad"))
    assert "--latency_reference calibration needs --calibration_phase first" in msg
    assert not (tmp_path / "bad").exists()


def test_lookup_from_a_results_dir_profile(run_dir, tmp_path, evaluate_main):
    # Hand-made profile: at 100 ms, lookup-mean may use medium,6,14 (mean 104 <= 105), lookup-p95 not.
    configs = [
        {"tier": "medium", "top_k": 6, "num_blocks": 14, "accuracy_mean": 0.8, "latency_mean_ms": 104.0,
         "latency_p95_ms": 130.0},
        {"tier": "low", "top_k": 5, "num_blocks": 13, "accuracy_mean": 0.6, "latency_mean_ms": 60.0,
         "latency_p95_ms": 90.0},
    ]
    results = tmp_path / "results"
    results.mkdir()
    (results / "profile.json").write_text(json.dumps({"configs": configs, "budget_range_ms": [50, 180]}))
    result = evaluate_main(["--checkpoint", str(run_dir / "checkpoints" / "latest.pt"), "--output_dir",
                            str(tmp_path / "e"), "--results_dir", str(results), "--num_samples", "4",
                            "--budgets", "100", "--policies", "lookup-mean", "lookup-p95"])
    rows = {r["policy"]: r for r in result["rows"]}
    assert rows["lookup-mean"]["config"] == "medium,6,14" and rows["lookup-p95"]["config"] == "low,5,13"
    assert result["meta"]["profile_source"]["source"] == "results_dir"
    assert result["meta"]["num_configs_measured"] == 2  # only what the lookups need, no oracle


def _error(evaluate_main, *argv) -> str:
    with pytest.raises(SystemExit) as err:
        evaluate_main(list(map(str, argv)))
    return str(err.value)


def test_bad_input_fails_clearly(run_dir, tmp_path, evaluate_main):
    base = ["--checkpoint", run_dir, "--output_dir", tmp_path / "bad", "--num_samples", "2"]
    assert "--budgets=0.0 is invalid" in _error(evaluate_main, *base, "--budgets", "100", "0")
    assert "--budgets=inf is invalid" in _error(evaluate_main, *base, "--budgets", "inf")
    assert "--budgets=-5.0 is invalid" in _error(evaluate_main, *base, "--budgets", "-5")
    assert "--budgets=nan is invalid" in _error(evaluate_main, *base, "--budgets", "nan")
    assert "must be disjoint from the test samples" in _error(evaluate_main, *base, "--calibration_split", "test")
    assert "--calibration_samples=0: expected >= 1" in _error(evaluate_main, *base, "--calibration_samples", "0")
    assert "--latency_shield_quantile=1.0: expected a number in (0, 1)" in _error(
        evaluate_main, *base, "--latency_shield_quantile", "1")
    assert "unknown policy 'greedy'" in _error(evaluate_main, *base, "--policies", "controller", "greedy")
    assert "got 2 comma-separated" in _error(evaluate_main, *base, "--policies", "static:low,4")
    assert "tier 'huge' is not in the knob space" in _error(evaluate_main, *base, "--policies", "static:huge,4,12")
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _error(evaluate_main, *base, "--results_dir", empty, "--policies", "lookup-p95")
    assert "has no profile.json" in msg and str(empty) in msg
    assert "does not exist" in _error(evaluate_main, "--checkpoint", tmp_path / "nope.pt", "--output_dir", tmp_path / "x")
    # a checkpoint for another knob space / another model width
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"env": {"backend_options": {"knob_space": {"top_k_values": [4, 5, 6]}}}}))
    msg = _error(evaluate_main, *base, "--config", other)
    assert "does not match the policy: knob_space=" in msg
    other.write_text(yaml.safe_dump({"env": {"backend_options": {"d_model": 32}}}))
    assert "d_model=64, expected 32" in _error(evaluate_main, *base, "--config", other)
    assert not (tmp_path / "bad" / "eval.json").exists()


def test_budgets_outside_the_training_range_are_reported_apart(run_dir, tmp_path, evaluate_main):
    out = tmp_path / "e"
    result = evaluate_main(["--checkpoint", str(run_dir), "--output_dir", str(out), "--num_samples", "4",
                            "--budgets", "30", "100", "400", "--policies", "controller", "lookup-calibrated",
                            "--calibration_samples", "4"])
    assert {r["budget_ms"] for r in result["rows"]} == {100.0}
    beyond = result["rows_outside_training_range"]
    assert {(r["policy"], r["budget_ms"]) for r in beyond} == {(p, b) for p in ("controller", "lookup-calibrated")
                                                                for b in (30.0, 400.0)}
    assert all(not r["in_training_range"] and r["num_episodes"] == 4 for r in beyond)  # the controller answered
    assert result["meta"]["budgets_outside_training_range"] == [30.0, 400.0]
    # the controller's own run's range, in its units (the dummy: time scale 1, its trained range is the backend's)
    assert result["meta"]["controller_trained_ranges"]["controller"]["budgets_outside"] == [30.0, 400.0]
    data = json.loads((out / "eval.json").read_text())
    assert len(data["rows"]) == 2 and len(data["rows_outside_training_range"]) == 4
    with open(out / "eval_outside_range.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4


def _run_trained_at(run_dir: Path, out: Path, trained_range) -> Path:
    """A copy of run_dir's checkpoint as a run named out.name whose training range was trained_range(lo, hi)."""
    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    ckpt["policy_meta"]["budget_range_ms"] = trained_range(*ckpt["policy_meta"]["budget_range_ms"])
    (out / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, out / "checkpoints" / "best.pt")
    return out


def test_default_budgets_stay_inside_every_controllers_trained_range(run_dir, tmp_path, evaluate_main):
    narrow = _run_trained_at(run_dir, tmp_path / "narrow", lambda lo, hi: [lo + (hi - lo) / 4, hi - (hi - lo) / 4])
    args = ["--checkpoint", str(run_dir), str(narrow), "--num_samples", "2", "--num_budgets", "3",
            "--policies", "controller"]
    meta = evaluate_main([*args, "--output_dir", str(tmp_path / "inside")])["meta"]
    ranges = meta["controller_trained_ranges"]
    here = [[b * r["time_scale"] for b in r["budget_range_ms"]] for r in ranges.values()]
    assert meta["budgets"][0] == pytest.approx(max(r[0] for r in here))
    assert meta["budgets"][-1] == pytest.approx(min(r[1] for r in here))
    assert meta["budgets"][0] > meta["budget_range_ms"][0] and not any(r["budgets_outside"] for r in ranges.values())
    assert "every controller trained at" in meta["budget_source"]
    # the reference range alone: the narrow run reads its two end budgets outside the range it trained at
    wide = evaluate_main([*args, "--budget_span", "reference", "--output_dir", str(tmp_path / "wide")])["meta"]
    assert [wide["budgets"][0], wide["budgets"][-1]] == pytest.approx(wide["budget_range_ms"])
    assert wide["controller_trained_ranges"]["controller:narrow"]["budgets_outside"] == [wide["budgets"][0],
                                                                                          wide["budgets"][-1]]
    assert not wide["controller_trained_ranges"]["controller:run"]["budgets_outside"]


def test_controllers_with_no_common_trained_range_get_the_reference_range(run_dir, tmp_path, evaluate_main, capsys):
    far = _run_trained_at(run_dir, tmp_path / "far", lambda lo, hi: [10 * hi, 20 * hi])
    meta = evaluate_main(["--checkpoint", str(run_dir), str(far), "--num_samples", "2", "--num_budgets",
                          "2", "--policies", "controller", "--output_dir", str(tmp_path / "e")])["meta"]
    assert meta["budgets"] == pytest.approx(meta["budget_range_ms"])
    assert "share no span" in capsys.readouterr().err


def test_several_checkpoints_are_evaluated_in_one_run(run_dir, tmp_path, evaluate_main):
    import shutil
    import statistics

    twin = tmp_path / "run_b"
    shutil.copytree(run_dir / "checkpoints", twin / "checkpoints")  # the same weights under another run name
    out = tmp_path / "e"
    result = evaluate_main(["--checkpoint", str(run_dir), str(twin / "checkpoints" / "best.pt"), "--output_dir",
                            str(out), "--num_samples", "6", "--num_budgets", "2", "--calibration_samples", "8",
                            "--policies", "controller", "lookup-calibrated", "family-oracle"])
    names = ["controller:run", "controller:run_b"]
    meta, rows = result["meta"], result["rows"]
    assert meta["policies"] == [*names, "lookup-calibrated", "family-oracle"]
    assert set(meta["checkpoint"]) == set(names) and meta["interleaving"]["rounds"] == 6
    by = {(r["policy"], r["budget_ms"]): r for r in rows}
    spread = {r["budget_ms"]: r for r in meta["controller_spread"]}
    assert set(spread) == set(meta["budgets"])
    for b, r in spread.items():
        assert by[names[0], b]["num_episodes"] == by[names[1], b]["num_episodes"] == 6
        values = [by[name, b]["accuracy_mean"] for name in names]
        assert r["num_seeds"] == 2 and r["accuracy_mean"] == pytest.approx(statistics.fmean(values))
        assert r["accuracy_mean_std"] == pytest.approx(statistics.stdev(values))
    for h in meta["structural_headroom"]:
        assert h["controller:run_gain"] == pytest.approx(by[names[0], h["budget_ms"]]["accuracy_mean"] - h["lookup_calibrated"])
        assert "controller:run_b_share_of_headroom" in h
    for name in ("controller_knobs_vs_budget_run.png", "controller_knobs_vs_budget_run_b.png"):
        assert (out / name).stat().st_size > 1000
    assert not (out / "controller_knobs_vs_budget.png").exists()
    msg = _error(evaluate_main, "--checkpoint", run_dir, run_dir, "--output_dir", tmp_path / "dup")
    assert "both give the policy name 'controller:run'" in msg and not (tmp_path / "dup").exists()


def test_runs_of_different_training_configs_are_named_by_the_settings_that_differ(run_dir, tmp_path):
    evaluate = load_runner("evaluate")
    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    ckpt["config"]["optim"]["lr"] = 0.5 * ckpt["config"]["optim"]["lr"]
    (tmp_path / "half" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "half" / "checkpoints" / "best.pt")
    lr = ckpt["config"]["optim"]["lr"]
    names = list(evaluate.controller_checkpoints([run_dir, tmp_path / "half"], ["q0.95"]))
    assert names == [f"controller:run[optim.lr={2 * lr}]@q0.95", f"controller:half[optim.lr={lr}]@q0.95"]
    config_labels = evaluate.config_labels
    base = {"policy": {"latency_shield_violation_target": 0.015}, "train": {"seed": 42}}
    other = {"policy": {"latency_shield_violation_target": 0.02}, "train": {"seed": 43}}
    assert config_labels({"a": base, "b": {**base, "train": {"seed": 43}}}) == {}  # seeds of one config
    assert config_labels({"a": base, "b": other}) == {"a": "policy.latency_shield_violation_target=0.015",
                                                      "b": "policy.latency_shield_violation_target=0.02"}
    assert config_labels({"a": base, "b": None}) == {} and config_labels({"a": base}) == {}


def test_latency_shield_flag_gives_controllers_a_shield_and_records_its_table(run_dir, tmp_path, evaluate_main):
    argv = ["--checkpoint", str(run_dir), "--num_samples", "6", "--num_budgets", "2", "--policies", "controller"]
    on = evaluate_main([*argv, "--latency_shield", "on", "--output_dir", str(tmp_path / "on")])
    meta = on["meta"]["latency_shield"]
    assert meta["setting"] == "on" and list(meta["tables"]) == ["controller"]
    table = meta["tables"]["controller"]
    LatencyShield(KnobSpace(), torch.tensor(table["p95_ms"]), table["insertion_index"])  # the dummy's knobs, valid
    assert all(0.0 <= r["shield_rate"] <= 1.0 for r in on["rows"])
    # the tiny run trained without one: by default (its checkpoint's setting) no shield
    default = evaluate_main([*argv, "--output_dir", str(tmp_path / "default")])
    assert default["meta"]["latency_shield"]["tables"] == {}
    assert all(r["shield_rate"] == 0.0 for r in default["rows"])


def test_latency_shield_tracking_flag_reaches_the_shields(run_dir, tmp_path, evaluate_main):
    out = evaluate_main(["--checkpoint", str(run_dir), "--num_samples", "4", "--num_budgets", "2", "--policies",
                         "controller", "--latency_shield", "on", "--latency_shield_tracking", "0.2",
                         "--output_dir", str(tmp_path / "t")])
    table = out["meta"]["latency_shield"]["tables"]["controller"]
    assert table["tracking_rate"] == 0.2 and any(s != 1.0 for s in table["scale"])  # 8 episodes moved it


def test_several_shield_quantiles_put_the_same_checkpoints_behind_each_in_one_run(run_dir, tmp_path, evaluate_main):
    import shutil

    twin = tmp_path / "run_b"
    shutil.copytree(run_dir / "checkpoints", twin / "checkpoints")
    out = tmp_path / "q"
    result = evaluate_main(["--checkpoint", str(run_dir), str(twin), "--output_dir", str(out), "--num_samples", "6",
                            "--num_budgets", "2", "--calibration_samples", "8", "--policies", "controller",
                            "lookup-calibrated", "--latency_shield", "on", "--latency_shield_tracking", "0.2",
                            "--latency_shield_quantile", "0.98", "0.6"])
    meta, rows = result["meta"], result["rows"]
    names = ["controller:run@q0.98", "controller:run@q0.6", "controller:run_b@q0.98", "controller:run_b@q0.6"]
    assert meta["policies"] == [*names, "lookup-calibrated"]
    assert meta["latency_shield"]["quantiles"] == dict(zip(names, [0.98, 0.6, 0.98, 0.6]))
    assert {n: t["quantile"] for n, t in meta["latency_shield"]["tables"].items()} == dict(zip(names, [0.98, 0.6] * 2))
    by = {(r["policy"], r["budget_ms"]): r for r in rows}
    assert all(by[n, b]["num_episodes"] == 6 for n in names for b in meta["budgets"])
    # one spread row per group and budget, over that group's two checkpoints
    spread = {(r["group"], r["budget_ms"]): r for r in meta["controller_spread"]}
    assert set(spread) == {(g, b) for g in ("controllers@q0.98", "controllers@q0.6") for b in meta["budgets"]}
    for b in meta["budgets"]:
        assert spread["controllers@q0.6", b]["accuracy_mean"] == pytest.approx(
            (by[names[1], b]["accuracy_mean"] + by[names[3], b]["accuracy_mean"]) / 2)
    paired = meta["paired_differences"]
    between = paired["controllers@q0.6 - controllers@q0.98"]
    assert between["policies"] == [names[1], names[3]] and between["baseline"] == [names[0], names[2]]
    against = [paired[f"{n} - lookup-calibrated"]["accuracy"]["mean"] for n in names]
    assert between["accuracy"]["mean"] == pytest.approx((against[1] + against[3] - against[0] - against[2]) / 2)
    md = (out / "eval.md").read_text()
    assert "controllers@q0.98 (2), mean +- std" in md and "controllers@q0.6 (2), mean +- std" in md
    assert "| controllers@q0.6 - controllers@q0.98 |" in md
    assert (out / "controller_knobs_vs_budget_run_q0.6.png").stat().st_size > 1000
    base = ["--checkpoint", run_dir, "--output_dir", tmp_path / "bad", "--num_samples", "2"]
    assert "a value given twice" in _error(evaluate_main, *base, "--latency_shield_quantile", "0.9", "0.9")
    assert "--latency_shield is off" in _error(evaluate_main, *base, "--latency_shield", "off",
                                               "--latency_shield_quantile", "0.9", "0.95")
    assert "policy.latency_shield off: pass --latency_shield on" in _error(
        evaluate_main, *base, "--latency_shield_quantile", "0.9", "0.95")
    assert not (tmp_path / "bad" / "eval.json").exists()


def test_violation_targets_put_the_checkpoint_behind_a_margin_per_budget(run_dir, tmp_path, evaluate_main):
    result = evaluate_main(["--checkpoint", str(run_dir), "--output_dir", str(tmp_path / "v"), "--num_samples", "6",
                            "--budgets", "60", "100", "140", "--policies", "controller", "--latency_shield", "on",
                            "--latency_shield_violation_target", "off", "0.05"])
    meta = result["meta"]["latency_shield"]
    names = ["controller:run@voff", "controller:run@v0.05"]
    assert result["meta"]["policies"] == names and meta["violation_targets"] == dict(zip(names, [None, 0.05]))
    off, on = (meta["tables"][n] for n in names)
    assert on["budget_edges_ms"] == [80.0, 120.0] and len(on["margin"]) == 3
    assert off["margin"] == [1.0, 1.0, 1.0] and on["margin"] != [1.0, 1.0, 1.0]  # 6 episodes per budget moved them
    between = result["meta"]["paired_differences"]["controllers@v0.05 - controllers@voff"]
    assert between["policies"] == names[1:] and between["baseline"] == names[:1]
    base = ["--checkpoint", run_dir, "--output_dir", tmp_path / "bad", "--num_samples", "2"]
    assert "--latency_shield_violation_target='often': expected a number in (0, 1)" in _error(
        evaluate_main, *base, "--latency_shield", "on", "--latency_shield_violation_target", "often")
    assert "--latency_shield_violation_target=1.5: expected a number in (0, 1)" in _error(
        evaluate_main, *base, "--latency_shield", "on", "--latency_shield_violation_target", "1.5")
    assert "a value given twice" in _error(evaluate_main, *base, "--latency_shield_violation_target", "off", "off")
    assert "--latency_shield is off" in _error(evaluate_main, *base, "--latency_shield", "off",
                                               "--latency_shield_violation_target", "0.02")
    assert "policy.latency_shield off: pass --latency_shield on" in _error(
        evaluate_main, *base, "--latency_shield_violation_target", "0.02")
    assert not (tmp_path / "bad" / "eval.json").exists()


def test_zip_pairing_puts_the_checkpoint_behind_the_ith_quantile_and_target(run_dir, tmp_path, evaluate_main):
    result = evaluate_main(["--checkpoint", str(run_dir), "--output_dir", str(tmp_path / "z"), "--num_samples", "3",
                            "--budgets", "60", "140", "--policies", "controller", "--latency_shield", "on",
                            "--latency_shield_quantile", "0.95", "0.95", "--latency_shield_violation_target", "off",
                            "0.05", "--latency_shield_pairing", "zip"])
    names = ["controller:run@q0.95+voff", "controller:run@q0.95+v0.05"]
    meta = result["meta"]["latency_shield"]
    assert result["meta"]["policies"] == names and meta["violation_targets"] == dict(zip(names, [None, 0.05]))
    assert meta["quantiles"] == dict.fromkeys(names, 0.95)
    assert "controllers@q0.95+v0.05 - controllers@q0.95+voff" in result["meta"]["paired_differences"]
    base = ["--checkpoint", run_dir, "--output_dir", tmp_path / "bad", "--num_samples", "2", "--latency_shield", "on",
            "--latency_shield_pairing", "zip"]
    assert "got 2 and 1 values; expected as many of each, >= 2" in _error(
        evaluate_main, *base, "--latency_shield_quantile", "0.9", "0.95", "--latency_shield_violation_target", "off")
    assert "a (quantile, violation target) pair given twice" in _error(
        evaluate_main, *base, "--latency_shield_quantile", "0.9", "0.9",
        "--latency_shield_violation_target", "off", "off")
    assert not (tmp_path / "bad" / "eval.json").exists()


def test_each_controllers_shield_takes_every_shield_setting_from_its_own_run(run_dir, tmp_path, evaluate_main):
    # The second checkpoint's run steers its bins at another target and rate than the first's (whose
    # config builds the env): each shield must carry its own run's settings.
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    ckpt = torch.load(Path(run_dir) / "checkpoints" / "best.pt", weights_only=True)
    ckpt["config"]["policy"].update(latency_shield=True, latency_shield_violation_target=0.05,
                                    latency_shield_violation_rate=0.3)
    torch.save(ckpt, other / "checkpoints" / "best.pt")
    result = evaluate_main(["--checkpoint", str(run_dir), str(other), "--output_dir", str(tmp_path / "e"),
                            "--num_samples", "3", "--budgets", "60", "140", "--policies", "controller",
                            "--latency_shield", "on"])
    tables = result["meta"]["latency_shield"]["tables"]
    first = torch.load(Path(run_dir) / "checkpoints" / "best.pt", weights_only=True)["config"]["policy"]
    # two training configs: each name carries the settings that tell its run apart (evaluate.config_labels)
    other_name, = (n for n in tables if n.startswith("controller:other["))
    first_name, = (n for n in tables if n.startswith(f"controller:{Path(run_dir).name}["))
    assert "policy.latency_shield_violation_target=0.05" in other_name and "violation_rate=0.3" in other_name
    assert tables[other_name]["violation_target"] == 0.05
    assert tables[other_name]["violation_rate"] == 0.3
    assert tables[first_name]["violation_rate"] == first.get("latency_shield_violation_rate", 0.1)


def test_without_the_flag_each_controller_keeps_its_runs_violation_target(run_dir, tmp_path, evaluate_main):
    own = tmp_path / "own.yaml"
    own.write_text("policy: {latency_shield: true, latency_shield_violation_target: 0.05}\n")
    result = evaluate_main(["--checkpoint", str(run_dir), "--output_dir", str(tmp_path / "own"), "--num_samples", "3",
                            "--budgets", "60", "140", "--policies", "controller", "--config", str(own)])
    meta = result["meta"]["latency_shield"]
    assert meta["violation_targets"] == {"controller": 0.05}
    assert meta["tables"]["controller"]["budget_edges_ms"] == [100.0]  # one bin per evaluated budget
    result = evaluate_main(["--checkpoint", str(run_dir), "--output_dir", str(tmp_path / "off"), "--num_samples", "3",
                            "--budgets", "60", "140", "--policies", "controller", "--config", str(own),
                            "--latency_shield_violation_target", "off"])
    assert result["meta"]["latency_shield"]["violation_targets"] == {"controller": None}
