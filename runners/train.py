"""Joint GRPO training of the two-stage latency-budget controller.

    python runners/train.py [--config configs/NAME.yaml] [--output_dir DIR] [--flags ...]

One training step: reset B samples x G group members (same sample and budget within a group),
run both controller stages against the env (each member executed alone), share each episode's
terminal reward between the two stages through group-relative advantages, and update Stage 1,
Stage 2 and the budget encoder together for `loss.num_iterations` epochs over the batch.

Several GPUs: `torchrun --nproc_per_node N runners/train.py --use_multi_gpu ...` (docs/DISTRIBUTED.md):
each rank runs its share of the batch's groups on its own backend and device, the advantages are
those of the global batch, the gradients are averaged by DistributedDataParallel, and rank 0 alone
writes outputs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from agents.checkpoint import (
    load_checkpoint,
    load_stage1_weights,
    rank_states_payload,
    rng_state,
    saved_rank_states,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    check_compatible,
)
from agents.baselines import PROFILE_DRIFT_TOLERANCE, RandomPolicy
from agents.budget_sweep import controller_budget_sweep, default_budgets
from agents.cli import UserError, fail, user_input
from agents.config import (
    DEFAULT_CONFIG,
    RESUMABLE_FIELDS,
    Config,
    apply_overrides,
    changed_fields,
    config_from_dict,
    load_config,
    read_run_config,
    run_config_text,
)
from agents.distributed import (
    RankContext,
    RankFailure,
    all_gather_cat,
    all_gather_objects,
    broadcast_module_state,
    broadcast_object,
    close_distributed,
    init_distributed,
    is_main_process,
    launched_world_size,
    rank_seed,
    shard,
    weighted_mean_over_ranks,
    wrap_ddp,
)
from agents.constraint import episode_budgets
from agents.evaluation import beats_incumbent, dummy_reference_rewards, heldout_budgets, run_episodes, summarize
from agents.factory import (check_best_margin, check_budget_range, check_follow_shield_scale, check_latency_shield,
                            check_shield_allocation, check_shield_budget_bins, check_shield_quantile,
                            check_shield_tracking, check_shield_violation_rate, check_shield_violation_target,
                            check_warm_start, make_actor,
                            make_backend_from_config, machine_budget_range, make_env, make_latency_shield,
                            make_logger, make_loss, make_violation_multiplier, measure_profile_drift,
                            warm_start_actor)
from agents.grpo import grpo_update, make_optimizer, set_learning_rate
from agents.reporting import accuracy_vs_budget_figure
from agents.rollout import collect_rollouts
from envs import ACTION_HEADS
from envs.files import OutputWriteError, check_writable, write_error, write_json, write_text
from envs.machine import resolve_device
from envs.shield import following_time_scale
from policies import STAGE2_INPUTS

REPO = Path(__file__).resolve().parent.parent
# Flags of the original design (same names) mapped onto config fields.
FLAG_TO_FIELD = {
    "results_dir": "data.results_dir",
    "dataset_names": "data.dataset_names",
    "data_root": "data.data_root",
    "model_path": "data.model_path",
    "batch_size": "train.batch_size",
    "num_epochs": "train.num_epochs",
    "steps_per_epoch": "train.steps_per_epoch",
    "num_threads": "train.num_threads",
    "val_samples": "eval.val_samples",
    "test_samples": "eval.test_samples",
    "lr": "optim.lr",
    "stage1_lr_ratio": "optim.stage1_lr_ratio",
    "group_size": "train.group_size",
    "device": "train.device",
    "seed": "train.seed",
    "load_stage1_checkpoint": "train.load_stage1_checkpoint",
    "backend": "env.backend",
    "stage2_inputs": "policy.stage2_inputs",
}
# Updates skipped in a row (non-finite loss or gradient) that stop the run.
MAX_SKIPPED_IN_A_ROW = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"YAML config (flags override it; default {DEFAULT_CONFIG.relative_to(REPO)}); not with "
                        f"--resume, which reads the run's own config.yaml")
    p.add_argument("--output_dir", default=None, help="where everything is written (default runs/<config>-<time>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue the run in --output_dir from checkpoints/latest.pt (or from the given checkpoint) "
                        "with its own config.yaml; of the other flags only " + ", ".join(
                            f"--{f}" for f, field in FLAG_TO_FIELD.items() if field in RESUMABLE_FIELDS)
                        + " may change it")
    p.add_argument("--results_dir", help="dir with profile.json and importance.json (VLM backend)")
    p.add_argument("--dataset_names", nargs="+", help="datasets to train on, e.g. synthvqa or text_vqa coco_2014_vqa okvqa")
    p.add_argument("--data_root", help="root of the official VQA files (text_vqa, coco_2014_vqa, okvqa)")
    p.add_argument("--model_path", help="VLM model dir (default: the shipped model)")
    p.add_argument("--batch_size", type=int, help="samples per batch")
    p.add_argument("--num_epochs", type=int, help="number of epochs")
    p.add_argument("--steps_per_epoch", type=int, help="batches per epoch (default: train split size / batch_size)")
    p.add_argument("--num_threads", type=int, help="torch CPU threads")
    p.add_argument("--val_samples", type=int, help="held-out validation samples")
    p.add_argument("--test_samples", type=int, help="held-out test samples of the final evaluation")
    p.add_argument("--lr", type=float, help="learning rate of Stage 2 (Stage 1 and the budget encoder: lr * ratio)")
    p.add_argument("--stage1_lr_ratio", type=float,
                   help="Stage-1 lr = lr * ratio (0 freezes Stage 1 and the budget encoder)")
    p.add_argument("--group_size", type=int, help="GRPO group size")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--use_multi_gpu", action="store_true",
                   help="data-parallel training, one rank per GPU: run under torchrun --nproc_per_node N")
    p.add_argument("--load_stage1_checkpoint", help="initialise Stage 1 from this checkpoint")
    p.add_argument("--backend", choices=("dummy", "vlm", "molmoe"), help="env backend")
    p.add_argument("--stage2_inputs", choices=STAGE2_INPUTS,
                   help="what Stage 2 reads besides p: the latency token (default), token+elapsed, or elapsed")
    return p.parse_args(argv)


def flag_overrides(args: argparse.Namespace) -> dict:
    """Dotted config field -> value, for the flags given."""
    overrides = {field: getattr(args, flag) for flag, field in FLAG_TO_FIELD.items() if getattr(args, flag) is not None}
    if args.use_multi_gpu:
        overrides["train.use_multi_gpu"] = True
    return overrides


def resolve_config(args: argparse.Namespace) -> Config:
    """A fresh run's config: the YAML file with the flags applied."""
    return load_config(args.config or DEFAULT_CONFIG, flag_overrides(args))


def resume_config(args: argparse.Namespace, run_cfg: Config, history: list, step: int) -> tuple[Config, list]:
    """The run's own config with the flags given to --resume: a flag that changes a field in
    RESUMABLE_FIELDS is applied and recorded with the step it takes effect; any other change is
    refused, naming the flag (never silently ignored). --use_multi_gpu says how this launch runs:
    a run resumes on any number of ranks, with or without it."""
    overrides = flag_overrides(args) | {"train.use_multi_gpu": bool(args.use_multi_gpu)}
    cfg = apply_overrides(run_cfg, overrides)
    changes = changed_fields(run_cfg, cfg)
    flag_of = {field: f"--{flag}" for flag, field in FLAG_TO_FIELD.items()} | {"train.use_multi_gpu": "--use_multi_gpu"}
    for field, (old, new) in changes.items():
        if field not in RESUMABLE_FIELDS:
            allowed = ", ".join(flag_of.get(f, f) for f in RESUMABLE_FIELDS)
            raise fail(f"{flag_of[field]} {new} would change {field} of the resumed run from {old!r} to "
                       f"{new!r}; a resumed run keeps its config.yaml except {allowed}. Drop the flag, or start "
                       f"a new run with another --output_dir")
    for field, (old, new) in changes.items():
        if is_main_process():
            print(f"resume: {flag_of[field]} changes {field} from {old!r} to {new!r} from step {step} on",
                  file=sys.stderr)
    return cfg, history + [{"step": step, "field": f, "old": o, "new": n} for f, (o, n) in changes.items()]


# ---------------------------------------------------------------- ranks
def torchrun_command(cfg: Config, argv: list[str]) -> str:
    """The command that runs this one as one rank per GPU (per CPU share on --device cpu)."""
    # CPU ranks (gloo) are for smoke runs: two show the whole path.
    ranks = str(torch.cuda.device_count()) if resolve_device(cfg.train.device).type == "cuda" else "2"
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0].endswith("train.py") else Path(__file__)
    return shlex.join(["torchrun", "--nproc_per_node", ranks, str(script), *argv])


def start_ranks(cfg: Config, argv: list[str]) -> RankContext:
    """Join the ranks torchrun started; refuse a launch that does not match --use_multi_gpu."""
    world = launched_world_size()
    if cfg.train.use_multi_gpu and "LOCAL_RANK" not in os.environ:
        raise ValueError(f"--use_multi_gpu runs one process per rank under torchrun, which starts them; run: "
                         f"{torchrun_command(cfg, argv)}")
    if world > 1 and not cfg.train.use_multi_gpu:
        raise ValueError(f"runners/train.py runs as one of {world} ranks (WORLD_SIZE={world}) without "
                         f"--use_multi_gpu: each rank would train alone into the same --output_dir; pass "
                         f"--use_multi_gpu, or start one process")
    if world > cfg.train.batch_size:
        raise ValueError(f"--batch_size {cfg.train.batch_size} is smaller than the {world} ranks: each rank runs "
                         f"at least one group of the batch; pass --batch_size >= {world} (it is the global batch)")
    return init_distributed(cfg.train.device, cfg.train.collective_timeout_s)


def check_same_device_model(ranks: RankContext) -> None:
    """Latency budgets hold for one kind of GPU: every rank must measure on the same model."""
    name = torch.cuda.get_device_name(ranks.device) if ranks.device.type == "cuda" else "cpu"
    names = all_gather_objects(ranks, name, "the device names' gather")
    if len(set(names)) > 1:
        listed = ", ".join(f"rank {r}: {n}" for r, n in enumerate(names))
        raise ValueError(f"the ranks run on different devices ({listed}); "
                         f"latency budgets and the measured latencies would mean different things per rank: "
                         f"run on one GPU model (CUDA_VISIBLE_DEVICES)")


def report_drift(scales: dict[str, float], range_rescaled: bool) -> None:
    """One line with this machine's mean latency against the profile's per tier, and a warning when a
    tier is off by more than PROFILE_DRIFT_TOLERANCE."""
    line = ", ".join(f"{tier} x{v:.2f}" for tier, v in scales.items())
    off = [tier for tier, v in scales.items() if abs(v - 1) > PROFILE_DRIFT_TOLERANCE]
    print(f"latency against the profile (mean here / profiled): {line}", flush=True)
    if off:
        what = ("the lookup tables and budget range are rescaled by these ratios" if range_rescaled else
                "the lookup tables are rescaled by these ratios, the budget range is not (env.budget_range profile)")
        print(f"warning: tier(s) {', '.join(off)} run more than {PROFILE_DRIFT_TOLERANCE:.0%} off the profile's "
              f"latency on this machine: {what}; re-profile with runners/profile_configs.py for tables measured "
              f"on this machine", file=sys.stderr, flush=True)


def set_machine_budget_range(backend, drift: dict[str, float] | None, resume_ckpt: dict | None,
                             ranks: RankContext) -> None:
    """env.budget_range "machine": the backend's training budget range becomes this machine's
    (agents.factory.machine_budget_range on rank 0's start-up measurement, the same on every rank);
    a resumed run keeps the range it trained at; a backend without a profile (the dummy) keeps its own."""
    if resume_ckpt is not None:
        lo_hi = resume_ckpt["policy_meta"]["budget_range_ms"]
    else:
        lo_hi = broadcast_object(ranks, machine_budget_range(backend, drift) if drift else None,
                                 "the machine's budget range")
    if lo_hi is None:
        return
    if ranks.is_main and resume_ckpt is None:
        print(f"budget range on this machine: [{lo_hi[0]:.1f}, {lo_hi[1]:.1f}] ms (the profile's: "
              f"[{backend.budget_range_ms[0]:.1f}, {backend.budget_range_ms[1]:.1f}])", flush=True)
    backend.budget_range_ms = tuple(float(v) for v in lo_hi)


def on_main_rank(ranks: RankContext, check) -> None:
    """Run a check that touches the output directory on rank 0 alone; its refusal stops every rank
    (rank 0 has printed it)."""
    error = None
    if ranks.is_main:
        try:
            check()
        except UserError as err:
            error = err
    message = broadcast_object(ranks, error.message if error else None, "the output directory check's result")
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)


# ---------------------------------------------------------------- evaluation
def sharded_episodes(env, policy, sample_index, budgets, ranks: RankContext, greedy: bool):
    """The episodes of every (sample, budget) pair in order, each rank running its contiguous share."""
    part = shard(sample_index.shape[0], ranks)
    mine = (run_episodes(env, policy, sample_index[part], budgets[part], greedy=greedy).cpu()
            if part.stop > part.start else None)
    return torch.cat([e for e in all_gather_objects(ranks, mine, "the held-out episodes' gather") if e is not None])


def evaluate(env, actor, sample_index, budgets, ranks: RankContext) -> tuple[dict, object]:
    """Greedy policy on fixed held-out samples and budgets; on the dummy backend also the
    expected, optimal and uniform-random rewards on the same pairs."""
    actor.eval()
    episodes = sharded_episodes(env, actor, sample_index, budgets, ranks, greedy=True)
    actor.train()
    metrics = summarize(episodes)
    if env.backend.has_closed_form:
        metrics.update(dummy_reference_rewards(env, episodes))
    return metrics, episodes


def prepare_output_dir(output_dir: Path, resume: bool) -> None:
    """Refuse to start a fresh run over an earlier one (nothing already written is lost), and
    check that the directory can be written before any work is done."""
    if not resume and (output_dir / "checkpoints").exists():
        raise fail(f"--output_dir {output_dir} already holds a run (checkpoints/); pass --resume to "
                   f"continue it or choose another --output_dir")
    try:
        check_writable(output_dir)
        check_writable(output_dir / "checkpoints")
    except OutputWriteError as err:
        raise fail(f"--output_dir: {err}") from err


def resume_point(args: argparse.Namespace) -> tuple[Path, dict | None, Config, list]:
    """For --resume: the run dir, its checkpoint (None: killed before the first one, so it restarts
    from step 0), and its own config and resume history (config.yaml, else the checkpoint's)."""
    if not args.output_dir:
        raise fail("--resume needs --output_dir, the run to continue")
    if args.config:
        raise fail("--config cannot be given with --resume: a resumed run reads its own "
                   "OUTPUT_DIR/config.yaml; pass only the flags you mean to change")
    output_dir = Path(args.output_dir)
    run_config = output_dir / "config.yaml"
    path = output_dir / "checkpoints" / "latest.pt" if args.resume == "latest" else Path(args.resume)
    ckpt = load_checkpoint(path) if args.resume != "latest" or path.is_file() else None
    if run_config.is_file():
        cfg, history = read_run_config(run_config)
    elif ckpt is not None and isinstance(ckpt.get("config"), dict):
        cfg, history = config_from_dict(ckpt["config"]), []
    else:
        raise fail(f"--resume: {output_dir} holds no config.yaml and no checkpoint; nothing to resume")
    if ckpt is None:
        print(f"resume: {output_dir} has no checkpoint yet; restarting the run from step 0", file=sys.stderr)
    return output_dir, ckpt, cfg, history


def kept_metrics(path: Path, last_step: int) -> str:
    """metrics.jsonl as of a checkpoint at last_step: rows logged after it (and the final test
    rows, which the final evaluation logs again) are dropped, so every step is logged once; a
    line cut by a kill is dropped too."""
    kept = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] <= last_step and not all(k.startswith("test/") for k in row if k not in ("step", "time")):
            kept.append(line + "\n")
    return "".join(kept)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    try:
        return train(args, argv)
    except OutputWriteError as err:  # a full disk or read-only dir at a write: the earlier file is intact
        raise fail(str(err)) from err
    except RankFailure as err:  # another rank died or stalled: stop, never hang
        raise SystemExit(f"error: {err}. The checkpoints written so far are intact: continue with --resume "
                         f"--output_dir {args.output_dir or 'DIR (this run)'}") from err


def train(args: argparse.Namespace, argv: list[str]) -> dict:
    # Bad input fails here, as one line naming the flag (agents.cli), before anything is written.
    with user_input():
        resume_ckpt, history = None, []
        if args.resume:
            output_dir, resume_ckpt, run_cfg, history = resume_point(args)
            cfg, history = resume_config(args, run_cfg, history, resume_ckpt["step"] if resume_ckpt else 0)
        else:
            cfg = resolve_config(args)
            config_name = Path(args.config or DEFAULT_CONFIG).stem
            output_dir = Path(args.output_dir or REPO / "runs" / f"{config_name}-{dt.datetime.now():%Y%m%d-%H%M%S}")
        resolve_device(cfg.train.device, "--device")  # a clear error before anything is built or written
        ranks = start_ranks(cfg, argv)
    try:
        return train_ranks(args, cfg, ranks, output_dir, resume_ckpt, history)
    finally:
        close_distributed(ranks)


def train_ranks(args, cfg: Config, ranks: RankContext, output_dir: Path, resume_ckpt: dict | None,
                history: list) -> dict:
    """The run on this rank (the only one without torchrun)."""
    with user_input():
        check_same_device_model(ranks)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed)  # the same initial policy (and KL anchor) on every rank
        tc, ec = cfg.train, cfg.eval
        # This rank's device and seed; on one rank, the config itself. The config written stays the user's.
        rank_cfg = apply_overrides(cfg, {"train.device": str(ranks.device),
                                         "train.seed": rank_seed(tc.seed, ranks.rank)})
        backend = make_backend_from_config(rank_cfg)
        # This machine's latency against the profile, measured once at the run's start (rank 0): the
        # tables the warm start and the shield read are rescaled by it, the policy learns its budgets in
        # its units, and with env.budget_range "machine" it sets the training budget range.
        machine_range = check_budget_range(cfg) == "machine"
        drift = measure_profile_drift(backend) if ranks.is_main and resume_ckpt is None else None
        if drift:  # a stale profile makes the budget range and every lookup table wrong: say so
            report_drift(drift, machine_range)
        if machine_range:
            set_machine_budget_range(backend, drift, resume_ckpt, ranks)
        # The batch's groups are split over the ranks; their episodes run on this rank's backend.
        local_groups = len(range(tc.batch_size)[shard(tc.batch_size, ranks)])
        train_env = make_env(rank_cfg, backend, "train", local_groups, tc.group_size)
        val_env = make_env(rank_cfg, backend, "val", ec.batch_size, 1)
        # Generators outside the envs that a resumed run must continue (the dummy backend's noise).
        generators = {"backend": backend.rng} if isinstance(getattr(backend, "rng", None), torch.Generator) else {}
        actor, meta = make_actor(rank_cfg, backend)
        if tc.load_stage1_checkpoint and resume_ckpt is None:  # a resumed run has its own weights
            load_stage1_weights(actor, tc.load_stage1_checkpoint, meta)
        loss_module = make_loss(cfg, actor)
        multiplier = make_violation_multiplier(cfg, backend.budget_range_ms)
        check_warm_start(cfg)
        check_latency_shield(cfg)
        check_shield_tracking(cfg)
        check_shield_quantile(cfg)
        check_shield_violation_target(cfg)
        check_shield_violation_rate(cfg)
        check_shield_budget_bins(cfg)
        check_shield_allocation(cfg)
        follow_shield = check_follow_shield_scale(cfg)
        check_best_margin(cfg)
        optimizer = make_optimizer(actor, cfg.optim.lr, cfg.optim.stage1_lr_ratio, cfg.optim.weight_decay)
        if ranks.rank > 0:  # from here on each rank draws its own actions
            seed_everything(rank_cfg.train.seed)
        steps_per_epoch = tc.steps_per_epoch or max(1, len(train_env.samples) // tc.batch_size)
        # Where the next step goes (epoch, step within it), and the counters a resume continues.
        epoch, epoch_step, step, best_val = 0, 0, 0, -math.inf
        best_val_rewards = None  # best.pt's per-episode validation rewards (beats_incumbent)
        # The start-up measure_profile_drift the warm start read its table at: the machine units the policy
        # learns its budgets in, saved with every checkpoint (evaluate.py: agents.factory.controller_time_scale).
        latency_scales = None
        skipped_updates, skipped_in_a_row = 0, 0
        if resume_ckpt is not None:
            check_compatible(resume_ckpt["policy_meta"], meta, resume_ckpt["path"])
            if "family_requests" in resume_ckpt["policy_meta"]:  # taught at its step 0
                meta["family_requests"] = resume_ckpt["policy_meta"]["family_requests"]
        on_main_rank(ranks, lambda: prepare_output_dir(output_dir, resume=args.resume is not None))
    if resume_ckpt is not None:
        actor.load_state_dict(resume_ckpt["policy"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        set_learning_rate(optimizer, cfg.optim.lr)  # load_state_dict restored the saved one
        epoch, epoch_step, step = resume_ckpt["epoch"], resume_ckpt["epoch_step"], resume_ckpt["step"]
        best_val = resume_ckpt["best_val_reward"]
        best_val_rewards = resume_ckpt.get("best_val_rewards")
        latency_scales = resume_ckpt.get("latency_scales")
        skipped_updates, skipped_in_a_row = resume_ckpt["skipped_updates"], resume_ckpt["skipped_in_a_row"]
        if multiplier is not None and resume_ckpt.get("violation_lambda") is not None:
            multiplier.load_state_dict(resume_ckpt["violation_lambda"])
        history = restore_rank_state(resume_ckpt, ranks, cfg, generators, train_env, val_env, history)
        # The anchor the run started from (before the field: the resumed weights).
        loss_module.anchor_reference(resume_ckpt.get("kl_reference"))
    # The loss module holds the policy: its forward is where the policy runs under gradient, so it
    # is what DistributedDataParallel wraps (the same module on one rank).
    ddp_loss = wrap_ddp(ranks, loss_module)
    # This rank's part of the global batch (see grpo_update).
    rank_share = local_groups * ranks.world_size / tc.batch_size
    writer = metrics_file = None
    if ranks.is_main:
        if args.resume is not None:
            write_text(output_dir / "metrics.jsonl", kept_metrics(output_dir / "metrics.jsonl", step if resume_ckpt else -1))
        write_text(output_dir / "config.yaml", run_config_text(cfg, history))
        writer = make_logger(output_dir, purge_step=step + 1 if resume_ckpt else (0 if args.resume else None))
        metrics_file = open(output_dir / "metrics.jsonl", "a")
    val_index, val_budgets = heldout_budgets(val_env, ec.val_samples, seed=cfg.train.seed + 1)

    def log(tag_values: dict, step: int) -> None:
        if not ranks.is_main:
            return
        for tag, value in tag_values.items():
            writer.add_scalar(tag, value, step)
        try:
            metrics_file.write(json.dumps({"step": step, "time": time.time(), **tag_values}) + "\n")
            metrics_file.flush()
        except OSError as err:  # a full disk: the checkpoints written so far are intact
            raise write_error(metrics_file.name, err) from err

    def close_outputs() -> None:
        if ranks.is_main:
            writer.close()
            metrics_file.close()

    def checkpoint(name: str) -> None:
        # Every rank's generators, so that a resume continues each rank's stream.
        states = all_gather_objects(ranks, {"rng": rng_state(generators), "env": {
            "train": train_env.resume_state(), "val": val_env.resume_state()}}, "the RNG states' gather (checkpoint)")
        if not ranks.is_main:
            return
        save_checkpoint(output_dir / "checkpoints" / name, policy=actor.state_dict(), optimizer=optimizer.state_dict(),
                        step=step, epoch=epoch, epoch_step=epoch_step, best_val_reward=best_val,
                        best_val_rewards=best_val_rewards, latency_scales=latency_scales,
                        skipped_updates=skipped_updates, skipped_in_a_row=skipped_in_a_row,
                        violation_lambda=multiplier.state_dict() if multiplier is not None else None,
                        kl_reference=loss_module.reference_state(),
                        **rank_states_payload(states), policy_meta=meta, config=cfg.to_dict())

    def read_shield_scale() -> None:
        """policy.follow_shield_scale: the controller reads times divided by its shield's tracked scale."""
        if follow_shield and val_env.shield is not None:
            actor.time_scale = following_time_scale(1.0, val_env.shield)

    def validate() -> tuple[dict, torch.Tensor]:
        read_shield_scale()
        metrics, episodes = evaluate(val_env, actor, val_index, val_budgets, ranks)
        log({f"val/{k}": v for k, v in metrics.items()}, step)
        if ranks.is_main and not sys.stdout.isatty():  # tqdm shows nothing in a log file: one line per validation
            print(f"step {step}/{tc.num_epochs * steps_per_epoch} val reward {metrics['reward_mean']:.3f} "
                  f"accuracy {metrics['accuracy_mean']:.3f} latency {metrics['latency_mean_ms']:.1f} ms "
                  f"violations {metrics['violation_rate']:.3f}", flush=True)
        if ec.sweep_budgets and ranks.is_main:  # a figure only: rank 0 runs it while the others wait
            budgets = default_budgets(backend.budget_range_ms, ec.sweep_budgets)
            rows = controller_budget_sweep(val_env, actor, val_index[: ec.sweep_samples], budgets)
            writer.add_figure("val/accuracy_vs_budget", accuracy_vs_budget_figure(rows), step)
        return metrics, episodes["reward"].reshape(-1).cpu()

    def validate_and_keep_best() -> None:
        nonlocal best_val, best_val_rewards
        metrics, rewards = validate()
        # Every rank holds all validation episodes, so every rank decides alike (checkpoint gathers).
        if beats_incumbent(rewards, best_val_rewards, ec.best_margin_se):  # a NaN reward never does
            best_val, best_val_rewards = metrics["reward_mean"], rewards
            checkpoint("best.pt")

    if step == 0:
        latency_scales = drift
        if drift:
            log({f"profile/latency_scale_{tier}": v for tier, v in drift.items()}, 0)
        if cfg.policy.warm_start is not None:  # rank 0 imitates the lookup table; every rank takes its weights
            warm, requests = warm_start_actor(rank_cfg, actor, backend, drift) if ranks.is_main else ({}, None)
            broadcast_module_state(ranks, actor, "the warm-started weights' broadcast")
            requests = broadcast_object(ranks, requests, "the family requests' broadcast")
            if requests is not None:  # the value shield's values name them; checkpoints keep them
                meta["family_requests"] = requests
            loss_module.anchor_reference()  # loss.beta's KL holds GRPO near the taught table, not the random init
            log(warm, 0)
            if ranks.is_main:
                print("warm start: " + " ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in warm.items()), flush=True)
    if cfg.policy.latency_shield:  # each rank's episodes pass its own machine's shield (measured now)
        shield = make_latency_shield(rank_cfg, backend, actor, drift if ranks.is_main and step == 0
                                     else measure_profile_drift(backend), requests=meta.get("family_requests"))
        train_env.shield = val_env.shield = shield
    if step == 0:  # the starting policy (the warm start's, if any) is a candidate for the best checkpoint
        validate_and_keep_best()

    progress = tqdm(total=tc.num_epochs * steps_per_epoch, initial=min(step, tc.num_epochs * steps_per_epoch),
                    desc="train", dynamic_ncols=True, disable=None if ranks.is_main else True)
    while epoch < tc.num_epochs:
        while epoch_step < steps_per_epoch:
            # Collect: this rank's groups x G episodes, both stages, terminal reward per episode.
            read_shield_scale()
            rollout = collect_rollouts(train_env, actor)
            design_reward = float(rollout["next", "reward"][:, -1].mean())  # before the multiplier's penalty
            if multiplier is not None:
                multiplier.penalize(rollout)
            loss_module.compute_advantages(rollout, ranks)
            # Update: several epochs over the batch with the clipped joint objective. A non-finite
            # loss or gradient skips the update (the batch's remaining epochs would see it again).
            losses, grad_norm, non_finite = grpo_update(ddp_loss, optimizer, rollout, actor.parameters(),
                                                        cfg.loss.num_iterations, cfg.optim.max_grad_norm, ranks,
                                                        rank_share)
            step += 1
            epoch_step += 1
            if non_finite:
                skipped_updates += 1
                skipped_in_a_row += 1
                if ranks.is_main:
                    print(f"step {step}: update skipped, non-finite {non_finite} ({skipped_in_a_row} in a row)",
                          file=sys.stderr)
            else:
                skipped_in_a_row = 0

            info = rollout["next", "episode"][:, -1]
            # Means over the global batch: each rank's mean weighted by its rows.
            train_metrics = weighted_mean_over_ranks(ranks, {
                "train/reward": design_reward,
                "train/accuracy": float(info["accuracy"].mean()),
                "train/latency_mean_ms": float(info["latency_ms"].mean()),
                "train/violation_rate": float(info["violation"].mean()),
                "train/frac_reward_zero_std": float(rollout["reward_zero_std"][:, 0].float().mean()),
                "train/shield_rate": float(info["shielded"].mean()),  # episodes whose plan the shield changed
                "train/shield_cut_rate": float(info["shield_cut"].mean()),  # ... lowering tier, top-k or blocks
                "train/time_scale": float(actor.time_scale),  # 1 unless policy.follow_shield_scale
            }, local_groups, "the train metrics' reduction")
            train_metrics.update({"train/grad_norm": float(grad_norm), "train/skipped_updates": skipped_updates})
            if multiplier is not None:  # the global batch's episodes: every rank takes the same step
                budgets, _ = all_gather_cat(ranks, episode_budgets(rollout), "the budgets' gather (constraint)")
                violated, _ = all_gather_cat(ranks, info["violation"].reshape(-1).float(), "the violations' gather (constraint)")
                multiplier.update(budgets, violated)
                train_metrics.update(multiplier.metrics())
            shield = train_env.shield
            if shield is not None and shield.violation_target is not None:  # this rank's per-bin price or margin
                name, steered = ("price", shield.price) if shield.values else ("margin", shield.margin)
                train_metrics.update({f"train/shield_{name}_bin{b}": float(m) for b, m in enumerate(steered)})
                if shield.expected_price:  # the mean risk its expected price lets the bin's requests take
                    train_metrics.update({f"train/shield_expected_target_bin{b}": float(t)
                                          for b, t in enumerate(shield.expected_target)})
                if shield.speed_slope is not None:  # how much of a request's slowness before Stage 2 persists
                    train_metrics["train/shield_speed_slope"] = shield.speed_slope
                if shield.values is not None:  # the violation rate it predicted for the plans that ran
                    train_metrics["train/shield_risk"] = float(info["shield_risk"].double().nanmean())
            progress.update(1)
            progress.set_postfix(reward=f"{train_metrics['train/reward']:.3f}",
                                 viol=f"{train_metrics['train/violation_rate']:.2f}")
            if step % cfg.logging.log_every == 0 or non_finite:
                train_metrics.update(weighted_mean_over_ranks(
                    ranks, {f"loss/{k}": float(v.detach()) for k, v in losses.items()}, local_groups,
                    "the loss terms' reduction"))
                log(train_metrics, step)
                if cfg.logging.histograms:
                    for h in ACTION_HEADS:
                        acted = rollout["action", h][:, 0 if h in ("tier", "insertion") else 1].flatten()
                        actions, _ = all_gather_cat(ranks, acted, "the actions' gather (histograms)")
                        if ranks.is_main:
                            writer.add_histogram(f"actions/{h}", actions, step)
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                checkpoint("latest.pt")  # the weights never took a non-finite update: resumable
                close_outputs()
                raise SystemExit(
                    f"error: {skipped_in_a_row} updates in a row were skipped for a non-finite loss or gradient "
                    f"(step {step}: {non_finite}); stopped. The weights are finite and saved in "
                    f"{output_dir / 'checkpoints' / 'latest.pt'}: fix the cause (rewards, reward weights, --lr) "
                    f"and continue with --resume --output_dir {output_dir}")

        epoch, epoch_step = epoch + 1, 0  # this epoch is done: its checkpoints resume at the next one
        if epoch % ec.val_every_epochs == 0 or epoch == tc.num_epochs:
            validate_and_keep_best()
        checkpoint("latest.pt")
    progress.close()

    # Final evaluation of the best-by-validation policy on held-out test samples.
    best_path, latest_path = output_dir / "checkpoints" / "best.pt", output_dir / "checkpoints" / "latest.pt"
    evaluated, evaluated_step = (str(latest_path) if latest_path.exists() else None), step
    if ranks.is_main and best_path.exists():
        best = load_checkpoint(best_path)
        actor.load_state_dict(best["policy"])
        evaluated, evaluated_step = str(best_path), best["step"]
    broadcast_module_state(ranks, actor, "the evaluated weights' broadcast")
    test_env = make_env(rank_cfg, backend, "test", ec.batch_size, 1, shield=val_env.shield)
    test_index, test_budgets = heldout_budgets(test_env, ec.test_samples, seed=cfg.train.seed + 2)
    read_shield_scale()
    final, _ = evaluate(test_env, actor, test_index, test_budgets, ranks)
    # The uniform-random policy on the same samples and budgets: the floor learning must clear; with a
    # latency shield also the same draws through it, which tells what the shield buys from what was learned.
    floors = {"uniform_random": None}
    if val_env.shield is not None:
        floors["uniform_random_shielded"] = val_env.shield
    for key, shield in floors.items():
        test_env.shield = shield
        random_policy = RandomPolicy(backend.knob_space, backend.d_model, seed=rank_cfg.train.seed)
        final[key] = summarize(sharded_episodes(test_env, random_policy, test_index, test_budgets, ranks,
                                                greedy=False))
    # `checkpoint`: the file whose weights were evaluated (None: the initial policy, no epoch ran).
    final.update({"checkpoint": evaluated, "checkpoint_step": evaluated_step, "step": step, "split": "test"})
    if drift:
        final["profile_latency_scale"] = drift  # this machine's mean latency / the profile's, per tier, at the start
    if ranks.is_main:
        write_json(output_dir / "final_eval.json", final)
    log({f"test/{k}": v for k, v in final.items() if isinstance(v, (int, float))}, step)
    log({f"test/random_{k}": v for k, v in final["uniform_random"].items()}, step)
    if "uniform_random_shielded" in final:
        log({f"test/random_shielded_{k}": v for k, v in final["uniform_random_shielded"].items()}, step)
    close_outputs()
    if ranks.is_main:
        print(json.dumps(final, indent=2))
    return final


def restore_rank_state(ckpt: dict, ranks: RankContext, cfg: Config, generators: dict, train_env, val_env,
                       history: list) -> list:
    """This rank's generators from a checkpoint of any number of ranks: rank r continues rank r's
    streams; a rank the checkpoint has no state for starts streams of its own (seeded by rank
    and step). Returns the resume history with a change of the number of ranks recorded."""
    saved = saved_rank_states(ckpt)
    if ranks.rank < len(saved):
        set_rng_state(saved[ranks.rank]["rng"], generators)
        train_env.load_resume_state(saved[ranks.rank]["env"]["train"])
        val_env.load_resume_state(saved[ranks.rank]["env"]["val"])
    else:
        seed = rank_seed(cfg.train.seed, ranks.rank, ckpt["step"])
        seed_everything(seed)
        train_env.set_seed(seed)
        val_env.set_seed(seed)
    saved_world = len(saved)
    if saved_world == ranks.world_size:
        return history
    if ranks.is_main:
        kept, more = min(saved_world, ranks.world_size), max(saved_world, ranks.world_size)
        print(f"resume: the checkpoint of step {ckpt['step']} comes from {saved_world} rank(s), this run has "
              f"{ranks.world_size}: each rank r < {kept} continues rank r's streams; "
              + (f"{_ranks_text(kept, more)} draw(s) new ones" if ranks.world_size > saved_world
                 else f"the streams of {_ranks_text(kept, more)} end"), file=sys.stderr)
    return history + [{"step": ckpt["step"], "field": "world_size", "old": saved_world, "new": ranks.world_size}]


def _ranks_text(start: int, stop: int) -> str:
    return f"rank {start}" if stop - start == 1 else f"ranks {start}..{stop - 1}"


if __name__ == "__main__":
    main()
