"""MolmoE-1B on one GPU in one command: the latency profile per configuration, decode ms per token per
(top-k, blocks) and a short training run of the controller, written as JSON and as markdown for
docs/BENCHMARKS.md.

    python runners/bench_molmoe.py --model_path /tmp/molmoe-1b-random \\
        --random_from ../shared/fixtures/molmoe-reference --output_dir runs/molmoe-gpu --device cuda

Steps, each timed (the runners run as child processes of this one: a runner never imports another):
 1. checkpoint  only when --model_path holds no weights yet: --random_from TEMPLATE is required and
                envs.backends.molmoe.build_random_checkpoint writes MolmoE-1B's published sizes
                with random weights (bfloat16, sharded as published, 14.4 GB) and TEMPLATE's
                tokenizer and processor files (the reference fixture's are the real ones). With
                random weights every accuracy is meaningless; the latencies are the real shapes'.
 2. profile     runners/profile_configs.py --backend molmoe -> OUT/profile: importance, accuracy
                and batch-1 latency of every static configuration of the grid (--tiers, --top_k,
                --num_blocks; default all: 3 tiers x 5 top-k x 5 block counts at p = 1) on
                --num_samples samples (--latency_samples of them timed, after --warmup rounds),
                with decode_ms_per_token per configuration.
 3. train       runners/train.py --config --train_config (default configs/molmoe.yaml: 2 epochs of
                5 GRPO steps, 4 x 4 episodes each) against OUT/profile -> OUT/train.
 4. report      OUT/molmoe_gpu.json and OUT/molmoe_gpu.md: machine, stage times, the profile table,
                decode ms/token per (top-k, blocks) at the top profiled tier, the training curve
                and final_eval.json against the uniform-random policy.
The profile runs with the training config's backend options (dtype, image_size, max_new_tokens) and
data, so the budget range it writes is the one of the episodes the controller trains on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = "molmoe_gpu"
PHASES = ("preprocess", "vision", "prefill", "decode")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", required=True, help="MolmoE checkpoint dir (written first when it has no weights)")
    ap.add_argument("--random_from", default=None,
                    help="template dir (config, tokenizer, processor files) of the random checkpoint")
    ap.add_argument("--output_dir", required=True, help="where profile/, train/ and the report go (must be new)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (its CPU path, for tests)")
    ap.add_argument("--train_config", default=str(ROOT / "configs" / "molmoe.yaml"), help="YAML config of the run")
    ap.add_argument("--num_samples", type=int, default=8, help="profile: samples per configuration (accuracy)")
    ap.add_argument("--latency_samples", type=int, default=4, help="profile: samples timed per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="profile: untimed rounds over all configurations first")
    ap.add_argument("--tiers", nargs="+", default=None, help="profile: subset of tiers (default all)")
    ap.add_argument("--top_k", nargs="+", default=None, help="profile: subset of top-k values (default all)")
    ap.add_argument("--num_blocks", nargs="+", default=None, help="profile: subset of block counts (default all)")
    ap.add_argument("--threads", type=int, default=4, help="torch CPU threads of both stages (preprocessing)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random checkpoint and the profile")
    return ap.parse_args(argv)


def validate(args: argparse.Namespace):
    """The training config (its backend must be molmoe) and the checked paths; nothing is written."""
    from agents.config import load_config
    from envs.machine import resolve_device
    from envs.profiling import check_model_dir, check_positive_int

    for name in ("num_samples", "latency_samples", "threads"):
        check_positive_int(f"--{name}", getattr(args, name))
    if args.latency_samples > args.num_samples:
        raise ValueError(f"--latency_samples={args.latency_samples} is invalid; expected <= --num_samples="
                         f"{args.num_samples} (latency is timed on a subset of the profiled samples)")
    if args.warmup < 0:
        raise ValueError(f"--warmup={args.warmup} is invalid; expected an int >= 0")
    args.device = str(resolve_device(args.device, "--device"))
    cfg = load_config(args.train_config)
    if cfg.env.backend != "molmoe":
        raise ValueError(f"--train_config {args.train_config}: env.backend is {cfg.env.backend!r}, expected 'molmoe'")
    out = Path(args.output_dir)
    taken = [name for name in ("profile", "train", f"{REPORT}.json") if (out / name).exists()]
    if taken:
        raise FileExistsError(f"--output_dir={str(out)!r} already holds {taken}; give a new directory")
    model_path = Path(args.model_path)
    if needs_checkpoint(model_path):
        if args.random_from is None:
            raise FileNotFoundError(f"--model_path={str(model_path)!r} holds no weights; pass --random_from TEMPLATE "
                                    f"to write a random MolmoE-1B checkpoint there first")
        template = Path(args.random_from)
        if not (template / "config.json").is_file() or not (template / "tokenizer.json").is_file():
            raise FileNotFoundError(f"--random_from={str(template)!r}: expected a MolmoE checkpoint dir with "
                                    f"config.json and tokenizer.json (e.g. ../shared/fixtures/molmoe-reference)")
    else:
        check_model_dir(model_path, "--model_path", "molmoe")
    return cfg


def needs_checkpoint(model_path: Path) -> bool:
    return not ((model_path / "model.safetensors").is_file() or (model_path / "model.safetensors.index.json").is_file())


def run_stage(name: str, script: str, flags: list[str]) -> tuple[float, list[str]]:
    """runners/<script> in a child process on this checkout; (seconds, command)."""
    cmd = [sys.executable, str(ROOT / "runners" / script), *flags]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    log(f"{name}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    status = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    if status != 0:
        raise RuntimeError(f"stage {name} failed with exit status {status}: {' '.join(cmd)}")
    return time.perf_counter() - t0, cmd


def log(msg: str) -> None:
    print(f"[bench_molmoe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def profile_flags(args, cfg, out: Path) -> list[str]:
    options = cfg.env.backend_options
    flags = ["--backend", "molmoe", "--model_path", str(args.model_path), "--output_dir", str(out),
             "--device", args.device, "--dtype", str(options.get("dtype", "float32")),
             "--num_samples", str(args.num_samples), "--latency_samples", str(args.latency_samples),
             "--importance_samples", str(args.num_samples), "--warmup", str(args.warmup),
             "--max_new_tokens", str(options.get("max_new_tokens", 4)), "--threads", str(args.threads),
             "--seed", str(args.seed), "--batch_size", str(args.num_samples)]
    if options.get("image_size") is not None:
        flags += ["--image_size", *map(str, options["image_size"])]
    if cfg.data.dataset_names:
        flags += ["--dataset_names", *cfg.data.dataset_names]
    if cfg.data.data_root:
        flags += ["--data_root", str(cfg.data.data_root)]
    for name in ("tiers", "top_k", "num_blocks"):
        if getattr(args, name):
            flags += [f"--{name}", *getattr(args, name)]
    return flags


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = validate(args)
    from envs.backends.molmoe import MolmoEConfig, build_random_checkpoint, published_shapes
    from envs.files import write_json
    from envs.machine import machine_info

    out, model_path = Path(args.output_dir), Path(args.model_path)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    stages, commands = {}, {}
    report = {
        "machine": machine_info(),
        "device": args.device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python runners/bench_molmoe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commands": commands,
        "stages_s": stages,
    }

    def save() -> None:  # after every stage, so a run cut short keeps what it measured
        stages["total_s"] = time.perf_counter() - t_start
        write_json(out / f"{REPORT}.json", report)
        if "train" in report:
            (out / f"{REPORT}.md").write_text(to_markdown(report))

    built = needs_checkpoint(model_path)
    if built:
        log(f"checkpoint: writing a random MolmoE-1B checkpoint to {model_path}")
        t0 = time.perf_counter()
        build_random_checkpoint(model_path, args.random_from, device=args.device, seed=args.seed)
        stages["checkpoint_s"] = time.perf_counter() - t0
    model_cfg = MolmoEConfig.load(model_path)
    report["model"] = {
        "model_path": str(model_path), "random_weights_built_here": built,
        "parameters": sum(math.prod(s) for s in published_shapes(model_cfg).values()),
        "decoder": {"d_model": model_cfg.d_model, "blocks": model_cfg.n_layers,
                    "experts": model_cfg.moe_num_experts, "top_k": model_cfg.moe_top_k},
        "vision": {"layers": model_cfg.image_num_layers, "width": model_cfg.image_emb_dim,
                   "crop_size": model_cfg.crop_size},
    }
    save()
    stages["profile_s"], commands["profile"] = run_stage("profile", "profile_configs.py",
                                                         profile_flags(args, cfg, out / "profile"))
    profile = json.loads((out / "profile" / "profile.json").read_text())
    report.update(profile=profile_summary(profile), decode_ms_per_token=decode_table(profile["configs"]))
    save()
    train_flags = ["--config", str(args.train_config), "--backend", "molmoe", "--model_path", str(model_path),
                   "--results_dir", str(out / "profile"), "--output_dir", str(out / "train"), "--device", args.device,
                   "--num_threads", str(args.threads)]
    stages["train_s"], commands["train"] = run_stage("train", "train.py", train_flags)
    report["train"] = {"config": str(args.train_config), **train_summary(out / "train")}
    save()
    log(f"wrote {out / (REPORT + '.json')} and {out / (REPORT + '.md')} in {stages['total_s']:.0f}s")
    return report


def profile_summary(profile: dict) -> dict:
    meta = profile["meta"]
    keep = ("tier", "top_k", "num_blocks", "blocks", "crops_mean", "vision_tokens_mean", "latency_mean_ms",
            "latency_p95_ms", *(f"{p}_ms" for p in PHASES), "decode_ms_per_token", "latency_samples")
    return {
        "budget_range_ms": profile["budget_range_ms"],
        "num_samples": profile["num_samples"],
        "latency_samples": profile["latency_samples"],
        "meta": {k: meta[k] for k in ("dtype", "image_size", "max_new_tokens", "executor", "expert_kernel",
                                      "latency_method", "timing_s")},
        "configs": [{k: row[k] for k in keep} for row in profile["configs"]],
    }


def decode_table(rows: list[dict]) -> dict:
    """decode ms/token per (top-k, blocks) at the top profiled tier (p = 1; rows come in tier order)."""
    top = rows[-1]["tier"]
    return {"tier": top, "rows": [{"top_k": r["top_k"], "num_blocks": r["num_blocks"],
                                   "ms_per_token": r["decode_ms_per_token"]} for r in rows if r["tier"] == top]}


def train_summary(run: Path) -> dict:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [m for m in metrics if "train/reward" in m]
    val = [m for m in metrics if "val/reward_mean" in m]
    curve = [{k.split("/", 1)[1]: m[k] for k in ("train/reward", "train/accuracy", "train/latency_mean_ms",
                                                  "train/violation_rate")} | {"step": m["step"]} for m in train]
    return {
        "steps": train[-1]["step"] if train else 0,
        "curve": curve,
        "val": [{"step": m["step"], **{k[4:]: m[k] for k in ("val/reward_mean", "val/accuracy_mean",
                                                              "val/latency_mean_ms", "val/violation_rate")}}
                for m in val],
        "final_eval": json.loads((run / "final_eval.json").read_text()),
    }


def to_markdown(r: dict) -> str:
    m, model, s = r["machine"], r["model"], r["stages_s"]
    gpu = f", GPU {m['cuda_device']}" if "cuda_device" in m else ""
    p = r["profile"]
    stage_text = ", ".join(f"{name} {s[name + '_s']:.0f} s" for name in ("checkpoint", "profile", "train", "total")
                           if name + "_s" in s)
    weights = "random weights written by this run" if model["random_weights_built_here"] else "its own weights"
    span = ("none (see profile.json)" if p["budget_range_ms"] is None
            else "{:.1f} - {:.1f} ms".format(*p["budget_range_ms"]))
    size = "as loaded" if p["meta"]["image_size"] is None else "x".join(map(str, p["meta"]["image_size"]))
    lines = [
        f"Model: {model['model_path']} ({weights}, {model['parameters']:,} parameters: decoder "
        f"{model['decoder']['blocks']} blocks, d "
        f"{model['decoder']['d_model']}, {model['decoder']['experts']} experts, top-{model['decoder']['top_k']}; "
        f"ViT {model['vision']['layers']} layers of width {model['vision']['width']}, "
        f"{model['vision']['crop_size']}-px crops) on {r['device']} ({p['meta']['dtype']}, decode "
        f"{p['meta']['executor']['decode']}, images {size}). Machine: {m['cpu_model']}, "
        f"{m['cpu_cores']} cores{gpu}, torch {m['torch_version']}. Date: {r['date']}. Stages: {stage_text}.",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Latency profile (batch-1 episodes, p = 1, zero budget token, {p['latency_samples']} timed samples per "
        f"configuration; ms). Training budget range: {span}.",
        "",
        "| config | crops | vision tokens | mean | p95 | preprocess | vision | prefill | decode | decode ms/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in p["configs"]:
        per_token = "-" if c["decode_ms_per_token"] is None else f"{c['decode_ms_per_token']:.2f}"
        lines.append(f"| {c['tier']}/k{c['top_k']}/N{c['num_blocks']} | {c['crops_mean']:.1f} | "
                     f"{c['vision_tokens_mean']:.0f} | {c['latency_mean_ms']:.1f} | {c['latency_p95_ms']:.1f} | "
                     + " | ".join(f"{c[f'{ph}_ms']:.1f}" for ph in PHASES) + f" | {per_token} |")
    d = r["decode_ms_per_token"]
    ks = sorted({row["top_k"] for row in d["rows"]})
    ns = sorted({row["num_blocks"] for row in d["rows"]})
    cell = {(row["top_k"], row["num_blocks"]): row["ms_per_token"] for row in d["rows"]}
    lines += ["", f"Decode ms per token at the {d['tier']} tier (rows top-k, columns blocks kept; the decode phase "
              f"over its steps after the first token, {p['meta']['max_new_tokens'] - 1} per episode at most):", "",
              "| top-k | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join("-" if cell.get((k, n)) is None else f"{cell[k, n]:.2f}" for n in ns)
                     + " |")
    t = r["train"]
    final, rnd = t["final_eval"], t["final_eval"]["uniform_random"]
    lines += ["", f"Training ({t['steps']} GRPO steps of {t['config']}; per step the mean over its "
              "episodes):", "",
              "| step | reward | accuracy | latency mean (ms) | violation rate |", "|---|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['reward']:.3f} | {c['accuracy']:.3f} | {c['latency_mean_ms']:.1f} | "
              f"{c['violation_rate']:.3f} |" for c in t["curve"]]
    lines += ["", "| final evaluation (test) | reward | accuracy | latency mean (ms) | violation rate |",
              "|---|---|---|---|---|"]
    for name, e in (("controller (greedy)", final), ("uniform random", rnd)):
        lines.append(f"| {name} | {e['reward_mean']:.3f} | {e['accuracy_mean']:.3f} | {e['latency_mean_ms']:.1f} | "
                     f"{e['violation_rate']:.3f} |")
    return "\n".join(lines) + "\n"


def cli(argv=None) -> int:
    """main() with a user's mistake as one line on stderr and status 2 (agents.cli)."""
    from agents.cli import exit_status

    return exit_status(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
