"""Write the structural-headroom report of a model into its profile.json (and print the table).

    python runners/headroom.py --grid envs/assets/budgetvlm-molmoe-tiny/eval.json \
        --profile envs/assets/budgetvlm-molmoe-tiny/profile.json [--num_budgets 8]

--grid is pretraining's eval.json written with `--grid all`: every static configuration's accuracy
per family on the val and the test split (batched greedy decoding, runners/pretrain_vlm.py).
--profile is runners/profile.py's profile.json: each configuration's batch-1 p95 latency and the
budget range. Choices are made on val, accuracies read on test (envs/headroom.py), at
--num_budgets budgets evenly spanning budget_range_ms; the report goes into profile.json's
`headroom` section.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from agents.budget_sweep import default_budgets
from agents.cli import user_input
from envs.data.synthvqa import FAMILIES
from envs.headroom import headroom_report


def config_name(entry: dict) -> str:
    return f"{entry['tier']}/k{entry['top_k']}/N{entry['num_blocks']}"


def load_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", required=True, type=Path, help="pretraining eval.json with a 'grid' (--grid all)")
    ap.add_argument("--profile", required=True, type=Path, help="profile.json to read latencies from and write into")
    ap.add_argument("--num_budgets", type=int, default=8)
    args = ap.parse_args(argv)
    evaluation = load_json(args.grid, "--grid")
    grid = evaluation.get("grid")
    if not isinstance(grid, dict) or not {"val", "test"} <= set(grid):
        raise ValueError(f"--grid {args.grid}: no 'grid' with 'val' and 'test' tables; write it with "
                         "runners/pretrain_vlm.py --grid all")
    profile = load_json(args.profile, "--profile")
    p95 = {config_name(c): c["latency_p95_ms"] for c in profile["configs"]}
    tables = {split: {name: {f: row[f] for f in FAMILIES} for name, row in grid[split].items()}
              for split in ("val", "test")}
    shares = {f: 1 / len(FAMILIES) for f in FAMILIES}  # SynthVQA's val and test splits: equal shares
    budgets = default_budgets(profile["budget_range_ms"], args.num_budgets)
    tiers = profile["meta"]["knob_space"]["tiers"]  # cheapest first
    knobs = {config_name(c): (tiers.index(c["tier"]), c["top_k"], c["num_blocks"]) for c in profile["configs"]}
    report = headroom_report(tables["val"], tables["test"], p95, shares, budgets, knobs)
    report["sources"] = {"accuracy": str(args.grid), "latency": str(args.profile),
                         "val_samples": evaluation.get("args", {}).get("val_samples"),
                         "test_samples": evaluation.get("args", {}).get("eval_samples")}
    profile["headroom"] = report
    tmp = args.profile.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(profile, indent=2) + "\n")
    os.replace(tmp, args.profile)
    print("| budget (ms) | best static (test acc) | family oracle | headroom | family choices (val) | undominated configs |")
    print("|---|---|---|---|---|---|")
    for r in report["budgets"]:
        choices = ", ".join(f"{f}: {c}" for f, c in r["family_choice"].items())
        print(f"| {r['budget_ms']:.1f} | {r['best_static']} ({r['best_static_accuracy']:.3f}) | "
              f"{r['family_oracle_accuracy']:.3f} | {100 * r['headroom']:+.1f} | {choices} | "
              f"{', '.join(r['undominated_configs'])} |")
    print(f"mean headroom {100 * report['mean_headroom']:+.1f} points; "
          f">= 4 points at {report['budgets_with_headroom_ge_0.04']} of {len(report['budgets'])} budgets; "
          f"two or more undominated configs at {report['budgets_with_two_or_more_undominated_configs']}")
    return report


if __name__ == "__main__":
    with user_input():  # a user's mistake: one line and status 2
        main()
