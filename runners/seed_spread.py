"""Mean and spread over seeds of several evaluations (issue 10: the Stage-2 input ablation, seeds).

    python runners/seed_spread.py --group token runs/s2-token-*/eval --group elapsed runs/s2-elapsed-*/eval \
        [--reference token] [--output spread.json]

Each --group is a name and the eval dirs (or eval.json files) of its seeds, all evaluated at the
same budgets. Prints, per group, policy and budget, the mean and standard deviation of accuracy and
violation rate; with --reference, each other group's controller also gets the difference of means
and "tie" where it is within the larger spread.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agents.cli import user_input
from agents.reporting import seed_spread
from envs.files import write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "EVAL"),
                   help="a group name and the eval dirs / eval.json files of its seeds")
    p.add_argument("--reference", help="group the others' controllers are compared with")
    p.add_argument("--output", help="write the table as JSON here too")
    return p.parse_args(argv)


def read_eval(path: str) -> dict:
    file = Path(path) / "eval.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--group: {path} is neither an eval.json nor a directory holding one")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--group: {file} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"--group: {file} has no 'rows'; expected runners/evaluate.py's eval.json")
    return data


def main(argv=None) -> dict:
    args = parse_args(argv)
    with user_input():
        groups = {}
        for name, *paths in args.group:
            if not paths:
                raise ValueError(f"--group {name}: expected a name and at least one eval dir")
            if name in groups:
                raise ValueError(f"--group {name} is given twice")
            groups[name] = [read_eval(p) for p in paths]
        table = seed_spread(groups, args.reference)
        if args.output:
            write_json(Path(args.output), table)
    print(f"{'group':<16}{'policy':<20}{'budget':>8}{'seeds':>6}{'accuracy':>16}{'violation':>16}  vs reference")
    for name, rows in table.items():
        for r in rows:
            vs = ""
            if f"accuracy_mean_minus_{args.reference}" in r:
                d = r[f"accuracy_mean_minus_{args.reference}"]
                vs = f"{d:+.3f}" + (" (tie)" if r[f"accuracy_mean_tie_with_{args.reference}"] else "")
            print(f"{name:<16}{r['policy']:<20}{r['budget_ms']:>8.1f}{r['num_seeds']:>6}"
                  f"{r['accuracy_mean']:>9.3f} ±{r['accuracy_mean_std']:.3f}"
                  f"{r['violation_rate']:>9.3f} ±{r['violation_rate_std']:.3f}  {vs}", file=sys.stdout)
    return table


if __name__ == "__main__":
    main()
