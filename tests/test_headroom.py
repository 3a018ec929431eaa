"""Structural headroom (envs/headroom.py): choices on one split, accuracy read on another."""
import pytest

from envs.headroom import budget_headroom, headroom_report

SHARES = {"a": 0.5, "b": 0.5}
P95 = {"cheap": 10.0, "for_a": 20.0, "for_b": 20.0, "full": 40.0}
VAL = {"cheap": {"a": 0.5, "b": 0.5}, "for_a": {"a": 0.9, "b": 0.5}, "for_b": {"a": 0.5, "b": 0.8},
       "full": {"a": 0.9, "b": 0.8}}


def test_family_oracle_beats_the_best_static_where_the_families_need_different_configs():
    r = budget_headroom(VAL, VAL, P95, SHARES, 25.0)
    assert r["best_static"] == "for_a" and r["family_choice"] == {"a": "for_a", "b": "for_b"}
    assert r["best_static_accuracy"] == pytest.approx(0.7) and r["family_oracle_accuracy"] == pytest.approx(0.85)
    assert r["headroom"] == pytest.approx(0.15) and r["configs_that_fit"] == 3
    # where the full configuration fits, one static choice serves every family: no headroom
    assert budget_headroom(VAL, VAL, P95, SHARES, 40.0)["headroom"] == pytest.approx(0.0)
    assert budget_headroom(VAL, VAL, P95, SHARES, 5.0) is None


def test_choices_come_from_the_choosing_split_and_accuracy_from_the_reading_split():
    test = {c: dict(v) for c, v in VAL.items()}
    test["for_b"] = {"a": 0.5, "b": 0.55}  # val overstated for_b's gain on b
    r = budget_headroom(VAL, test, P95, SHARES, 25.0)
    assert r["family_choice"]["b"] == "for_b"  # chosen on val ...
    assert r["family_oracle_accuracy"] == pytest.approx(0.5 * 0.9 + 0.5 * 0.55)  # ... read on test
    assert r["headroom"] == pytest.approx(0.725 - 0.7)


def test_report_summarises_and_rejects_mismatched_tables():
    report = headroom_report(VAL, VAL, P95, SHARES, [5.0, 25.0, 40.0])
    assert report["budgets_without_a_fitting_config"] == [5.0]
    assert report["mean_headroom"] == pytest.approx(0.075) and report["budgets_with_headroom_ge_0.04"] == 1
    with pytest.raises(ValueError, match="same configurations"):
        headroom_report(VAL, {"cheap": VAL["cheap"]}, P95, SHARES, [25.0])
    with pytest.raises(ValueError, match="sum to 1"):
        headroom_report(VAL, VAL, P95, {"a": 0.5, "b": 0.6}, [25.0])


def test_undominated_configs_show_where_the_knob_structure_leaves_room_for_headroom():
    # knob values (tier, blocks): for_a buys tier, for_b buys blocks, full both
    knobs = {"cheap": (0, 0), "for_a": (1, 0), "for_b": (0, 1), "full": (1, 1)}
    report = headroom_report(VAL, VAL, P95, SHARES, [15.0, 25.0, 40.0], knobs)
    undominated = [r["undominated_configs"] for r in report["budgets"]]
    # one largest fitting config (cheap alone, then full) leaves no room; for_a vs for_b does
    assert undominated == [["cheap"], ["for_a", "for_b"], ["full"]]
    assert report["budgets_with_two_or_more_undominated_configs"] == 1
    assert [round(r["headroom"], 6) for r in report["budgets"]] == [0.0, 0.15, 0.0]
    with pytest.raises(ValueError, match="knobs must cover"):
        headroom_report(VAL, VAL, P95, SHARES, [25.0], {"cheap": (0, 0)})
