"""RESULTS 0-s18's margin table: lookup-calibrated and the family oracle re-chosen on an evaluation's
calibration (its second pass) with each configuration's calibration latency quantile q <= budget
instead of its p95, by the same selection rules (agents.baselines.lookup_select,
envs.headroom.headroom_choices), read on the same run's test table.

    python docs/results/headline18_margin.py runs/eval18      # an evaluate.py output dir
"""
import json
import statistics
import sys
from dataclasses import replace

import torch

from agents.baselines import StaticChoice, lookup_select
from agents.budget_sweep import Calibration, ConfigTable, calibration_tables, calibrated_profile
from envs.headroom import headroom_choices
from envs.knobs import KnobSpace


def config(name: str, insertion: int) -> StaticChoice:
    tier, top_k, num_blocks = name.split(",")
    return StaticChoice(tier, int(top_k), int(num_blocks), insertion)


def table(t: dict) -> ConfigTable:
    configs = [config(n, p) for n, p in zip(t["configs"], t["insertion"])]
    return ConfigTable(torch.tensor(t["sample_index"]), configs, torch.tensor(t["accuracy"], dtype=torch.float64),
                       torch.tensor(t["latency_ms"], dtype=torch.float64))


meta = json.load(open(f"{sys.argv[1]}/eval.json"))["meta"]
test, families, budgets = table(meta["config_tables"]["test"]), meta["sample_families"], meta["budgets"]
calibration = Calibration(table(meta["config_tables"]["calibration"]), meta["config_tables"]["calibration"]["families"])
ks = KnobSpace()
shares = {f: families.count(f) / len(families) for f in sorted(set(families))}
rows = torch.arange(len(families))
for q in (0.90, 0.95, 0.97, 0.98, 0.99):
    quantile = {c.name: float(torch.quantile(calibration.table.latency[:, j], q)) for j, c in enumerate(calibration.table.configs)}
    profile = [replace(e, latency_p95_ms=quantile[e.config.name]) for e in calibrated_profile(calibration, ks)]
    by_name, choose, _ = calibration_tables(calibration, ks)
    lc, fo = [], []
    for b in budgets:
        j = test.column(lookup_select(profile, b, "p95")[0])
        lc.append((float(test.accuracy[:, j].mean()), float((test.latency[:, j] > b).double().mean())))
        picked = headroom_choices(choose, quantile, shares, b)
        pick = ({f: min(quantile, key=quantile.get) for f in shares} if picked is None else picked[1])
        cols = torch.tensor([test.column(by_name[pick[f]]) for f in families])
        fo.append((float(test.accuracy[rows, cols].mean()), float((test.latency[rows, cols] > b).double().mean())))
    mean = lambda xs, i: statistics.fmean(x[i] for x in xs)
    print(f"q {q:.2f}: lookup-calibrated {mean(lc, 0):.3f} ({100 * mean(lc, 1):.1f}%)  family oracle {mean(fo, 0):.3f} "
          f"({100 * mean(fo, 1):.1f}%), per budget {[round(100 * v, 1) for _, v in fo]}%")
