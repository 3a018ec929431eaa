"""agents/warm_start.py: the lookup warm start teaches both stages the profile's lookup-p95 choice;
and the profile drift it (and train.py's report) reads."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from agents.baselines import (ProfileEntry, StaticChoice, dummy_closed_form_profile, profile_latency_scales,
                              rescale_profile, shield_from_profile)
from agents.budget_sweep import default_budgets
from agents.config import config_from_dict
from agents.factory import (REQUEST_BUDGETS, equal_budget_edges, make_actor, make_backend_from_config, make_env,
                            make_family_table, measure_profile_drift, warm_start_actor)
from agents.rollout import collect_rollouts
from agents.warm_start import (add_controller_time, family_requests, family_select, lookup_targets, measure_request_mix,
                               request_ceilings, request_mix_values, taught_request_mix)
from helpers import load_runner
from train_runs import TINY, tiny_config, train_main


def _config(**policy):
    raw = json.loads(json.dumps(TINY))
    raw["policy"].update(policy)
    return config_from_dict(raw)


def test_warm_started_controller_acts_as_the_lookup_table():
    # Stage 2 reads the remaining budget too: the dummy's latency token carries the budget only weakly.
    cfg = _config(warm_start="lookup", warm_start_samples=256, warm_start_steps=300, warm_start_label_smoothing=0.0,
                  stage2_inputs="token+elapsed")
    torch.manual_seed(0)  # the initial policy and the rollouts' draws, whatever ran before
    backend = make_backend_from_config(cfg)
    actor, _ = make_actor(cfg, backend)
    entries = dummy_closed_form_profile(backend, "val")
    env = make_env(cfg, backend, "val", 64, 1)

    def agreement(entries):
        rollout = collect_rollouts(env, actor, greedy=True)
        target = lookup_targets(entries, rollout["budget_ms"][:, 0], backend.knob_space)
        return {h: float((rollout["action", h][:, 0 if h in ("tier", "insertion") else 1].reshape(-1) == target[h])
                         .float().mean()) for h in target}

    before = agreement(entries)
    metrics, _ = warm_start_actor(cfg, actor, backend)
    # The table the controller imitates charges every configuration the controller's own time.
    assert metrics["warm_start/controller_p95_ms"] > 0
    after = agreement(add_controller_time(entries, metrics["warm_start/controller_p95_ms"]))
    assert set(metrics) >= {"warm_start/loss_tier", "warm_start/loss_insertion", "warm_start/agreement_top_k",
                            "warm_start/agreement_num_blocks"}
    # Greedy actions on held-out requests follow the lookup table after the warm start, not before
    # (seeds 0-2: top-k 0.91-0.94, blocks 0.95-0.97; 0.55-0.72 and 0.70-0.83 when Stage 2's data
    # paired one request's latency token with another request's target).
    assert after["top_k"] >= 0.85 and after["num_blocks"] >= 0.85, after
    assert after["top_k"] + after["num_blocks"] >= before["top_k"] + before["num_blocks"] + 0.5, (before, after)


def test_train_logs_the_warm_start_before_the_first_validation(tmp_path):
    config = tiny_config(tmp_path, policy={**TINY["policy"], "warm_start": "lookup", "warm_start_samples": 32,
                                           "warm_start_steps": 20}, train={"num_epochs": 1})
    out = tmp_path / "run"
    train_main("--config", config, "--output_dir", out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warm = [r for r in rows if "warm_start/loss_tier" in r]
    assert len(warm) == 1 and warm[0]["step"] == 0
    first_val = next(i for i, r in enumerate(rows) if "val/accuracy_mean" in r)
    assert rows.index(warm[0]) < first_val


@pytest.mark.parametrize("policy, match", [
    ({"warm_start": "oracle"},
     r"policy.warm_start='oracle': expected one of \[None, 'lookup', 'family_lookup', 'family_request'\]"),
    ({"warm_start": "family_request", "latency_shield": False},
     r"policy.warm_start='family_request' .* but policy.latency_shield=False: set it to true"),
    ({"warm_start": "lookup", "warm_start_samples": 0}, r"policy.warm_start_samples=0: expected an integer >= 1"),
    ({"warm_start": "lookup", "warm_start_lr": 0.0}, r"policy.warm_start_lr=0.0: expected a learning rate > 0"),
    ({"warm_start": "lookup", "warm_start_label_smoothing": 1.0},
     r"policy.warm_start_label_smoothing=1.0: expected a value in \[0, 1\)"),
    ({"warm_start": "family_request", "latency_shield": True, "warm_start_request_bins": 0},
     r"policy.warm_start_request_bins=0: expected an integer in \[1, 32\]"),
])
def test_bad_warm_start_settings_name_the_field(tmp_path, policy, match):
    config = tiny_config(tmp_path, policy={**TINY["policy"], **policy})
    with pytest.raises((ValueError, SystemExit), match=match):
        train_main("--config", config, "--output_dir", tmp_path / "run")


class _TimedBackend:
    """Episodes whose latency is fixed per tier (ms): what profile_latency_scales measures."""
    d_model = 4

    def __init__(self, ms_per_tier):
        self.ms_per_tier = ms_per_tier

    def start_episode(self, sample, tier, budget):
        return {"tier": tier}

    def run_to(self, episode, insertion):
        pass

    def finish(self, episode, top_k, num_blocks):
        ms = self.ms_per_tier[episode["tier"]] * (1 + 0.1 * (num_blocks - 12))
        return SimpleNamespace(timings_ms={"preprocess": 0.0, "vision": 0.0, "prefill": ms / 2, "decode": ms / 2})


def test_profile_drift_is_this_machines_mean_over_the_profiles_per_tier():
    entries = [ProfileEntry(StaticChoice(t, k, n, 1), 0.5, base * (1 + 0.1 * (n - 12)), base * (1 + 0.1 * (n - 12)))
               for t, base in (("low", 10.0), ("high", 40.0)) for k in (4, 8) for n in (12, 16)]
    backend = _TimedBackend({"low": 12.0, "high": 30.0})  # low runs 20% slower, high 25% faster
    scales = profile_latency_scales(backend, entries, samples=[None] * 4)
    assert scales == {"low": pytest.approx(1.2), "high": pytest.approx(0.75)}
    scaled = rescale_profile(entries, scales)
    assert [e.latency_p95_ms for e in scaled[:2]] == [pytest.approx(12.0), pytest.approx(16.8)]
    assert scaled[-1].latency_mean_ms == pytest.approx(0.75 * entries[-1].latency_mean_ms)


def test_drift_report_warns_only_beyond_the_tolerance(capsys):
    report_drift = load_runner("train").report_drift
    report_drift({"low": 1.05, "high": 1.44}, range_rescaled=False)
    out = capsys.readouterr()
    assert "low x1.05, high x1.44" in out.out
    assert "tier(s) high run more than 10% off" in out.err and "low" not in out.err.split("tier(s)")[1].split("run")[0]
    assert "the budget range is not (env.budget_range profile)" in out.err
    report_drift({"high": 1.44}, range_rescaled=True)  # env.budget_range machine
    assert "the lookup tables and budget range are rescaled by these ratios" in capsys.readouterr().err
    report_drift({"low": 0.95}, range_rescaled=False)
    assert capsys.readouterr().err == ""


def test_no_drift_is_measured_without_profiled_configurations(tmp_path):
    # A profile.json may hold only the budget range (make_tiny_model_dir's): nothing to compare with.
    assert measure_profile_drift(SimpleNamespace(results_dir=None)) is None
    assert measure_profile_drift(SimpleNamespace(results_dir=tmp_path)) is None  # no profile.json
    (tmp_path / "profile.json").write_text(json.dumps({"budget_range_ms": [5.0, 50.0]}))
    assert measure_profile_drift(SimpleNamespace(results_dir=tmp_path)) is None


def test_family_select_takes_the_family_best_fitting_configuration():
    cheap, mid, big = StaticChoice("low", 4, 12, 1), StaticChoice("medium", 4, 12, 1), StaticChoice("high", 8, 16, 1)
    entries = [ProfileEntry(cheap, 0.60, 10.0, 12.0), ProfileEntry(mid, 0.70, 20.0, 22.0), ProfileEntry(big, 0.80, 30.0, 32.0)]
    table = {"coarse": {cheap.name: 1.0, mid.name: 1.0, big.name: 1.0}, "detail": {cheap.name: 0.2, mid.name: 0.9, big.name: 0.95}}
    assert family_select(entries, table, 40.0, "coarse") == cheap  # a tie on accuracy: the lower p95
    assert family_select(entries, table, 40.0, "detail") == big
    assert family_select(entries, table, 25.0, "detail") == mid
    assert family_select(entries, table, 25.0, "knowledge") == mid  # not in the table: lookup-p95
    assert family_select(entries, table, 5.0, "detail") == cheap  # nothing fits: the fastest


def test_family_warm_start_follows_each_family_choice():
    cfg = _config(warm_start="family_lookup", warm_start_samples=256, warm_start_steps=300,
                  warm_start_label_smoothing=0.0, stage2_inputs="token+elapsed")
    torch.manual_seed(0)
    backend = make_backend_from_config(cfg)
    actor, _ = make_actor(cfg, backend)
    entries, table = dummy_closed_form_profile(backend, "val"), make_family_table(backend)
    env = make_env(cfg, backend, "test", 64, 1)  # held out: the table is the val split's
    entries = add_controller_time(entries, warm_start_actor(cfg, actor, backend)[0]["warm_start/controller_p95_ms"])
    rollout = collect_rollouts(env, actor, greedy=True)
    families = [env.samples[int(i)].family for i in rollout["sample_index"][:, 0].reshape(-1)]
    target = lookup_targets(entries, rollout["budget_ms"][:, 0], backend.knob_space, families, table)
    plain = lookup_targets(entries, rollout["budget_ms"][:, 0], backend.knob_space)
    tier = rollout["action", "tier"][:, 0].reshape(-1)
    assert bool((target["tier"] != plain["tier"]).any())  # the families do choose differently here
    assert float((tier == target["tier"]).float().mean()) >= 0.85


def test_family_warm_start_without_a_val_grid_names_the_file(tmp_path):
    backend = SimpleNamespace(has_closed_form=False, model_path=tmp_path, knob_space=None)
    with pytest.raises(ValueError, match=r"family_lookup.*eval\.json.*pretrain_vlm\.py --grid all"):
        make_family_table(backend)


def test_family_requests_pick_the_plan_whose_shielded_cuts_score_best_over_the_budgets():
    from envs.knobs import KnobSpace
    from envs.shield import LatencyShield

    ks = KnobSpace(tiers=("low", "high"), insertion_positions=(1, 2), top_k_values=(4, 8), num_blocks_values=(12, 16))
    # p95 ms: low 10 / 14 (k 4, N 12 / 16), 12 / 16 (k 8); high 20 / 24, 22 / 30
    shield = LatencyShield(ks, torch.tensor([[[10.0, 14.0], [12.0, 16.0]], [[20.0, 24.0], [22.0, 30.0]]]))
    names = [f"{t},{k},{n}" for t in ks.tiers for k in (4, 8) for n in (12, 16)]
    table = {"detail": {c: 0.95 if c.startswith("high") else 0.2 for c in names},  # only the tier counts
             "knowledge": {c: 1.0 if c.endswith("16") else 0.5 for c in names}}  # only the blocks count
    budgets = [10.0, 15.0, 20.0, 25.0, 30.0, 35.0]
    requests = family_requests(shield, table, budgets)
    # detail: the high tier wherever its cheapest plan fits; every high request is cut alike, so the cheapest one
    assert requests["detail"] == StaticChoice("high", 4, 12, 1)
    # knowledge: 16 blocks at the low tier from 15 ms up (0.917 averaged); asking for the high tier would trade
    # the blocks for it at 20 ms (0.833); low/k8/N16 scores the same as low/k4/N16 but costs more
    assert requests["knowledge"] == StaticChoice("low", 4, 16, 1)
    lacking = {"detail": {c: a for c, a in table["detail"].items() if c != "low,4,12"}}
    assert family_requests(shield, lacking, budgets) == {}  # every request is cut to low/k4/N12 at 10 ms


@pytest.mark.parametrize("bins", [1, 4])
def test_family_request_warm_start_asks_each_family_one_plan_per_part_of_the_budget_range(bins):
    cfg = _config(warm_start="family_request", warm_start_samples=256, warm_start_steps=300,
                  warm_start_label_smoothing=0.0, stage2_inputs="token+elapsed", latency_shield=True,
                  warm_start_request_bins=bins)
    torch.manual_seed(0)
    backend = make_backend_from_config(cfg)
    actor, _ = make_actor(cfg, backend)
    entries, table = dummy_closed_form_profile(backend, "val"), make_family_table(backend)
    entries = add_controller_time(entries, warm_start_actor(cfg, actor, backend)[0]["warm_start/controller_p95_ms"])
    shield, budgets = shield_from_profile(entries, backend.knob_space), default_budgets(backend.budget_range_ms,
                                                                                        REQUEST_BUDGETS)
    edges = equal_budget_edges(backend.budget_range_ms, bins)
    requests = [family_requests(shield, table, [b for b in budgets if lo <= b < hi])
                for lo, hi in zip([-math.inf, *edges], [*edges, math.inf])]
    assert any(len({r.name for r in part.values()}) > 1 for part in requests)  # the families ask for different plans
    if bins > 1:  # ... and a family asks for different plans in different parts of the range
        assert any(len({r[f].name for r in requests}) > 1 for f in requests[0])
    env = make_env(cfg, backend, "test", 64, 1)  # held out: the table is the val split's
    rollout = collect_rollouts(env, actor, greedy=True)
    families = [env.samples[int(i)].family for i in rollout["sample_index"][:, 0].reshape(-1)]
    target = lookup_targets(entries, rollout["budget_ms"][:, 0], backend.knob_space, families, table, requests, edges)
    for head in ("tier", "top_k", "num_blocks"):  # the actions asked for, before the env's shield cuts them
        step = 0 if head == "tier" else 1
        asked = rollout["action", head][:, step].reshape(-1)
        assert float((asked == target[head]).float().mean()) >= 0.85, head


def test_taught_values_give_each_request_the_accuracy_of_the_families_asking_for_it():
    from envs.knobs import KnobSpace

    ks = KnobSpace(tiers=("low", "high"), insertion_positions=(1, 2), top_k_values=(4, 8), num_blocks_values=(12, 16))
    table = {"coarse": {"low,4,12": 1.0, "low,4,16": 1.0, "high,4,16": 1.0},
             "knowledge": {"low,4,12": 0.5, "low,4,16": 1.0, "high,4,16": 1.0},
             "detail": {"low,4,12": 0.2, "low,4,16": 0.2, "high,4,16": 0.9}}
    mix = taught_request_mix([{"coarse": "low,4,16", "knowledge": "low,4,16"}, {"detail": "high,4,16"}], table, ks)
    assert mix == {(0, 0, 1): {"coarse": 1.0, "knowledge": 1.0}, (1, 0, 1): {"detail": 1.0}}
    values = request_mix_values(mix, table, ks)
    assert set(values) == {(0, 0, 1), (1, 0, 1)}
    shared = values[(0, 0, 1)]  # coarse's and knowledge's mean
    assert float(shared[0, 0, 0]) == 0.75 and float(shared[0, 0, 1]) == 1.0 and float(shared[1, 0, 1]) == 1.0
    assert math.isnan(float(shared[1, 1, 1]))  # a plan the family table lacks
    assert float(values[(1, 0, 1)][1, 0, 1]) == 0.9
    with pytest.raises(ValueError, match=r"family request 'reasoning': 'low,4,16': the family table has no family"):
        taught_request_mix([{"reasoning": "low,4,16"}], table, ks)


def test_request_mix_values_weigh_each_family_by_how_often_it_makes_the_request():
    from envs.knobs import KnobSpace

    ks = KnobSpace(tiers=("low", "high"), insertion_positions=(1, 2), top_k_values=(4, 8), num_blocks_values=(12, 16))
    table = {"coarse": {"low,4,12": 1.0, "low,4,16": 1.0}, "knowledge": {"low,4,12": 0.5, "low,4,16": 1.0}}
    values = request_mix_values({(0, 0, 0): {"coarse": 3, "knowledge": 1}, (0, 0, 1): {"knowledge": 2}}, table, ks)
    assert float(values[(0, 0, 0)][0, 0, 0]) == 0.875 and float(values[(0, 0, 0)][0, 0, 1]) == 1.0
    assert float(values[(0, 0, 1)][0, 0, 0]) == 0.5  # only knowledge questions make it
    for mix, match in (({(0, 0, 0): {"reasoning": 1}}, r"families \['reasoning'\] make it, but the family table"),
                       ({(0, 0, 0): {"coarse": 0}}, r"family weights \{'coarse': 0\}: expected finite weights >= 0"),
                       ({(0, 0, 0): {"coarse": -1, "knowledge": 2}}, "expected finite weights >= 0")):
        with pytest.raises(ValueError, match=match):
            request_mix_values(mix, table, ks)


def test_a_measured_requests_ceiling_is_the_largest_plan_taught_to_a_family_that_makes_it():
    taught = {(0, 0, 1): {"coarse": 1.0}, (0, 0, 4): {"knowledge": 1.0}, (1, 0, 4): {"reasoning": 1.0},
              (2, 0, 1): {"detail": 1.0}}
    mix = {(0, 0, 1): {"coarse": 60, "knowledge": 20},  # some knowledge questions ask for coarse's plan
           (0, 1, 2): {"knowledge": 3},  # a request nobody was taught: its own knobs where they are larger
           (1, 0, 4): {"reasoning": 50, "detail": 0},  # a family with no questions behind it adds nothing
           (2, 0, 0): {"detail": 40}}
    assert request_ceilings(mix, taught) == {(0, 0, 1): (0, 0, 4), (0, 1, 2): (0, 1, 4), (1, 0, 4): (1, 0, 4),
                                             (2, 0, 0): (2, 0, 1)}
    assert request_ceilings(taught, taught) == {r: r for r in taught}  # taught requests: their own ceilings


def test_measure_request_mix_counts_the_families_behind_each_greedy_request():
    cfg = config_from_dict(TINY)
    backend = make_backend_from_config(cfg)
    actor = make_actor(cfg, backend)[0]
    env = make_env(cfg, backend, "train", 8, 1)
    mix = measure_request_mix(actor, env, 3)
    assert sum(sum(c.values()) for c in mix.values()) == 24
    seen = []  # the budgets the controller is asked at

    def recording(td):
        seen.append(td["budget_ms"].reshape(-1).clone())
        return actor(td)

    measure_request_mix(recording, env, 2, (30.0, 40.0))
    seen = torch.cat(seen)
    assert len(seen) == 32 and bool(((seen >= 30.0) & (seen <= 40.0)).all()) and float(seen.std()) > 1.0
    ks = backend.knob_space
    sizes = (len(ks.tiers), len(ks.top_k_values), len(ks.num_blocks_values))
    assert all(0 <= i < n for key in mix for i, n in zip(key, sizes))
    assert set().union(*mix.values()) <= set(make_family_table(backend))
    assert measure_request_mix(actor, make_env(cfg, backend, "train", 8, 1), 3) == mix  # greedy, seeded draws
