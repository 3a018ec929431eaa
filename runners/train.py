"""Joint GRPO training of the two-stage latency-budget controller.

    python runners/train.py [--config configs/NAME.yaml] [--output_dir DIR] [--flags ...]

One training step: reset B samples x G group members (same sample and budget within a group),
run both controller stages against the env (each member executed alone), share each episode's
terminal reward between the two stages through group-relative advantages, and update Stage 1,
Stage 2 and the budget encoder together for `loss.num_iterations` epochs over the batch.
"""
from __future__ import annotations

import sys
from pathlib import Path

# runners/profile.py would shadow the standard library's `profile`, which torch imports.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse
import datetime as dt
import json
import math
import time

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from agents.checkpoint import (
    actor_meta,
    build_actor,
    load_checkpoint,
    load_stage1_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    check_compatible,
)
from agents.baselines import RandomPolicy
from agents.budget_sweep import accuracy_vs_budget_figure, controller_budget_sweep, default_budgets
from agents.config import Config, load_config
from agents.evaluation import dummy_reference_rewards, heldout_budgets, run_episodes, summarize
from agents.grpo import JointGRPOLoss, make_optimizer
from agents.rollout import collect_rollouts
from envs import ACTION_HEADS, BudgetVLMEnv, RewardWeights, make_backend

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
# Flags of the original design (same names) mapped onto config fields.
FLAG_TO_FIELD = {
    "results_dir": "data.results_dir",
    "dataset_names": "data.dataset_names",
    "model_path": "data.model_path",
    "batch_size": "train.batch_size",
    "num_epochs": "train.num_epochs",
    "lr": "optim.lr",
    "stage1_lr_ratio": "optim.stage1_lr_ratio",
    "group_size": "train.group_size",
    "device": "train.device",
    "seed": "train.seed",
    "load_stage1_checkpoint": "train.load_stage1_checkpoint",
    "backend": "env.backend",
}
DUMMY_DATASETS = ([], ["dummy"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (flags override it)")
    p.add_argument("--output_dir", default=None, help="where everything is written (default runs/<config>-<time>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from OUTPUT_DIR/checkpoints/latest.pt, or from the given checkpoint")
    p.add_argument("--results_dir", help="dir with profile.json and importance.json (VLM backend)")
    p.add_argument("--dataset_names", nargs="+", help="datasets to train on, e.g. synthvqa or text_vqa coco_2014_vqa okvqa")
    p.add_argument("--model_path", help="VLM model dir (default: the shipped model)")
    p.add_argument("--batch_size", type=int, help="samples per batch")
    p.add_argument("--num_epochs", type=int, help="number of epochs")
    p.add_argument("--lr", type=float, help="learning rate of Stage 2 and the budget encoder")
    p.add_argument("--stage1_lr_ratio", type=float, help="Stage-1 lr = lr * ratio (0 freezes Stage 1)")
    p.add_argument("--group_size", type=int, help="GRPO group size")
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--use_multi_gpu", action="store_true", help="data-parallel rollouts (not available yet)")
    p.add_argument("--load_stage1_checkpoint", help="initialise Stage 1 from this checkpoint")
    p.add_argument("--backend", choices=("dummy", "vlm", "molmoe"), help="env backend")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = {field: getattr(args, flag) for flag, field in FLAG_TO_FIELD.items() if getattr(args, flag) is not None}
    if args.use_multi_gpu:
        overrides["train.use_multi_gpu"] = True
    return load_config(args.config, overrides)


# ---------------------------------------------------------------- factories
def make_backend_from_config(cfg: Config):
    options = dict(cfg.env.backend_options)
    data = cfg.data
    if cfg.env.backend == "dummy":
        if list(data.dataset_names) not in DUMMY_DATASETS:
            raise ValueError(f"dataset_names={list(data.dataset_names)}: backend 'dummy' generates its own "
                             f"samples; expected [] or ['dummy'] (use --backend vlm for real datasets)")
        for name in ("model_path", "results_dir", "data_root"):
            if getattr(data, name) is not None:
                raise ValueError(f"{name}={getattr(data, name)!r} is set but backend 'dummy' has no model or data files")
        options.setdefault("seed", 0)
    else:
        for name in ("model_path", "results_dir", "data_root"):
            if getattr(data, name) is not None:
                options[name] = getattr(data, name)
        if data.dataset_names:
            options["dataset_names"] = tuple(data.dataset_names)
        options["device"] = cfg.train.device
    return make_backend(cfg.env.backend, **options)


def make_env(cfg: Config, backend, split: str, batch_size: int, group_size: int) -> BudgetVLMEnv:
    return BudgetVLMEnv(backend, batch_size=batch_size, group_size=group_size, split=split,
                        reward_weights=RewardWeights.from_dict(cfg.env.reward), seed=cfg.train.seed,
                        device=cfg.train.device)


def make_actor(cfg: Config, backend):
    meta = actor_meta(backend, cfg.policy.hidden_dim, cfg.policy.sinusoidal_dim)
    return build_actor(meta).to(cfg.train.device), meta


def make_loss(cfg: Config, actor) -> JointGRPOLoss:
    c = cfg.loss
    return JointGRPOLoss(actor, epsilon_low=c.epsilon_low, epsilon_high=c.epsilon_high,
                         entropy_coef=c.entropy_coef, beta=c.beta, scale_rewards=c.scale_rewards)


def make_logger(output_dir: Path) -> SummaryWriter:
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))


# ---------------------------------------------------------------- evaluation
def evaluate(env, actor, sample_index, budgets) -> tuple[dict, object]:
    """Greedy policy on fixed held-out samples and budgets; on the dummy backend also the
    expected, optimal and uniform-random rewards on the same pairs."""
    actor.eval()
    episodes = run_episodes(env, actor, sample_index, budgets, greedy=True)
    actor.train()
    metrics = summarize(episodes)
    if hasattr(env.backend, "expected_rewards"):
        metrics.update(dummy_reference_rewards(env, episodes))
    return metrics, episodes


def prepare_output_dir(output_dir: Path, resume: bool) -> None:
    """Refuse to start a fresh run over an earlier one: nothing already written is lost."""
    if not resume and (output_dir / "checkpoints").exists():
        raise SystemExit(f"error: output_dir {output_dir} already holds a run (checkpoints/); pass --resume to "
                         f"continue it or choose another --output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = resolve_config(args)
    if cfg.train.use_multi_gpu:
        raise SystemExit("error: --use_multi_gpu is not available yet: rollouts run one request at a time on one "
                         "device (batch size 1 per execution, for honest latency); run without it")
    config_name = Path(args.config).stem
    output_dir = Path(args.output_dir or REPO / "runs" / f"{config_name}-{dt.datetime.now():%Y%m%d-%H%M%S}")
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)

    # Everything that can fail on bad input is built before anything is written.
    backend = make_backend_from_config(cfg)
    tc, ec = cfg.train, cfg.eval
    train_env = make_env(cfg, backend, "train", tc.batch_size, tc.group_size)
    val_env = make_env(cfg, backend, "val", ec.batch_size, 1)
    actor, meta = make_actor(cfg, backend)
    if tc.load_stage1_checkpoint:
        load_stage1_weights(actor, tc.load_stage1_checkpoint, meta)
    loss_module = make_loss(cfg, actor)
    optimizer = make_optimizer(actor, cfg.optim.lr, cfg.optim.stage1_lr_ratio, cfg.optim.weight_decay)
    steps_per_epoch = tc.steps_per_epoch or max(1, len(train_env.samples) // tc.batch_size)
    start_epoch, step, best_val = 0, 0, -math.inf
    resume_ckpt = None
    if args.resume:
        resume_path = output_dir / "checkpoints" / "latest.pt" if args.resume == "latest" else Path(args.resume)
        resume_ckpt = load_checkpoint(resume_path)
        check_compatible(resume_ckpt["policy_meta"], meta, resume_path)
    prepare_output_dir(output_dir, resume=resume_ckpt is not None)
    if resume_ckpt is not None:
        actor.load_state_dict(resume_ckpt["policy"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        start_epoch, step, best_val = resume_ckpt["epoch"] + 1, resume_ckpt["step"], resume_ckpt["best_val_reward"]
        set_rng_state(resume_ckpt["rng"])
        train_env.rng.set_state(resume_ckpt["env_rng"])
    if not (output_dir / "config.yaml").exists():
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    writer = make_logger(output_dir)
    metrics_file = open(output_dir / "metrics.jsonl", "a")
    val_index, val_budgets = heldout_budgets(val_env, ec.val_samples, seed=cfg.train.seed + 1)

    def log(tag_values: dict, step: int) -> None:
        for tag, value in tag_values.items():
            writer.add_scalar(tag, value, step)
        metrics_file.write(json.dumps({"step": step, "time": time.time(), **tag_values}) + "\n")
        metrics_file.flush()

    def checkpoint(name: str, epoch: int) -> None:
        save_checkpoint(output_dir / "checkpoints" / name, policy=actor.state_dict(), optimizer=optimizer.state_dict(),
                        step=step, epoch=epoch, best_val_reward=best_val, rng=rng_state(),
                        env_rng=train_env.rng.get_state(), policy_meta=meta, config=cfg.to_dict())

    def validate() -> dict:
        metrics, _ = evaluate(val_env, actor, val_index, val_budgets)
        log({f"val/{k}": v for k, v in metrics.items()}, step)
        if ec.sweep_budgets:
            budgets = default_budgets(backend.budget_range_ms, ec.sweep_budgets)
            rows = controller_budget_sweep(val_env, actor, val_index[: ec.sweep_samples], budgets)
            writer.add_figure("val/accuracy_vs_budget", accuracy_vs_budget_figure(rows), step)
        return metrics

    if start_epoch == 0:
        validate()

    progress = tqdm(total=(tc.num_epochs - start_epoch) * steps_per_epoch, desc="train", dynamic_ncols=True,
                    disable=None)
    for epoch in range(start_epoch, tc.num_epochs):
        for _ in range(steps_per_epoch):
            # Collect: B x G episodes, both stages, terminal reward per episode.
            rollout = collect_rollouts(train_env, actor)
            loss_module.compute_advantages(rollout)
            # Update: several epochs over the batch with the clipped joint objective.
            for _ in range(cfg.loss.num_iterations):
                losses = loss_module(rollout)
                total = losses["loss_objective"] + losses["loss_entropy"] + losses["loss_kl"]
                optimizer.zero_grad()
                total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(actor.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
            step += 1

            info = rollout["next", "episode"][:, -1]
            train_metrics = {
                "train/reward": float(rollout["next", "reward"][:, -1].mean()),
                "train/accuracy": float(info["accuracy"].mean()),
                "train/latency_mean_ms": float(info["latency_ms"].mean()),
                "train/violation_rate": float(info["violation"].mean()),
                "train/frac_reward_zero_std": float(rollout["reward_zero_std"][:, 0].float().mean()),
                "train/grad_norm": float(grad_norm),
            }
            progress.update(1)
            progress.set_postfix(reward=f"{train_metrics['train/reward']:.3f}",
                                 viol=f"{train_metrics['train/violation_rate']:.2f}")
            if step % cfg.logging.log_every == 0:
                for k, v in losses.items():
                    train_metrics[f"loss/{k}"] = float(v.detach())
                log(train_metrics, step)
                if cfg.logging.histograms:
                    for h in ACTION_HEADS:
                        writer.add_histogram(f"actions/{h}", rollout["action", h][:, 0 if h in ("tier", "insertion") else 1].flatten(), step)

        if (epoch + 1) % ec.val_every_epochs == 0 or epoch + 1 == tc.num_epochs:
            val_metrics = validate()
            if val_metrics["reward_mean"] > best_val:
                best_val = val_metrics["reward_mean"]
                checkpoint("best.pt", epoch)
        checkpoint("latest.pt", epoch)
    progress.close()

    # Final evaluation of the best-by-validation policy on held-out test samples.
    best_path = output_dir / "checkpoints" / "best.pt"
    best_step = step
    if best_path.exists():
        best = load_checkpoint(best_path)
        actor.load_state_dict(best["policy"])
        best_step = best["step"]
    test_env = make_env(cfg, backend, "test", ec.batch_size, 1)
    test_index, test_budgets = heldout_budgets(test_env, ec.test_samples, seed=cfg.train.seed + 2)
    final, _ = evaluate(test_env, actor, test_index, test_budgets)
    # The uniform-random policy on the same samples and budgets: the floor learning must clear.
    random_policy = RandomPolicy(backend.knob_space, backend.d_model, seed=cfg.train.seed)
    final["uniform_random"] = summarize(run_episodes(test_env, random_policy, test_index, test_budgets, greedy=False))
    final.update({"checkpoint": str(best_path), "checkpoint_step": best_step, "step": step, "split": "test"})
    (output_dir / "final_eval.json").write_text(json.dumps(final, indent=2))
    log({f"test/{k}": v for k, v in final.items() if isinstance(v, (int, float))}, step)
    log({f"test/random_{k}": v for k, v in final["uniform_random"].items()}, step)
    writer.close()
    metrics_file.close()
    print(json.dumps(final, indent=2))
    return final


if __name__ == "__main__":
    main()
