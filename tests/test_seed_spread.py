"""Mean and spread over seeds (agents.reporting.seed_spread, runners/seed_spread.py)."""
import json

import pytest

from agents.reporting import seed_spread
from helpers import load_runner


def _eval(acc, viol, budgets=(50.0, 100.0)):
    return {"rows": [{"policy": "controller", "budget_ms": b, "accuracy_mean": acc + b / 1000,
                      "violation_rate": viol} for b in budgets]}


def test_mean_std_and_ties_against_the_reference():
    table = seed_spread({"token": [_eval(0.60, 0.0), _eval(0.62, 0.1), _eval(0.64, 0.2)],
                         "elapsed": [_eval(0.70, 0.05), _eval(0.70, 0.05), _eval(0.71, 0.1)]}, reference="token")
    token = {r["budget_ms"]: r for r in table["token"]}
    assert token[50.0]["accuracy_mean"] == pytest.approx(0.67) and token[50.0]["accuracy_mean_std"] == pytest.approx(0.02)
    assert token[50.0]["violation_rate"] == pytest.approx(0.1) and token[50.0]["num_seeds"] == 3
    elapsed = {r["budget_ms"]: r for r in table["elapsed"]}
    assert elapsed[100.0]["accuracy_mean_minus_token"] == pytest.approx(0.70333 - 0.62, abs=1e-4)
    assert not elapsed[100.0]["accuracy_mean_tie_with_token"]  # 8 points apart, spread 2 points
    assert elapsed[100.0]["violation_rate_tie_with_token"]  # 0.03 apart, token's spread 0.1
    assert "accuracy_mean_minus_token" not in token[50.0]


def test_bad_groups_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="evaluations at different budgets"):
        seed_spread({"a": [_eval(0.5, 0), _eval(0.5, 0, budgets=(60.0,))]})
    with pytest.raises(ValueError, match="reference group 'b' is not one of"):
        seed_spread({"a": [_eval(0.5, 0)]}, reference="b")
    main = load_runner("seed_spread").main
    with pytest.raises(SystemExit, match="neither an eval.json nor a directory"):
        main(["--group", "a", str(tmp_path / "missing")])
    (tmp_path / "eval.json").write_text(json.dumps(_eval(0.5, 0.0)))
    out = tmp_path / "spread.json"
    table = main(["--group", "a", str(tmp_path), str(tmp_path / "eval.json"), "--output", str(out)])
    assert table["a"][0]["num_seeds"] == 2 and json.loads(out.read_text()) == table
