"""Evaluate a trained controller against static configurations, lookup tables and the oracle.

    python runners/evaluate.py --checkpoint RUN_DIR_OR_CKPT --output_dir DIR [--split test]
        [--num_samples N] [--budgets B1 B2 ... | --num_budgets K] [--policies P ...]
        [--backend dummy|vlm] [--model_path DIR] [--results_dir DIR] [--config YAML]

Policies (default: controller lookup-mean lookup-p95 oracle random):
  controller                  the checkpoint's controller, greedy actions
  static:<tier>,<top_k>,<N>   one fixed configuration (insertion = the smallest p)
  lookup-mean / lookup-p95    per budget, the most accurate profiled configuration whose profiled
                              mean latency <= 1.05 x budget / p95 latency <= budget
  oracle                      per sample, the most accurate configuration whose measured latency
                              on that sample fits the budget (ties: the faster; none fits: the fastest)
  random                      uniform over all actions
Every policy sees the same samples (the first N of --split) and budgets (default: K evenly over the
training budget range). Static configurations run once per sample (a sample x config table of
accuracy and measured latency) and static / lookup / oracle rows for every budget come from that
table; controller and random run through the env at every budget.

The env and backend are rebuilt from the checkpoint's stored config; --config YAML keys override
it key by key, and the flags override both.

Lookup profile (--profile_source): `results_dir` reads profile.json from --results_dir (default:
the backend's results dir, i.e. beside the model); `closed_form` (dummy backend only) computes it
from the dummy's closed-form model over the val split (expected accuracy, exact mean and p95 of
the latency); `val` measures the config table on --profile_samples val samples. `auto` (default):
--results_dir if given, else the VLM's results dir, else closed_form on the dummy.

Writes to --output_dir: eval.json ({"rows": [...], "meta": {...}}), eval.csv, and PNG plots
(accuracy / latency / violation rate vs budget, the controller's knob choices vs budget).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

from agents.baselines import (
    DEFAULT_POLICIES,
    LOOKUP_MEAN_FACTOR,
    all_static_configs,
    dummy_closed_form_profile,
    load_profile,
    parse_policies,
    profile_from_table,
    profile_to_json,
)
from agents.budget_sweep import (
    check_budgets,
    configs_needed,
    default_budgets,
    env_policy_rows,
    families_of,
    measure_config_table,
    random_policy_rows,
    table_policy_rows,
)
from agents.checkpoint import actor_meta, build_actor, check_compatible, load_checkpoint
from agents.cli import user_input
from agents.config import config_from_dict
from agents.factory import make_backend_from_config, make_env
from agents.reporting import write_outputs
from envs.backends.base import check_split
from envs.machine import machine_info
from envs.reward import RewardWeights

PROFILE_SOURCES = ("auto", "results_dir", "closed_form", "val")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a training output_dir (its best checkpoint)")
    p.add_argument("--output_dir", required=True, help="where eval.json, eval.csv and the plots go")
    p.add_argument("--config", help="YAML whose keys override the checkpoint's stored config")
    p.add_argument("--backend", choices=("dummy", "vlm", "molmoe"), help="env backend (default: the checkpoint's)")
    p.add_argument("--model_path", help="VLM model dir (default: the checkpoint's, else the shipped model)")
    p.add_argument("--results_dir", help="dir with profile.json (and importance.json for the VLM)")
    p.add_argument("--split", default="test", help="train, val or test (default test)")
    p.add_argument("--num_samples", type=int, help="first N samples of the split (default: config eval.test_samples)")
    budgets = p.add_mutually_exclusive_group()
    budgets.add_argument("--budgets", type=float, nargs="+", help="latency budgets in ms")
    budgets.add_argument("--num_budgets", type=int, default=8, help="K budgets evenly over the training range (default 8)")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES),
                   help="controller, static:<tier>,<top_k>,<num_blocks>, lookup-mean, lookup-p95, oracle, random")
    p.add_argument("--profile_source", choices=PROFILE_SOURCES, default="auto", help="where the lookup profile comes from")
    p.add_argument("--profile_samples", type=int, default=64, help="val samples measured for --profile_source val")
    p.add_argument("--batch_size", type=int, help="env rows per evaluation chunk (default: config eval.batch_size)")
    p.add_argument("--device", help="cpu or cuda (default: the checkpoint's)")
    p.add_argument("--seed", type=int, help="seed of the env and the random policy (default: the checkpoint's)")
    p.add_argument("--num_threads", type=int, help="torch CPU threads (default: config train.num_threads)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds over all configs before the table (default 1)")
    p.add_argument("--overwrite", action="store_true", help="write over an existing eval.json in --output_dir")
    return p.parse_args(argv)


def _merge(base: dict, override: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, values in override.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = dict(values) if isinstance(values, dict) else values
    return out


def resolve_config(args, ckpt: dict):
    """The checkpoint's stored config, then --config YAML keys, then the flags."""
    raw = ckpt.get("config")
    if raw is None and not args.config:
        raise ValueError(f"checkpoint {ckpt['path']} stores no config; pass --config YAML describing its env")
    raw = _merge({}, dict(raw or {}))
    trained_backend = (raw.get("env") or {}).get("backend", "dummy")
    if args.backend and args.backend != trained_backend:
        # Another backend than the checkpoint's: its backend options and model files do not apply.
        raw.setdefault("env", {})["backend_options"] = {}
        raw["data"] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        extra = yaml.safe_load(path.read_text()) or {}
        if not isinstance(extra, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
        raw = _merge(raw, extra)
    flags = {"env": {}, "data": {}, "train": {}}
    if args.backend:
        flags["env"]["backend"] = args.backend
    if args.model_path:
        flags["data"]["model_path"] = args.model_path
    if args.results_dir and (args.backend or (raw.get("env") or {}).get("backend", "dummy")) != "dummy":
        flags["data"]["results_dir"] = args.results_dir  # the VLM reads importance.json (and budgets) there
    if args.device:
        flags["train"]["device"] = args.device
    if args.seed is not None:
        flags["train"]["seed"] = args.seed
    if args.num_threads:
        flags["train"]["num_threads"] = args.num_threads
    return config_from_dict(_merge(raw, {k: v for k, v in flags.items() if v}))


def check_checkpoint_fits(ckpt: dict, cfg, backend) -> list[str]:
    """check_compatible plus the backend/model it was trained on; returns warnings."""
    meta = ckpt["policy_meta"]
    check_compatible(meta, actor_meta(backend, cfg.policy.hidden_dim, cfg.policy.sinusoidal_dim, cfg.policy.stage2_inputs), ckpt["path"])
    trained = meta.get("backend") or {}
    now = backend.describe()
    if trained.get("backend") and trained["backend"] != now["backend"]:
        raise ValueError(f"checkpoint {ckpt['path']} was trained on backend {trained['backend']!r}, but the env "
                         f"uses {now['backend']!r}; pass --backend / --model_path matching the checkpoint")
    warnings = []
    if trained.get("model_path") and trained["model_path"] != now.get("model_path"):
        warnings.append(f"checkpoint was trained on model {trained['model_path']}, evaluating on {now.get('model_path')}")
    if list(meta.get("budget_range_ms", [])) != list(backend.budget_range_ms):
        warnings.append(f"checkpoint's budget range {meta.get('budget_range_ms')} differs from the backend's "
                        f"{list(backend.budget_range_ms)}")
    return warnings


def resolve_profile(args, backend, knob_space, log) -> tuple[list, dict]:
    source = args.profile_source
    if source == "auto":
        if args.results_dir or backend.results_dir is not None:
            source = "results_dir"
        elif backend.has_closed_form:
            source = "closed_form"
        else:
            raise ValueError(f"no profile source for backend {type(backend).__name__}; pass --results_dir or "
                             f"--profile_source val")
    if source == "results_dir":
        results_dir = Path(args.results_dir) if args.results_dir else backend.results_dir
        if results_dir is None:
            raise ValueError("--profile_source results_dir needs --results_dir DIR (this backend has no results dir)")
        entries, other = load_profile(results_dir, knob_space)
        info = {"source": "results_dir", "path": str(Path(results_dir) / "profile.json"),
                **{k: other[k] for k in ("num_samples", "machine", "budget_range_ms") if k in other}}
        return entries, info
    if source == "closed_form":
        if not backend.has_closed_form:
            raise ValueError(f"--profile_source closed_form needs the dummy backend, not {type(backend).__name__}")
        entries = dummy_closed_form_profile(backend, "val")
        return entries, {"source": "closed_form", "split": "val", "num_samples": len(backend.dataset("val")),
                         "note": "dummy closed-form model: expected accuracy, exact mean / p95 of the log-normal "
                                 "latency mixture over the val split, at the smallest insertion position"}
    n = min(args.profile_samples, len(backend.dataset("val")))
    if n < 1:
        raise ValueError(f"--profile_samples={args.profile_samples}: expected >= 1")
    log(f"profile: measuring every static configuration on {n} val samples")
    table = measure_config_table(backend, backend.dataset("val"), range(n), all_static_configs(knob_space),
                                 warmup=args.warmup, progress=log)
    return profile_from_table(table.configs, table.accuracy, table.latency), {
        "source": "val", "split": "val", "num_samples": int(table.sample_index.numel()),
        "seconds": round(table.seconds, 2), "note": "measured config table on the val split"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    with user_input():
        return _run(args, lambda msg: print(msg, file=sys.stderr, flush=True))


def _run(args, log) -> dict:
    out = Path(args.output_dir)
    if (out / "eval.json").exists() and not args.overwrite:
        raise ValueError(f"output_dir {out} already holds eval.json; pass --overwrite or choose another --output_dir")
    if args.budgets is not None:
        budgets = check_budgets(args.budgets)
    elif args.num_budgets < 1:
        raise ValueError(f"--num_budgets={args.num_budgets}: expected >= 1")
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num_samples={args.num_samples}: expected >= 1")

    ckpt = load_checkpoint(args.checkpoint)
    cfg = resolve_config(args, ckpt)
    from envs.machine import resolve_device

    resolve_device(cfg.train.device, "--device")  # before the backend is built or anything written
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    backend = make_backend_from_config(cfg)
    ks = backend.knob_space
    specs = parse_policies(args.policies, ks)  # before the checkpoint check: a typo fails first
    warnings = check_checkpoint_fits(ckpt, cfg, backend)
    for w in warnings:
        log(f"warning: {w}")
    if args.budgets is None:
        budgets = default_budgets(backend.budget_range_ms, args.num_budgets)
    lo, hi = backend.budget_range_ms
    outside = [b for b in budgets if not lo <= b <= hi]
    if outside:
        log(f"warning: budgets {outside} lie outside the training range [{lo}, {hi}] ms")

    weights = RewardWeights.from_dict(cfg.env.reward)
    profile, profile_info = None, None
    if any(s.needs_profile for s in specs):
        profile, profile_info = resolve_profile(args, backend, ks, log)

    split = check_split(args.split)
    samples = backend.dataset(split)
    n = min(args.num_samples or cfg.eval.test_samples, len(samples))
    sample_index = torch.arange(n)
    timings = {}

    table = None
    if any(s.needs_table for s in specs):
        configs = configs_needed(specs, all_static_configs(ks), profile, budgets)
        log(f"config table: {n} {split} samples x {len(configs)} static configurations")
        table = measure_config_table(backend, samples, sample_index.tolist(), configs, warmup=args.warmup,
                                     seed=cfg.train.seed, progress=log)
        timings["config_table"] = round(table.seconds, 2)
        if table.skipped:
            log(f"warning: {len(table.skipped)} samples skipped (unreadable images); all policies use the rest")
        sample_index = table.sample_index

    rows = []
    env = None
    reference = backend.has_closed_form
    for spec in specs:
        start = time.perf_counter()
        if spec.needs_table:
            fam = families_of(samples, table.sample_index.tolist())
            rows += table_policy_rows(spec, table, budgets, ks, weights, fam, profile)
        else:
            if env is None:
                env = make_env(cfg, backend, split, args.batch_size or cfg.eval.batch_size, 1)
            if spec.kind == "controller":
                actor = build_actor(ckpt["policy_meta"]).to(cfg.train.device)
                actor.load_state_dict(ckpt["policy"])
                actor.eval()
                rows += env_policy_rows(env, actor, "controller", sample_index, budgets, greedy=True,
                                        reference=reference)
            else:
                rows += random_policy_rows(env, sample_index, budgets, seed=cfg.train.seed, reference=reference)
            log(f"{spec.name}: {len(budgets)} budgets x {sample_index.numel()} episodes, "
                f"{time.perf_counter() - start:.1f}s")
        timings[spec.name] = round(time.perf_counter() - start, 3)

    meta = {
        "machine": machine_info(),
        "checkpoint": ckpt["path"],
        "checkpoint_step": ckpt.get("step"),
        "checkpoint_epoch": ckpt.get("epoch"),
        "split": split,
        "num_samples": int(sample_index.numel()),
        "sample_index": sample_index.tolist(),
        "skipped_samples": table.skipped if table is not None else [],
        "budgets": budgets,
        "budget_source": "given" if args.budgets is not None else f"{len(budgets)} evenly over the training range",
        "budget_range_ms": [lo, hi],
        "policies": [s.name for s in specs],
        "profile_source": profile_info,
        "profile": profile_to_json(profile) if profile is not None else None,
        "lookup_mean_factor": LOOKUP_MEAN_FACTOR,
        "static_insertion": min(ks.insertion_positions),
        "latency_note": "static/lookup/oracle: measured batch-1 preprocess+vision+prefill+decode with a zero budget "
                        "token, one run per (sample, config) shared by all budgets; controller: the env's latency, "
                        "which includes both controller stages' own time, each measured for the request at batch 1",
        "num_configs_measured": len(table.configs) if table is not None else 0,
        "timings_s": timings,
        "warnings": warnings,
        "backend": backend.describe(),
        "reward_weights": weights.to_dict(),
        "config": cfg.to_dict(),
        "command": sys.argv,
    }
    paths = write_outputs(rows, meta, out)
    log(f"wrote {', '.join(str(p) for p in paths.values())}")
    _print_table(rows)
    return {"rows": rows, "meta": meta}


def _print_table(rows) -> None:
    print(f"{'policy':<22}{'budget':>8}{'acc':>7}{'lat':>8}{'p95':>8}{'viol':>6}{'reward':>8}  config")
    for r in rows:
        print(f"{r['policy']:<22}{r['budget_ms']:>8.1f}{r['accuracy_mean']:>7.3f}{r['latency_mean_ms']:>8.1f}"
              f"{r['latency_p95_ms']:>8.1f}{r['violation_rate']:>6.2f}{r['reward_mean']:>8.3f}  {r.get('config', '')}")


if __name__ == "__main__":
    main()
