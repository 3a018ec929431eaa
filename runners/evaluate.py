"""Evaluate a trained controller against static configurations, lookup tables and the oracles,
all measured in the same run, interleaved in time.

    python runners/evaluate.py --checkpoint RUN_DIR_OR_CKPT [MORE ...] --output_dir DIR [--split test]
        [--num_samples N] [--budgets B1 B2 ... | --num_budgets K] [--policies P ...]
        [--calibration_samples M] [--calibration_split val] [--calibration_phase interleaved|first|two-pass]
        [--backend dummy|vlm|molmoe] [--model_path DIR] [--results_dir DIR] [--config YAML]

Policies (default: controller lookup-calibrated family-oracle lookup-mean lookup-p95 oracle random;
family-oracle is left out when the samples carry no question family):
  controller                  the checkpoint's controller, greedy actions; with several checkpoints
                              (e.g. the seeds of one config) one policy per checkpoint,
                              controller:<run dir name>, all in the same run, and meta.controller_spread
                              gives their mean and standard deviation per budget; with several
                              --latency_shield_quantile or --latency_shield_violation_target values,
                              every checkpoint behind each shield (controller:<run>@q<Q>, @v<T> / @voff,
                              @q<Q>+v<T> for both: every pair, or with --latency_shield_pairing zip the
                              i-th of each), grouped per shield, each group paired against the first
  static:<tier>,<top_k>,<N>   one fixed configuration (insertion = the smallest p)
  lookup-calibrated           per budget, the configuration with the best accuracy on the calibration
                              set (the first M samples of --calibration_split, disjoint from the test
                              samples, measured in this run) whose calibration p95 latency <= budget
  family-oracle               per budget and question family, the same choice made per family
                              (envs.headroom's rule): chosen on calibration, accuracy read on test
  lookup-mean / lookup-p95    per budget, the most accurate profiled configuration whose profiled
                              mean latency <= 1.05 x budget / p95 latency <= budget (profile.json:
                              measured on another day, so latency drift is not accounted for)
  oracle                      per sample, the most accurate configuration whose measured latency
                              on that sample fits the budget (ties: the faster; none fits: the fastest);
                              with --calibration_phase two-pass, among the configurations the test
                              rounds ran (the first pass's frontiers; meta.oracle_configs names them)
  random                      uniform over all actions
The env and backend come from the first checkpoint's stored config; every checkpoint must fit them.
Every policy sees the same samples (the first N of --split) and budgets (default: K evenly over the
training budget range). Static configurations run once per sample (a sample x config table of
accuracy and measured latency) and static / lookup / oracle rows for every budget come from that
table; controller and random run through the env at every budget.

Interleaving (agents.sweep_schedule): the run is one round per test sample; a round holds that
sample's static configurations, every env policy at every budget, and the configurations of the
calibration samples spread evenly over the rounds, in an order shuffled per round by --seed; every
unit is one batch-1 request. Drift in machine speed during the run hits every policy alike.
--calibration_phase first measures the calibration samples before the test rounds instead (as a
deployment calibrates before it serves); the test rounds then run only the configurations that
lookup-calibrated, family-oracle and the profile lookups chose (all of them when the oracle is
evaluated): 17 of 75 in docs/RESULTS.md section 0-s14, which made a 600-sample run affordable on 2 CPU cores.
--calibration_phase two-pass measures the calibration first too, and then measures it again, interleaved
with the test rounds, on the configurations on each tier's Pareto frontier of the first pass (overall
and per family, agents.budget_sweep.frontier_candidates: whatever each tier's latency drifts by, the
calibrated policies choose among them), which the test rounds also run; lookup-calibrated and
family-oracle choose on the second pass, and the per-sample oracle among the same configurations (a
lower bound of its value over all 75; 29 of 75 in RESULTS 0-s15, affordable at 600 test samples).
With the calibration measured first only, the VM's p95 grew by ~50% between the calibration and the
test rounds and lookup-calibrated violated 44% (RESULTS 0-s15).
With either, --latency_reference calibration (the default then) takes the calibration as this machine's
latency now: the default budgets span the range the profile runner's rule gives on it (the training
range re-measured: a 2-core VM ran 25% slower in one evaluation than in training, and the profile's
lowest budget fitted no configuration), and each controller's shield table and time scale come from
it instead of a 24-request start-up measurement, so a controller knows what the baselines know.
--budget_span controllers (the default) keeps the default budgets inside the range every evaluated
controller trained at, in this machine's ms (its budget_range_ms times its time scale) as well: a
run's range comes from its start-up ratio of mean latencies, and on a 2-core VM the tails at
evaluation grew 4-8% more than the means, so the top budget of the re-measured range lay above every
controller's training (RESULTS section 0-s34).

Budgets outside the training range are evaluated like the others and reported separately
(`rows_outside_training_range` in eval.json, eval_outside_range.csv); meta.controller_trained_ranges
lists, per controller, the budgets it read (budget / its time scale) outside the range its run
trained at (its checkpoint's budget_range_ms: the profile's, or with env.budget_range machine its
machine's), where it extrapolates (eval.md reads each controller group against lookup-calibrated
again without them); a NaN, infinite, zero or
negative budget is an error naming --budgets. meta.structural_headroom gives, per budget,
family-oracle minus lookup-calibrated accuracy and each controller's gain and share of it;
meta.budget_feasibility the measured static configuration that exceeded each budget least often on
the test samples, and whether it stayed within 5% (eval.md names the budgets where none did: there no
policy can hold 5% violations on this machine in this run).

The env and backend are rebuilt from the checkpoint's stored config; --config YAML keys override
it key by key, and the flags override both.

Lookup profile (--profile_source): `results_dir` reads profile.json from --results_dir (default:
the backend's results dir, i.e. beside the model); `closed_form` (dummy backend only) computes it
from the dummy's closed-form model over the val split (expected accuracy, exact mean and p95 of
the latency); `val` measures the config table on --profile_samples val samples. `auto` (default):
--results_dir if given, else the VLM's results dir, else closed_form on the dummy.

Writes to --output_dir: eval.json ({"rows": [...], "rows_outside_training_range": [...],
"meta": {...}}), eval.csv, eval.md (accuracy and violations per policy and budget, each controller's
knob choices per question family), PNG plots (accuracy / latency / violation rate vs budget, the
controller's knob choices vs budget) of the budgets in the training range, and episodes.csv: every
controller and random episode (budget, round: the test sample's turn in the run, sample and family, the plan
that ran, latency, controller time, violation, accuracy, whether the shield changed or cut the plan), to see
when in the run and for which questions a policy exceeded its budgets.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import yaml

from agents.baselines import (
    DEFAULT_POLICIES,
    ENV_POLICIES,
    PolicySpec,
    LOOKUP_MEAN_FACTOR,
    RandomPolicy,
    all_static_configs,
    dummy_closed_form_profile,
    load_profile,
    parse_policies,
    latency_scales_between,
    profile_from_table,
    profile_to_json,
    smooth_latencies,
)
from agents.budget_sweep import (
    Calibration,
    budget_feasibility,
    calibrated_choices,
    calibrated_profile,
    check_budgets,
    config_table_to_json,
    configs_needed,
    default_budgets,
    episode_records,
    episode_rows,
    families_of,
    frontier_candidates,
    measure_config_table,
    table_policy_rows,
)
from agents.checkpoint import actor_meta, check_compatible, load_checkpoint
from agents.cli import user_input
from agents.config import Config, apply_overrides, config_from_dict
from agents.factory import (check_latency_shield, controller_time_scale, load_actor, make_backend_from_config, make_env,
                            make_latency_shield, make_lookup_profile, measure_profile_drift)
from agents.reporting import controller_spread, paired_comparisons, write_csv, write_outputs
from agents.sweep_schedule import EnvPolicy, run_interleaved
from envs.backends.base import check_split
from envs.machine import machine_info
from envs.profiling import BUDGET_RANGE_RULE, budget_range
from envs.reward import RewardWeights
from envs.shield import check_quantile, check_violation_target

PROFILE_SOURCES = ("auto", "results_dir", "closed_form", "val")
CALIBRATION_PHASES = ("interleaved", "first", "two-pass")
LATENCY_REFERENCES = ("start-up", "calibration")
BUDGET_SPANS = ("controllers", "reference")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="checkpoint file, or a training output_dir (its best checkpoint); several: one controller "
                        "policy each, evaluated in the same run")
    p.add_argument("--output_dir", required=True, help="where eval.json, eval.csv, eval.md and the plots go")
    p.add_argument("--config", help="YAML whose keys override the checkpoint's stored config")
    p.add_argument("--backend", choices=("dummy", "vlm", "molmoe"), help="env backend (default: the checkpoint's)")
    p.add_argument("--model_path", help="VLM model dir (default: the checkpoint's, else the shipped model)")
    p.add_argument("--results_dir", help="dir with profile.json (and importance.json for the VLM)")
    p.add_argument("--split", default="test", help="train, val or test (default test)")
    p.add_argument("--num_samples", type=int, help="first N samples of the split (default: config eval.test_samples)")
    budgets = p.add_mutually_exclusive_group()
    budgets.add_argument("--budgets", type=float, nargs="+", help="latency budgets in ms")
    budgets.add_argument("--num_budgets", type=int, default=8,
                         help="K budgets evenly over the training range (default 8; see --budget_span)")
    p.add_argument("--policies", nargs="+",
                   help="controller, static:<tier>,<top_k>,<num_blocks>, lookup-calibrated, family-oracle, "
                        "lookup-mean, lookup-p95, oracle, random (default: " + " ".join(DEFAULT_POLICIES) + ")")
    p.add_argument("--calibration_samples", type=int, default=64,
                   help="first N samples of --calibration_split that lookup-calibrated and family-oracle choose on "
                        "(default 64)")
    p.add_argument("--calibration_split", default="val", help="split of the calibration samples (default val; "
                                                              "must differ from --split)")
    p.add_argument("--calibration_phase", choices=CALIBRATION_PHASES, default="interleaved",
                   help="interleaved (default): the calibration samples' configurations spread over the test rounds; "
                        "first: all measured before the test rounds, which then run only the configurations the "
                        "calibrated policies chose (every one when the oracle is evaluated); two-pass: first, then "
                        "the configurations on each tier's Pareto frontier of the first pass measured again, "
                        "interleaved with the test rounds, and the calibrated policies (and the oracle) choose on "
                        "that second pass")
    p.add_argument("--profile_source", choices=PROFILE_SOURCES, default="auto", help="where the lookup profile comes from")
    p.add_argument("--profile_samples", type=int, default=64, help="val samples measured for --profile_source val")
    p.add_argument("--device", help="cpu or cuda (default: the checkpoint's)")
    p.add_argument("--seed", type=int, help="seed of the env, the random policy and the interleaving order "
                                            "(default: the checkpoint's)")
    p.add_argument("--num_threads", type=int, help="torch CPU threads (default: config train.num_threads)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds over all configs (and one episode per env "
                                                        "policy) before anything is timed (default 1)")
    p.add_argument("--latency_shield", choices=("checkpoint", "on", "off"), default="checkpoint",
                   help="each controller's latency shield (envs/shield.py), built at start-up from the profile "
                        "rescaled to this machine: as its run's policy.latency_shield (default), on or off")
    p.add_argument("--latency_shield_tracking", type=float,
                   help="rate at which the shields' per-tier scale follows the executed episodes' latency during "
                        "this run (envs/shield.py; 0: a fixed table; default: each run's policy setting)")
    p.add_argument("--latency_shield_quantile", type=float, nargs="+",
                   help="quantile of each tier's executed latencies that the shields' tracked table estimates "
                        "(envs/shield.py; 0.98: a plan at a budget's edge violates about 2%%; default: each "
                        "run's policy setting); several: every checkpoint behind each, in the same run, as "
                        "controller:<run>@q<Q>, grouped per Q and compared paired against the first")
    p.add_argument("--latency_shield_violation_target", nargs="+",
                   help="off or a violation rate in (0, 1), e.g. 0.03 (default: each run's "
                        "policy.latency_shield_violation_target): each shield also keeps a margin per evaluated "
                        "budget that steers the rate at which that budget is exceeded to the target "
                        "(envs/shield.py, adaptive conformal inference), and the controller reads its budget divided "
                        "by it; several: every checkpoint behind each (controller:<run>@v<T>, @voff), as for "
                        "--latency_shield_quantile (both several: every pair)")
    p.add_argument("--latency_shield_pairing", choices=("product", "zip"), default="product",
                   help="product (default): every pair of the --latency_shield_quantile and "
                        "--latency_shield_violation_target values; zip: the i-th quantile with the i-th target, "
                        "e.g. 0.98 0.95 with off 0.03: two shields, @q0.98+voff and @q0.95+v0.03")
    p.add_argument("--time_rescale", choices=("on", "off"), default="on",
                   help="on (default): each controller reads budgets and times in its training machine's units, "
                        "divided by this machine's latency over the training run's at its start (measured here at "
                        "start-up, agents.factory.controller_time_scale; 1 for checkpoints that saved no scales); "
                        "off: in this machine's milliseconds")
    p.add_argument("--latency_reference", choices=LATENCY_REFERENCES,
                   help="what this run takes as this machine's latency now. calibration (default with "
                        "--calibration_phase first or two-pass; needs one): the calibration set measured first, smoothed "
                        "(agents.baselines.smooth_latencies), gives each controller's shield table and time scale, "
                        "and the default budgets span the range the profile runner's rule gives on it "
                        "(envs.profiling.budget_range); start-up (default otherwise): the profile rescaled by a "
                        "24-request start-up measurement, and the default budgets span the profile's range")
    p.add_argument("--budget_span", choices=BUDGET_SPANS, default="controllers",
                   help="where the default budgets (--num_budgets) lie. controllers (default): within the range "
                        "every evaluated controller trained at, in this machine's ms (its checkpoint's "
                        "budget_range_ms times its time scale), inside the range --latency_reference gives; "
                        "reference: that range alone (controllers may then read budgets they never trained at, "
                        "reported apart)")
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


def check_checkpoint_fits(ckpt: dict, run_cfg: Config, backend) -> list[str]:
    """check_compatible (against the policy section of `run_cfg`, its run's config) plus the
    backend/model it was trained on; returns warnings."""
    meta, policy = ckpt["policy_meta"], run_cfg.policy
    check_compatible(meta, actor_meta(backend, policy.hidden_dim, policy.sinusoidal_dim, policy.stage2_inputs), ckpt["path"])
    trained = meta.get("backend") or {}
    now = backend.describe()
    if trained.get("backend") and trained["backend"] != now["backend"]:
        raise ValueError(f"checkpoint {ckpt['path']} was trained on backend {trained['backend']!r}, but the env "
                         f"uses {now['backend']!r}; pass --backend / --model_path matching the checkpoint")
    warnings = []
    if trained.get("model_path") and trained["model_path"] != now.get("model_path"):
        warnings.append(f"checkpoint was trained on model {trained['model_path']}, evaluating on {now.get('model_path')}")
    # env.budget_range "machine": the run measured its range on its machine, as this evaluation does on this one
    if run_cfg.env.budget_range != "machine" and list(meta.get("budget_range_ms", [])) != list(backend.budget_range_ms):
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
        budgets = check_budgets(args.budgets, "--budgets")
    elif args.num_budgets < 1:
        raise ValueError(f"--num_budgets={args.num_budgets}: expected >= 1")
    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num_samples={args.num_samples}: expected >= 1")
    if args.calibration_samples < 1:
        raise ValueError(f"--calibration_samples={args.calibration_samples}: expected >= 1")
    quantiles = [check_quantile(q, "--latency_shield_quantile") for q in args.latency_shield_quantile or ()]
    targets = [_violation_target(t) for t in args.latency_shield_violation_target or ()]
    paired = args.latency_shield_pairing == "zip"
    if paired and (len(quantiles) != len(targets) or len(quantiles) < 2):
        raise ValueError(f"--latency_shield_pairing zip pairs the i-th --latency_shield_quantile with the i-th "
                         f"--latency_shield_violation_target: got {len(quantiles)} and {len(targets)} values; expected "
                         f"as many of each, >= 2")
    if paired and len(set(zip(quantiles, targets))) < len(quantiles):
        raise ValueError(f"--latency_shield_pairing zip: a (quantile, violation target) pair given twice in "
                         f"{list(zip(quantiles, targets))}; expected distinct pairs")
    if not paired and len(set(quantiles)) < len(quantiles):
        raise ValueError(f"--latency_shield_quantile={quantiles}: a value given twice; expected distinct quantiles")
    if len(quantiles) > 1 and args.latency_shield == "off":
        raise ValueError(f"--latency_shield_quantile={quantiles} compares shields, but --latency_shield is off")
    if not paired and len(set(targets)) < len(targets):
        raise ValueError(f"--latency_shield_violation_target={args.latency_shield_violation_target}: a value given "
                         f"twice; expected distinct targets")
    if any(t is not None for t in targets) and args.latency_shield == "off":
        raise ValueError(f"--latency_shield_violation_target={args.latency_shield_violation_target} sets the "
                         f"shields' margins, but --latency_shield is off")
    split = check_split(args.split, "--split")
    calibration_split = check_split(args.calibration_split, "--calibration_split")
    if calibration_split == split:
        raise ValueError(f"--calibration_split={calibration_split!r} is the evaluated --split; the calibration "
                         f"samples must be disjoint from the test samples: pass another split")

    first_pass = args.calibration_phase in ("first", "two-pass")  # the calibration measured before the test rounds
    latency_reference = args.latency_reference or ("calibration" if first_pass else "start-up")
    if latency_reference == "calibration" and not first_pass:
        raise ValueError(f"--latency_reference calibration needs --calibration_phase first or two-pass (got "
                         f"{args.calibration_phase!r}): the calibration must be measured before anything it sets")

    variants = shield_variants(quantiles, targets, paired)
    ckpts = controller_checkpoints(args.checkpoint, [label for label, _, _ in variants] if len(variants) > 1 else None)
    by_label = {v[0]: v for v in variants}  # one variant: label "", every checkpoint behind it
    variant_of = {name: by_label[name.rpartition("@")[2] if len(variants) > 1 else ""] for name in ckpts}
    ckpt = next(iter(ckpts.values()))
    cfg = resolve_config(args, ckpt)
    from envs.machine import resolve_device

    resolve_device(cfg.train.device, "--device")  # before the backend is built or anything written
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    backend = make_backend_from_config(cfg)
    ks = backend.knob_space
    specs = parse_policies(args.policies or DEFAULT_POLICIES, ks)  # before the checkpoint check: a typo fails first
    specs = [c for s in specs for c in ([PolicySpec(name, s.kind) for name in ckpts] if s.kind == "controller" else [s])]
    run_cfgs = {name: cfg if ck is ckpt else resolve_config(args, ck) for name, ck in ckpts.items()}  # each its run's
    warnings = [w if len(ckpts) == 1 else f"{name}: {w}" for name, ck in ckpts.items()
                for w in check_checkpoint_fits(ck, run_cfgs[name], backend)]
    for w in warnings:
        log(f"warning: {w}")
    samples = backend.dataset(split)
    n = min(args.num_samples or cfg.eval.test_samples, len(samples))
    test_index = list(range(n))
    families = families_of(samples, test_index)
    if families is None and any(s.kind == "family-oracle" for s in specs):
        if args.policies:
            raise ValueError(f"--policies family-oracle needs question families; the {split} samples carry none "
                             f"(SynthVQA and the dummy have them, real VQA datasets do not)")
        log("family-oracle left out: these samples carry no question families")
        specs = [s for s in specs if s.kind != "family-oracle"]
    calibration_samples, calibration_index = None, []
    if any(s.needs_calibration for s in specs):
        calibration_samples = backend.dataset(calibration_split)
        calibration_index = list(range(min(args.calibration_samples, len(calibration_samples))))
        if len(calibration_index) < args.calibration_samples:
            log(f"warning: --calibration_samples={args.calibration_samples}, but split {calibration_split!r} has "
                f"{len(calibration_index)}; calibrating on those")
        missing = sorted(set(families or []) - set(families_of(calibration_samples, calibration_index) or []))
        if missing and any(s.kind == "family-oracle" for s in specs):
            raise ValueError(f"--calibration_samples={args.calibration_samples}: the calibration set has no question "
                             f"of family {missing}; pass a larger --calibration_samples")

    weights = RewardWeights.from_dict(cfg.env.reward)
    profile, profile_info = None, None
    if any(s.needs_profile for s in specs):
        profile, profile_info = resolve_profile(args, backend, ks, log)

    calibration, machine_now, first_pass_table = None, None, None
    lo, hi = backend.budget_range_ms
    budget_source = "given" if args.budgets is not None else f"{args.num_budgets} evenly over the training range"
    if first_pass and (calibration_samples is not None or latency_reference == "calibration"):
        if calibration_samples is None:  # only the controllers' reference needs it
            calibration_samples = backend.dataset(calibration_split)
            calibration_index = list(range(min(args.calibration_samples, len(calibration_samples))))
        log(f"calibration first: {len(calibration_index)} {calibration_split} samples x every static configuration")
        table = measure_config_table(backend, calibration_samples, calibration_index, all_static_configs(ks),
                                     warmup=args.warmup, seed=cfg.train.seed, progress=log)
        calibration = Calibration(table, families_of(calibration_samples, table.sample_index.tolist()))
        first_pass_table = table
    if latency_reference == "calibration":
        # This machine now, as the calibration measured it: the training range by the profile runner's rule
        # and the controllers' table, so that a budget asks the same of every policy however the machine drifted.
        measured = calibrated_profile(calibration, ks)
        machine_now = smooth_latencies(measured)
        (lo, hi), rule, _ = budget_range(profile_to_json(measured))
        log(f"budget range on the calibration: [{lo:.1f}, {hi:.1f}] ms (the profile's: "
            f"[{backend.budget_range_ms[0]:.1f}, {backend.budget_range_ms[1]:.1f}])")
        if args.budgets is None:
            budget_source = (f"{args.num_budgets} evenly over the range the calibration gives by the profile "
                             f"runner's rule ({rule})")
    # Each controller's time scale (this machine's latency over its training run's at its start) and the
    # range it trained at in this machine's ms, before the budgets: the default budgets stay inside it.
    own_cfgs = {s.name: run_cfgs[s.name] for s in specs if s.kind == "controller"}
    rescaled = [name for name in own_cfgs if args.time_rescale == "on" and ckpts[name].get("latency_scales")]
    drift = None
    if rescaled or any(_shield_on(args, own) for own in own_cfgs.values()):
        # this machine now, in the form the training run measured it at its start
        drift = (latency_scales_between(make_lookup_profile(backend), machine_now) if machine_now is not None
                 else measure_profile_drift(backend) or {})
    time_scales = {name: controller_time_scale(ckpts[name]["latency_scales"], drift) for name in rescaled}
    trained_here = {name: [b * time_scales.get(name, 1.0) for b in ckpts[name]["policy_meta"]["budget_range_ms"]]
                    for name in own_cfgs}
    if args.budgets is None:
        span = (lo, hi)
        if args.budget_span == "controllers" and trained_here:
            ends = list(trained_here.values())
            inside = (max([lo] + [r[0] for r in ends]), min([hi] + [r[1] for r in ends]))
            if inside[0] < inside[1]:
                span = inside
                budget_source += (f", within the range every controller trained at in this machine's ms "
                                  f"([{inside[0]:.1f}, {inside[1]:.1f}])")
            else:
                shown = {name: [round(b, 1) for b in r] for name, r in trained_here.items()}
                log(f"warning: the controllers' trained ranges in this machine's ms, {shown}, share no span "
                    f"with [{lo:.1f}, {hi:.1f}] ms; the default budgets span the latter")
        budgets = default_budgets(span, args.num_budgets)
    outside = [b for b in budgets if not lo <= b <= hi]
    if outside:
        log(f"budgets {outside} lie outside the training range [{lo}, {hi}] ms: evaluated, reported separately")
    configs = (configs_needed(specs, all_static_configs(ks), profile, budgets)
               if any(s.needs_table for s in specs) else [])
    if calibration is not None:
        # The test rounds run only what the tables read: with the calibration measured first only, every
        # configuration when the oracle is evaluated; two-pass, the frontier, and the oracle chooses among it.
        if args.calibration_phase == "two-pass" or not any(s.kind == "oracle" for s in specs):
            needed = (calibrated_choices(calibration, families, budgets, ks) if args.calibration_phase == "first"
                      else frontier_candidates(calibration, ks))
            needed |= set(configs_needed([s for s in specs if not s.needs_calibration and s.kind != "oracle"],
                                         all_static_configs(ks), profile, budgets))
            configs = [c for c in configs if c in needed]
        if args.calibration_phase == "first" or not any(s.needs_calibration for s in specs):
            calibration_samples, calibration_index = None, []  # else two-pass: measured again, interleaved
    env, env_policies, shields, trained_ranges = None, [], {}, {}
    for spec in specs:
        if spec.kind in ENV_POLICIES:
            if env is None:
                env = make_env(cfg, backend, split, 1, 1)
            own = own_cfgs.get(spec.name)  # the controller's run's config
            policy, greedy = _env_policy(spec, ckpts.get(spec.name), cfg, own, backend)
            shielded = own is not None and _shield_on(args, own)
            _, quantile, target = variant_of.get(spec.name, (None, None, None))
            if (len(variants) > 1 or target not in (None, RUN_SETTING)) and spec.kind == "controller" and not shielded:
                raise ValueError(f"--latency_shield_quantile / --latency_shield_violation_target set {spec.name}'s "
                                 f"shield, but its run has policy.latency_shield off: pass --latency_shield on")
            if spec.name in time_scales:
                policy.time_scale = time_scales[spec.name]
                log(f"{spec.name}: this machine's latency / its training run's = {policy.time_scale:.3f}: the "
                    f"controller reads budgets and times divided by it (times its shield's tracked scale)")
            if shielded:
                tracking = (own.policy.latency_shield_tracking if args.latency_shield_tracking is None
                            else args.latency_shield_tracking)
                quantile = own.policy.latency_shield_quantile if quantile is None else quantile
                target = own.policy.latency_shield_violation_target if target == RUN_SETTING else target
                # every shield setting from the controller's own run (cfg is the first checkpoint's), the flags over it
                own_shield = {f"policy.{f.name}": getattr(own.policy, f.name) for f in dataclasses.fields(own.policy)
                              if f.name.startswith("latency_shield")}
                shields[spec.name] = make_latency_shield(
                    apply_overrides(cfg, {**own_shield, "policy.latency_shield": True,
                                          "policy.latency_shield_tracking": tracking,
                                          "policy.latency_shield_quantile": quantile,
                                          "policy.latency_shield_violation_target": target,
                                          "policy.warm_start": own.policy.warm_start}),
                    backend, policy, drift, table=machine_now, budget_edges_ms=budget_bin_edges(budgets),
                    requests=ckpts[spec.name]["policy_meta"].get("family_requests"),
                    mix_budget_range_ms=(min(budgets), max(budgets)))
            if spec.kind == "controller":  # the budgets it reads (in its training machine's ms) vs those it trained at
                t_lo, t_hi = ckpts[spec.name]["policy_meta"]["budget_range_ms"]
                scale = time_scales.get(spec.name, 1.0)
                here_lo, here_hi = trained_here[spec.name]  # compared in this machine's ms: its ends are budgets
                trained_ranges[spec.name] = {
                    "budget_range_ms": [t_lo, t_hi], "time_scale": scale,
                    "budgets_outside": [b for b in budgets if not here_lo <= b <= here_hi]}
                if trained_ranges[spec.name]["budgets_outside"]:
                    log(f"{spec.name}: budgets {[round(b, 1) for b in trained_ranges[spec.name]['budgets_outside']]} "
                        f"read outside the range it trained at, [{t_lo:.1f}, {t_hi:.1f}] ms (its budget / time "
                        f"scale {scale:.3f}): it extrapolates there")
            env_policies.append(EnvPolicy(spec.name, policy, greedy, shields.get(spec.name), time_scales.get(spec.name)))
    log(f"interleaved run: {n} {split} samples x ({len(configs)} static configurations + {len(env_policies)} env "
        f"policies x {len(budgets)} budgets) + {len(calibration_index)} {calibration_split} calibration samples x "
        f"{len(configs)} configurations")
    run = run_interleaved(backend, samples, test_index, configs, budgets, env=env, env_policies=env_policies,
                          calibration_samples=calibration_samples, calibration_index=calibration_index,
                          seed=cfg.train.seed, warmup=args.warmup, progress=log)
    if run.test.skipped:
        log(f"warning: {len(run.test.skipped)} test samples skipped (unreadable images); all policies use the rest")
    sample_index = run.test.sample_index
    families = families_of(samples, sample_index.tolist())
    if run.calibration is not None:
        calibration_families = families_of(calibration_samples, run.calibration.sample_index.tolist())
        calibration = Calibration(run.calibration, calibration_families)

    rows, records = [], []
    reference = backend.has_closed_form
    for spec in specs:
        if spec.needs_table:
            rows += table_policy_rows(spec, run.test, budgets, ks, weights, families, profile, calibration)
        else:
            rows += episode_rows(env, spec.name, run.episodes[spec.name], sample_index, budgets, reference)
            records += episode_records(env, spec.name, run.episodes[spec.name], sample_index, budgets)
    for r in rows + records:
        r["in_training_range"] = lo <= r["budget_ms"] <= hi

    meta = {
        "machine": machine_info(),
        "checkpoint": ckpt["path"] if len(ckpts) == 1 else {name: ck["path"] for name, ck in ckpts.items()},
        "checkpoint_step": ckpt.get("step") if len(ckpts) == 1 else {name: ck.get("step") for name, ck in ckpts.items()},
        "checkpoint_epoch": ckpt.get("epoch") if len(ckpts) == 1 else {name: ck.get("epoch") for name, ck in ckpts.items()},
        "split": split,
        "num_samples": int(sample_index.numel()),
        "sample_index": sample_index.tolist(),
        "sample_families": families,  # per test sample, in the rows' per_sample order (None: no families)
        "skipped_samples": run.test.skipped,
        "budgets": budgets,
        "budget_source": budget_source,
        "budget_range_ms": [lo, hi],
        "latency_reference": {
            "setting": latency_reference, "profile_budget_range_ms": list(backend.budget_range_ms),
            "rule": ("the calibration set measured first, smoothed, is this machine's latency now: each controller's "
                     "shield table and time scale, and budget_range_ms by the profile runner's rule: "
                     + BUDGET_RANGE_RULE) if latency_reference == "calibration" else
                    "the profile rescaled by a start-up measurement (agents.factory.measure_profile_drift); "
                    "budget_range_ms: the profile's"},
        "budgets_outside_training_range": outside,
        # per controller: its run's training range and the evaluated budgets it reads outside it
        "controller_trained_ranges": trained_ranges,
        "policies": [s.name for s in specs],
        "calibration": None if calibration is None else {
            "split": calibration_split, "num_samples": int(calibration.table.sample_index.numel()),
            "sample_index": calibration.table.sample_index.tolist(), "skipped_samples": calibration.table.skipped,
            "phase": args.calibration_phase,
            "rule": "lookup-calibrated: best calibration accuracy with calibration p95 <= budget; family-oracle: "
                    "the same per question family (envs.headroom); chosen on calibration, read on the test samples"},
        "budget_feasibility": budget_feasibility(run.test, budgets) if configs else None,
        "structural_headroom": structural_headroom(rows, list(ckpts)),
        "controller_spread": controller_spread(rows, list(ckpts)),
        "paired_differences": paired_comparisons(rows, list(ckpts)),
        "controller_time_scale": {"setting": args.time_rescale, "scales": time_scales,
                                  "after_the_run": {e.name: e.policy.time_scale for e in env_policies
                                                    if e.time_scale is not None},
                                  "rule": "this machine's latency over the training run's at its start (geometric "
                                          "mean over tiers) times the shield's tracked mean scale (and its margin at "
                                          "the episode's budget) before each episode; each controller reads budgets "
                                          "and times divided by it"},
        "latency_shield": {"setting": args.latency_shield, "latency_scales": drift,
                           "quantiles": {name: s.quantile for name, s in shields.items()},
                           "violation_targets": {name: s.violation_target for name, s in shields.items()},
                           "tables": {name: s.state_dict() for name, s in shields.items()},  # after the run
                           "insertion_positions": list(ks.insertion_positions)},
        "interleaving": run.schedule,
        "profile_source": profile_info,
        "profile": profile_to_json(profile) if profile is not None else None,
        "lookup_mean_factor": LOOKUP_MEAN_FACTOR,
        "static_insertion": min(ks.insertion_positions),
        "latency_note": "static/lookup/oracle: measured batch-1 preprocess+vision+prefill+decode with a zero budget "
                        "token, one run per (sample, config) shared by all budgets; controller: the env's latency, "
                        "which includes both controller stages' own time, each measured for the request at batch 1",
        "num_configs_measured": len(configs),
        # every measured configuration per sample: the test rounds' and the calibration's, second pass included
        "config_tables": {"test": config_table_to_json(run.test) if configs else None,
                          "calibration": None if calibration is None else {
                              **config_table_to_json(calibration.table), "families": calibration.families},
                          "calibration_first_pass": (config_table_to_json(first_pass_table)
                                                     if args.calibration_phase == "two-pass" else None)},
        "oracle_configs": ([c.name for c in configs if c.insertion == min(ks.insertion_positions)]
                           if any(s.kind == "oracle" for s in specs) else None),
        "timings_s": {"interleaved_run": run.schedule["seconds"],
                      "calibration_first_pass": None if first_pass_table is None else round(first_pass_table.seconds, 2)},
        "warnings": warnings,
        "backend": backend.describe(),
        "reward_weights": weights.to_dict(),
        "config": cfg.to_dict(),
        "command": sys.argv,
    }
    inside = [r for r in rows if r["in_training_range"]]
    beyond = [r for r in rows if not r["in_training_range"]]
    paths = write_outputs(inside, meta, out, rows_outside_training_range=beyond)
    if records:
        paths["episodes"] = out / "episodes.csv"
        write_csv(records, paths["episodes"])
    log(f"wrote {', '.join(str(p) for p in paths.values())}")
    _print_table(inside, "budgets in the training range")
    if beyond:
        _print_table(beyond, "budgets outside the training range (extrapolation)")
    return {"rows": inside, "rows_outside_training_range": beyond, "meta": meta}


def controller_checkpoints(paths, variants: list[str] | None = None) -> dict[str, dict]:
    """{policy name: loaded checkpoint}: "controller" for one checkpoint; for several,
    controller:<name> with the run dir's name (a checkpoint file: its run dir's, else its stem), and
    [<settings>] after it when the runs were trained with different configs (config_labels); with
    `variants` (evaluation settings), controller:<name>@<variant> per checkpoint and variant, in that
    order, the variants of a checkpoint sharing its loaded dict."""
    if len(paths) == 1 and not variants:
        return {"controller": load_checkpoint(paths[0])}
    out = {}
    for path in paths:
        path = Path(path)
        run = path if path.is_dir() else (path.parent.parent if path.parent.name == "checkpoints" else None)
        name = f"controller:{run.name if run is not None else path.stem}"
        if name in out:
            raise ValueError(f"--checkpoint: {path} and {out[name]['arg']} both give the policy name {name!r}; "
                             f"pass checkpoints of differently named run dirs")
        out[name] = {**load_checkpoint(path), "arg": str(path)}
    labels = config_labels({name: ck.get("config") for name, ck in out.items()})
    out = {f"{name}[{labels[name]}]" if labels else name: ck for name, ck in out.items()}
    return {f"{name}@{v}": ck for name, ck in out.items() for v in variants} if variants else out


def config_labels(configs: dict[str, dict | None]) -> dict[str, str]:
    """{name: label} naming, for runs trained with different configs, the settings that tell them apart
    ("policy.latency_shield_violation_target=0.015"; the seed and the settings all share are left out),
    so that the reports group seeds per training config (agents.reporting.controller_groups); {} when
    the runs share one config or one has none stored."""
    if len(configs) < 2 or any(c is None for c in configs.values()):
        return {}

    def flat(tree: dict, prefix: str = "") -> dict[str, str]:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = str(value)
        return out

    settings = {name: flat(config_from_dict(c).to_dict()) for name, c in configs.items()}
    for s in settings.values():
        s.pop("train.seed")
    keys = sorted({k for s in settings.values() for k in s})
    differing = [k for k in keys if len({s.get(k) for s in settings.values()}) > 1]
    if not differing:
        return {}
    return {name: ",".join(f"{k}={s.get(k)}" for k in differing) for name, s in settings.items()}


def _env_policy(spec, ckpt, cfg, own_cfg, backend) -> tuple:
    """(policy, greedy) of an env policy: the checkpoint's controller (as its run's config `own_cfg`
    runs it, on this run's device), or the seeded random policy."""
    if spec.kind == "controller":
        return load_actor(ckpt, apply_overrides(own_cfg, {"train.device": cfg.train.device})), True
    return RandomPolicy(backend.knob_space, backend.d_model, seed=cfg.train.seed), False


def _violation_target(value: str) -> float | None:
    """One --latency_shield_violation_target value: None for off, else the target rate."""
    if value == "off":
        return None
    try:
        target = float(value)
    except ValueError:
        target = value
    return check_violation_target(target, "--latency_shield_violation_target")


# A shield variant's violation target when --latency_shield_violation_target is not given.
RUN_SETTING = "run"


def shield_variants(quantiles: list[float], targets: list[float | None],
                    paired: bool = False) -> list[tuple[str, float | None, object]]:
    """(label, quantile, violation target) of every shield the checkpoints run behind: each pair of the
    given values, or with `paired` the i-th quantile with the i-th target (quantile None: the run's;
    target None: no margin, RUN_SETTING: the run's); a label names the settings given several values."""
    def label(q, t) -> str:
        parts = [f"q{q:g}"] if len(quantiles) > 1 else []
        parts += [f"v{t:g}" if t is not None else "voff"] if len(targets) > 1 else []
        return "+".join(parts)
    pairs = (zip(quantiles, targets) if paired
             else [(q, t) for q in (quantiles or [None]) for t in (targets or [RUN_SETTING])])
    return [(label(q, t), q, t) for q, t in pairs]


def budget_bin_edges(budgets: list[float]) -> list[float]:
    """The shields' budget bins: one per evaluated budget, split halfway between neighbours."""
    values = sorted(set(budgets))
    return [(a + b) / 2 for a, b in zip(values, values[1:])]


def _shield_on(args, own_cfg) -> bool:
    """Whether a controller's episodes pass a latency shield: --latency_shield, else its run's setting."""
    if args.latency_shield != "checkpoint":
        return args.latency_shield == "on"
    return check_latency_shield(own_cfg)


def structural_headroom(rows, controllers: list[str]) -> list[dict]:
    """Per budget measured in this run: family-oracle minus lookup-calibrated accuracy (the headroom
    a question-aware controller can close), and each controller policy's gain and share of it
    (<policy>_gain, <policy>_share_of_headroom)."""
    by = {(r["policy"], r["budget_ms"]): r for r in rows}
    out = []
    for (policy, budget), row in by.items():
        if policy != "family-oracle" or ("lookup-calibrated", budget) not in by:
            continue
        base = by["lookup-calibrated", budget]["accuracy_mean"]
        entry = {"budget_ms": budget, "in_training_range": row["in_training_range"], "lookup_calibrated": base,
                 "family_oracle": row["accuracy_mean"], "headroom": row["accuracy_mean"] - base}
        for name in controllers:
            if (name, budget) in by:
                gain = by[name, budget]["accuracy_mean"] - base
                entry[f"{name}_gain"] = gain
                entry[f"{name}_share_of_headroom"] = gain / entry["headroom"] if entry["headroom"] > 0 else None
        out.append(entry)
    return out


def _print_table(rows, title: str) -> None:
    print(f"{title}:")
    print(f"{'policy':<22}{'budget':>8}{'acc':>7}{'lat':>8}{'p95':>8}{'viol':>6}{'reward':>8}  config")
    for r in rows:
        print(f"{r['policy']:<22}{r['budget_ms']:>8.1f}{r['accuracy_mean']:>7.3f}{r['latency_mean_ms']:>8.1f}"
              f"{r['latency_p95_ms']:>8.1f}{r['violation_rate']:>6.2f}{r['reward_mean']:>8.3f}  "
              f"{r.get('config') or ' '.join(f'{f}:{c}' for f, c in r.get('family_choice', {}).items())}")


if __name__ == "__main__":
    main()
