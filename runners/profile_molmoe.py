"""Profile a MolmoE checkpoint for training: block importance, every static configuration's
accuracy and latency, the budget range, and decode ms/token per configuration.

    python runners/profile_molmoe.py --model_path DIR --output_dir OUT [--device cuda --dtype bfloat16]
        [--num_samples 16] [--dataset_names synthvqa | text_vqa coco_2014_vqa okvqa --data_root DIR]
        [--image_size W H] [--random_from TEMPLATE_DIR]

Writes to OUT (then `runners/train.py --backend molmoe --model_path DIR --results_dir OUT`):
  importance.json  block_influence scores (envs.backends.molmoe.measure) on the val split
  profile.json     configs (tier x top-k x num_blocks at p = 1: accuracy, latency mean / p95, phase
                   means, decode_ms_per_token, vision tokens) and budget_range_ms (the rule of
                   envs.profiling.budget_range), machine, meta
--random_from TEMPLATE: when DIR holds no checkpoint yet, first write one there with MolmoE-1B's
published sizes (config.MOLMOE_1B_SIZES) and random weights in the published layout (sharded),
taking the tokenizer and processor files from TEMPLATE (e.g. the reference fixture): the latency
of the real model's shapes where its weights are not available (accuracy is then meaningless).
--image_size W H: the backend's image_size (resize every image first). SynthVQA renders 192-px
scenes, which Molmo's tiling rule never splits; photo-sized images make the tiers differ as on COCO.
Train with the same image_size (configs/molmoe.yaml) so the budgets match the episodes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from agents.baselines import all_static_configs
from envs.backends.molmoe import MolmoEBackend, MolmoEConfig, write_random_checkpoint
from envs.backends.molmoe.config import CONFIG_FILE, PREPROCESSOR_FILE, TOKENIZER_FILE, molmoe_1b_config
from envs.backends.molmoe.measure import block_influence, measure_configs
from envs.backends.molmoe.weights import INDEX_FILE, WEIGHTS_FILE
from envs.machine import machine_info
from envs.profiling import BUDGET_RANGE_RULE, budget_range, write_json

TEMPLATE_FILES = (PREPROCESSOR_FILE, TOKENIZER_FILE, "generation_config.json", "tokenizer_config.json",
                  "special_tokens_map.json")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", required=True, help="MolmoE checkpoint dir (published layout)")
    ap.add_argument("--output_dir", required=True, help="where importance.json and profile.json go")
    ap.add_argument("--random_from", help="template dir: build a random full-size checkpoint at --model_path first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--dataset_names", nargs="+", default=["synthvqa"])
    ap.add_argument("--data_root", default=None)
    ap.add_argument("--num_samples", type=int, default=16, help="val samples per configuration")
    ap.add_argument("--importance_samples", type=int, default=16, help="val samples for block influence")
    ap.add_argument("--image_size", type=int, nargs=2, metavar=("W", "H"), help="backend image_size: resize images first")
    ap.add_argument("--max_new_tokens", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds over all configs first")
    ap.add_argument("--tiers", nargs="+", help="profile only these tiers (default: all)")
    ap.add_argument("--num_threads", type=int, help="torch CPU threads (1 is steadiest on a shared CPU)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def build_random_checkpoint(model_path: Path, template: Path, device: str) -> None:
    data = molmoe_1b_config(json.loads((template / CONFIG_FILE).read_text()))
    model_path.mkdir(parents=True)
    (model_path / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
    for name in TEMPLATE_FILES:
        if (template / name).is_file():
            shutil.copy(template / name, model_path / name)
    write_random_checkpoint(MolmoEConfig.load(model_path), model_path, device=device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    model_path, out = Path(args.model_path), Path(args.output_dir)
    t_start = time.perf_counter()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.random_from and not ((model_path / WEIGHTS_FILE).is_file() or (model_path / INDEX_FILE).is_file()):
        log(f"writing a random full-size MolmoE-1B checkpoint to {model_path}")
        build_random_checkpoint(model_path, Path(args.random_from), args.device)
    options = dict(model_path=model_path, dataset_names=args.dataset_names, data_root=args.data_root,
                   num_samples={"val": max(args.num_samples, args.importance_samples)}, seed=args.seed,
                   device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens, image_size=args.image_size)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="molmoe-profile-") as tmp:
        layers = MolmoEConfig.load(model_path).n_layers
        # The backend needs an importance.json to start; block influence ignores it (every block runs).
        Path(tmp, "importance.json").write_text(json.dumps(
            {"method": "placeholder", "scores": {str(i): 0.0 for i in range(layers)}}))
        t0 = time.perf_counter()
        backend = MolmoEBackend(results_dir=tmp, budget_range_ms=(1.0, 2.0), **options)
        load_s = time.perf_counter() - t0
        samples = list(backend.dataset("val"))
        top_tier = backend.knob_space.tiers[-1]
        scores = block_influence(backend, samples[: args.importance_samples], top_tier)
    importance = {"method": "block_influence", "scores": {str(b): s for b, s in scores.items()}}
    write_json(out / "importance.json", importance)
    log(f"importance: {importance['scores']}")
    backend = MolmoEBackend(results_dir=out, budget_range_ms=(1.0, 2.0), **options)
    configs = all_static_configs(backend.knob_space)
    if args.tiers:
        unknown = sorted(set(args.tiers) - set(backend.knob_space.tiers))
        if unknown:
            raise ValueError(f"--tiers {unknown} not known; expected a subset of {list(backend.knob_space.tiers)}")
        configs = [c for c in configs if c.tier in args.tiers]
    rows = measure_configs(backend, samples[: args.num_samples], configs, warmup=args.warmup, seed=args.seed,
                           progress=log)
    try:
        (lo, hi), rule, _ = budget_range(rows)
        span = [lo, hi]
    except ValueError as err:
        span, rule = None, f"none: {err}"
    profile = {
        "configs": rows,
        "budget_range_ms": span,
        "budget_range_rule": BUDGET_RANGE_RULE,
        "budget_range_rule_applied": rule,
        "num_samples": args.num_samples,
        "machine": machine_info(),
        "meta": {
            "model_path": str(model_path), "random_weights": bool(args.random_from), "device": args.device,
            "dtype": args.dtype, "dataset_names": args.dataset_names, "image_size": args.image_size,
            "tier_max_crops": backend.tier_max_crops, "max_new_tokens": args.max_new_tokens,
            "knob_space": backend.knob_space.to_dict(), "load_s": load_s,
            "latency_method": "batch-1 MolmoEBackend episodes, zero budget token, timed by the backend's hook "
                              "meter; total = preprocess + vision + prefill + decode (ms); configs shuffled per "
                              f"sample after {args.warmup} warm-up round(s)",
            "total_s": time.perf_counter() - t_start,
        },
    }
    write_json(out / "profile.json", profile)
    print("| config | crops | vision tokens | accuracy | latency mean ms | p95 ms | prefill ms | decode ms/token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_token = "-" if r["decode_ms_per_token"] is None else f"{r['decode_ms_per_token']:.2f}"
        print(f"| {r['tier']}/k{r['top_k']}/N{r['num_blocks']} | {r['crops_mean']:.1f} | {r['vision_tokens_mean']:.0f} "
              f"| {r['accuracy_mean']:.3f} | {r['latency_mean_ms']:.1f} | {r['latency_p95_ms']:.1f} "
              f"| {r['prefill_ms']:.1f} | {per_token} |")
    log(f"wrote {out / 'importance.json'} and {out / 'profile.json'} in {time.perf_counter() - t_start:.0f}s")
    return profile


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
