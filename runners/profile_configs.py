"""Profile every static configuration of the embedded VLM or of a MolmoE checkpoint; write
profile.json and importance.json.

    python runners/profile_configs.py --model_path envs/assets/budgetvlm-molmoe-tiny --output_dir DIR \
        --num_samples 500 --latency_samples 20 --split test
    python runners/profile_configs.py --backend molmoe --model_path MOLMOE_DIR --output_dir DIR \
        --device cuda --dtype bfloat16 --image_size 640 480 --num_samples 16 --latency_samples 8

--backend vlm (default) profiles the embedded model (VLMBackend), --backend molmoe a published
MolmoE checkpoint (MolmoEBackend; --image_size W H resizes every image first, as the backend's
image_size, and training must use the same). Every step below is the same code for both.

Steps (library code in the envs/profiling package):
 1. Block importance on --importance_split (default val, so the test split stays unseen), in the
    full configuration, by both methods: drop_accuracy (the design's: accuracy drop when block i
    alone is removed) and block_influence (ShortGPT: 1 - cos(block input, output)). The one named
    by --importance_method is written as importance.json (what the backend reads from its
    results_dir), the other as importance_<method>.json. --importance_file FILE instead uses an
    existing importance.json (e.g. the pretraining run's) for the profile; both methods are still
    computed and written as importance_<method>.json unless --skip_importance.
 2. Accuracy of every configuration tier x top-k x num_blocks (p = 1, block 0 at k = 8, blocks
    kept by importance via envs.knobs.select_blocks, a zero budget token) on --num_samples samples
    of --split, with the batched evaluator (the same elastic code path as a batch-1 episode).
 3. Latency of every configuration at batch size 1 through the backend's episodes (its hook
    meter) on the first --latency_samples of those samples, after --warmup rounds; per
    configuration also the phase means, decode ms per token (decode time over the decode steps
    after the first token) and the vision tokens (and MolmoE's crops) per request.
 4. budget_range_ms from the latency Pareto frontier (envs.profiling.BUDGET_RANGE_RULE).
Existing profile.json / importance.json in --output_dir are not overwritten without --overwrite.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

IMPORTANCE_JSON = "importance.json"
PROFILE_JSON = "profile.json"


def _lib():
    """torch and envs.profiling, imported on first use (so --help answers at once)."""
    import torch
    from envs import profiling

    return torch, profiling


def parse_args(argv=None) -> argparse.Namespace:
    _, P = _lib()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="vlm", help=f"one of {P.PROFILE_BACKENDS}: the embedded model or MolmoE")
    ap.add_argument("--model_path", required=True,
                    help="model dir (vlm: config.json, model.safetensors, tokenizer.json; molmoe: as published)")
    ap.add_argument("--dtype", default="float32", help="weights' dtype (float32, bfloat16; molmoe also float16)")
    ap.add_argument("--image_size", type=int, nargs=2, metavar=("W", "H"), default=None,
                    help="molmoe: resize every image to W x H first (the backend's image_size)")
    ap.add_argument("--output_dir", required=True, help="where profile.json and importance*.json go")
    ap.add_argument("--num_samples", type=int, default=500, help="samples for accuracy (batched)")
    ap.add_argument("--latency_samples", type=int, default=20, help="samples timed at batch size 1 per config")
    ap.add_argument("--split", default="test", help=f"one of {P.SPLITS}")
    ap.add_argument("--importance_split", default="val", help=f"split for block importance, one of {P.SPLITS}")
    ap.add_argument("--importance_samples", type=int, default=None, help="default: --num_samples")
    ap.add_argument("--importance_method", default="drop_accuracy", help=f"written as importance.json: {P.IMPORTANCE_METHODS}")
    ap.add_argument("--importance_file", default=None, help="use this importance.json for the profile instead")
    ap.add_argument("--skip_importance", action="store_true", help="with --importance_file: compute no importance")
    ap.add_argument("--tiers", nargs="+", default=None, help="subset of tiers (default all)")
    ap.add_argument("--top_k", nargs="+", type=int, default=None, help="subset of top-k values (default all)")
    ap.add_argument("--num_blocks", nargs="+", type=int, default=None, help="subset of num_blocks values (default all)")
    ap.add_argument("--dataset_names", nargs="+", default=["synthvqa"])
    ap.add_argument("--data_root", default=None)
    ap.add_argument("--max_new_tokens", type=int, default=4, help="greedy decode limit (the backends' default)")
    ap.add_argument("--batch_size", type=int, default=64, help="batch of the accuracy evaluator")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds over all configs before timing")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared CPU, extra OpenMP threads contend and make "
                         "batch-1 latency erratic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA: decode steps run as CUDA graphs)")
    ap.add_argument("--accuracy_from", type=Path, default=None,
                    help="reuse the accuracy rows of this earlier profile.json of the same weights, split and "
                         "samples, and measure only latency (latency drifts with the machine, accuracy does not)")
    ap.add_argument("--overwrite", action="store_true")
    return ap.parse_args(argv)


def validate(args: argparse.Namespace) -> None:
    _, P = _lib()
    if args.backend not in P.PROFILE_BACKENDS:
        raise ValueError(f"--backend={args.backend!r} is not known; expected one of {P.PROFILE_BACKENDS}")
    args.model_path = P.check_model_dir(args.model_path, "--model_path", args.backend)
    if args.image_size is not None and args.backend != "molmoe":
        raise ValueError(f"--image_size is an option of --backend molmoe, not of --backend {args.backend}")
    from envs.backends import backend_class

    dtypes = backend_class(args.backend).DTYPES
    if args.dtype not in dtypes:
        raise ValueError(f"--dtype={args.dtype!r} is not supported by --backend {args.backend}; "
                         f"expected one of {tuple(dtypes)}")
    P.check_positive_int("--num_samples", args.num_samples)
    P.check_positive_int("--latency_samples", args.latency_samples)
    if args.latency_samples > args.num_samples:
        raise ValueError(
            f"--latency_samples={args.latency_samples} is invalid; expected <= --num_samples={args.num_samples} "
            f"(latency is timed on a subset of the accuracy samples)"
        )
    if args.importance_samples is None:
        args.importance_samples = args.num_samples
    P.check_positive_int("--importance_samples", args.importance_samples)
    P.check_positive_int("--max_new_tokens", args.max_new_tokens)
    P.check_positive_int("--batch_size", args.batch_size)
    P.check_positive_int("--threads", args.threads)
    if isinstance(args.warmup, bool) or not isinstance(args.warmup, int) or args.warmup < 0:
        raise ValueError(f"--warmup={args.warmup!r} is invalid; expected an int >= 0")
    if args.seed < 0:
        raise ValueError(f"--seed={args.seed} is invalid; expected an int >= 0")
    from envs.machine import resolve_device

    resolve_device(args.device, "--device")
    P.check_split(args.split, "--split")
    P.check_split(args.importance_split, "--importance_split")
    if args.importance_method not in P.IMPORTANCE_METHODS:
        raise ValueError(f"--importance_method={args.importance_method!r} is not known; expected one of {P.IMPORTANCE_METHODS}")
    if args.skip_importance and args.importance_file is None:
        raise ValueError("--skip_importance needs --importance_file (the profile needs some block importance)")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir={str(out)!r} exists and is not a directory")
    args.output_dir = out
    if args.importance_file is not None:
        path = Path(args.importance_file)
        if path.is_dir():
            path = path / IMPORTANCE_JSON
        if not path.is_file():
            raise FileNotFoundError(f"--importance_file={str(path)!r} does not exist")
        args.importance_file = path
    if not args.overwrite:
        reused = args.importance_file is not None and args.importance_file.resolve() == (out / IMPORTANCE_JSON).resolve()
        existing = [n for n in (PROFILE_JSON, IMPORTANCE_JSON) if (out / n).exists() and not (n == IMPORTANCE_JSON and reused)]
        if existing:
            raise FileExistsError(
                f"--output_dir={str(out)!r} already has {existing}; pass --overwrite to replace them "
                f"(or --importance_file {out / IMPORTANCE_JSON} to profile with the existing importance)"
            )


def log(msg: str) -> None:
    print(f"[profile {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def reused_accuracy(path: Path, weights_sha256: str, split: str, num_samples: int, configs, blocks) -> dict:
    """{config: accuracy row} from an earlier profile.json, which must describe the same weights,
    split, sample count, configurations and kept blocks (a clear error names what differs)."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--accuracy_from {path}: cannot be read as JSON ({err})") from None
    meta = earlier.get("meta", {})
    for field, have, want in (("weights_sha256", meta.get("weights_sha256"), weights_sha256),
                              ("split", meta.get("split"), split), ("num_samples", earlier.get("num_samples"), num_samples)):
        if have != want:
            raise ValueError(f"--accuracy_from {path}: {field} is {have!r}, this profile's is {want!r}")
    by_name = {(r["tier"], r["top_k"], r["num_blocks"]): r for r in earlier.get("configs", [])}
    rows = {}
    for c in configs:
        row = by_name.get((c.tier, c.top_k, c.num_blocks))
        if row is None or row.get("blocks") != blocks[c]:
            raise ValueError(f"--accuracy_from {path}: no row with the blocks {blocks[c]} of {c.name}")
        rows[c] = {k: row[k] for k in ("tier", "top_k", "num_blocks", "insertion", "blocks", "accuracy_mean",
                                       "accuracy_by_family")}
    return rows


def main(argv=None) -> dict:
    torch, P = _lib()
    from envs.machine import load_average, machine_info
    args = parse_args(argv)
    validate(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    load_start = load_average()
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    sha_start = P.weights_sha256(args.model_path)  # the weights must not change during the run
    sizes = {args.split: args.num_samples}
    sizes[args.importance_split] = max(sizes.get(args.importance_split, 0), args.importance_samples)
    backend_kwargs = dict(
        dataset_names=tuple(args.dataset_names), data_root=args.data_root, num_samples=sizes, seed=args.seed,
        device=args.device, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
    )
    if args.image_size is not None:
        backend_kwargs["image_size"] = tuple(args.image_size)
    timing = {}
    with P.evaluation_backend(args.model_path, args.backend, **backend_kwargs) as backend:
        ks, cfg = backend.knob_space, backend.cfg
        configs = P.static_configs(ks, args.tiers, args.top_k, args.num_blocks)
        samples, skipped = P.load_samples(backend, args.split, args.num_samples)
        if len(samples) < args.num_samples:
            raise ValueError(
                f"--num_samples={args.num_samples}: split {args.split!r} has only {len(samples)} loadable samples"
            )
        log(f"{len(configs)} configs, {len(samples)} {args.split} samples ({skipped} skipped), "
            f"torch threads {torch.get_num_threads()}, load {load_start}")
        evaluator = P.BatchedEvaluator(backend, samples, args.batch_size, args.max_new_tokens)

        # 1. importance
        t0 = time.perf_counter()
        records = {}
        if not args.skip_importance:
            if args.importance_split == args.split and args.importance_samples <= args.num_samples:
                imp_eval = P.BatchedEvaluator(backend, samples[: args.importance_samples], args.batch_size, args.max_new_tokens)
            else:
                imp_samples, _ = P.load_samples(backend, args.importance_split, args.importance_samples)
                imp_eval = P.BatchedEvaluator(backend, imp_samples, args.batch_size, args.max_new_tokens)
            records = P.compute_importance(imp_eval, ks, cfg.top_k)
            for rec in records.values():
                rec["split"] = args.importance_split
            del imp_eval
        if args.importance_file is not None:
            method, scores = P.read_importance(args.importance_file, ks.num_layers)
            source = str(args.importance_file)
            if args.importance_file.resolve() != (out / IMPORTANCE_JSON).resolve():
                shutil.copyfile(args.importance_file, out / IMPORTANCE_JSON)
            for name, rec in records.items():
                P.write_json(out / f"importance_{name}.json", rec)
        else:
            method = args.importance_method
            scores = {int(b): s for b, s in records[method]["scores"].items()}
            source = "computed"
            P.write_json(out / IMPORTANCE_JSON, records[method])
            for name, rec in records.items():
                if name != method:
                    P.write_json(out / f"importance_{name}.json", rec)
        timing["importance_s"] = time.perf_counter() - t0
        log(f"importance ({method}, {source}) in {timing['importance_s']:.0f}s: "
            + " ".join(f"{b}:{s:.3g}" for b, s in sorted(scores.items())))

        # 2. accuracy (batched), or the rows of an earlier profile of the same weights and samples
        t0 = time.perf_counter()
        if args.accuracy_from is not None:
            reused = reused_accuracy(args.accuracy_from, sha_start, args.split, len(samples), configs,
                                     {c: [b for b, _ in c.plan(scores, ks, cfg.top_k)] for c in configs})
            log(f"accuracy of {len(configs)} configs reused from {args.accuracy_from}")
        evaluator.release_images(sorted({c.tier for c in configs}) if args.accuracy_from is None else [])
        rows = {} if args.accuracy_from is None else reused
        for tier in ks.tiers if args.accuracy_from is None else ():
            tier_configs = [c for c in configs if c.tier == tier]
            if not tier_configs:
                continue
            plans = {c: c.plan(scores, ks, cfg.top_k) for c in tier_configs}
            accs = evaluator.accuracies_many(tier, plans)  # shared plan prefixes run once
            for c, plan in plans.items():
                mean, by_family = P.summarize_accuracy(samples, accs[c])
                rows[c] = {
                    "tier": c.tier, "top_k": c.top_k, "num_blocks": c.num_blocks, "insertion": c.insertion,
                    "blocks": [b for b, _ in plan], "accuracy_mean": mean, "accuracy_by_family": by_family,
                }
            best = max(tier_configs, key=lambda c: rows[c]["accuracy_mean"])
            log(f"accuracy of {len(tier_configs)} {tier} configs after {time.perf_counter() - t0:.0f}s "
                f"(best {best.name}: {rows[best]['accuracy_mean']:.3f})")
        rows = [rows[c] for c in configs]
        timing["accuracy_s"] = time.perf_counter() - t0
        del evaluator

        # 3. latency at batch size 1, through the same backend reading the importance.json just written
        t0 = time.perf_counter()
        backend.read_results(out, budget_range_ms=(1.0, 2.0))
        if backend.importance != scores:
            raise RuntimeError(f"{out / IMPORTANCE_JSON} does not hold the importance the profile used")
        for row, c in zip(rows, configs):
            assert [b for b, _ in c.plan(backend.importance, ks, cfg.top_k)] == row["blocks"]
        if P.weights_sha256(args.model_path) != sha_start:
            raise RuntimeError(
                f"the weights in {args.model_path} changed during profiling (sha256 {sha_start[:12]}... at the "
                f"start); accuracy and latency would describe different weights - rerun once the checkpoint is final"
            )
        lat_samples = samples[: args.latency_samples]
        table = P.measure_latency(backend, lat_samples, configs, warmup=args.warmup, seed=args.seed, progress=log)
        timing["latency_s"] = time.perf_counter() - t0
    for row, c in zip(rows, configs):
        runs = table.timings(c)
        row.update(P.latency_stats(table.totals(c)))
        for phase in ("preprocess", "vision", "prefill", "decode"):
            row[f"{phase}_ms"] = sum(t[phase] for t in runs) / len(runs)
        row.update(request_shape(table.results[c]))
        row["num_samples"] = len(samples)
        row["latency_samples"] = len(runs)

    # 4. budget range
    try:
        (lo, hi), rule, front = P.budget_range(rows)
        range_error = None
    except ValueError as err:  # e.g. one config timed on one sample: still write what was measured
        front = P.pareto_frontier(rows)
        lo = hi = None
        rule, range_error = f"none: {err}", str(err)
    for i, row in enumerate(rows):
        row["on_pareto_frontier"] = i in front
    timing["total_s"] = time.perf_counter() - t_start
    profile = {
        "configs": rows,
        "budget_range_ms": None if range_error else [lo, hi],
        "budget_range_rule": P.BUDGET_RANGE_RULE,
        "budget_range_rule_applied": rule,
        "pareto_frontier": [{"tier": rows[i]["tier"], "top_k": rows[i]["top_k"], "num_blocks": rows[i]["num_blocks"]}
                            for i in sorted(front, key=lambda i: rows[i]["latency_mean_ms"])],
        "num_samples": len(samples),
        "latency_samples": args.latency_samples,
        "machine": machine_info(),
        "meta": {
            "backend": args.backend,
            "model_path": str(args.model_path),
            "weights_sha256": sha_start,
            "dtype": args.dtype,
            "image_size": args.image_size,
            "split": args.split,
            "seed": args.seed,
            "dataset_names": list(args.dataset_names),
            "skipped_samples": skipped,
            "insertion": P.PROFILE_INSERTION,
            "first_block_top_k": ks.first_block_top_k,
            "budget_token": P.ZERO_BUDGET_NOTE,
            "max_new_tokens": args.max_new_tokens,
            "accuracy_method": "batched greedy decoding through the executor, the same block calls as a batch-1 "
                               "episode (envs.profiling.BatchedEvaluator), on num_samples samples; fractions in [0, 1]",
            "accuracy_by_family": "SynthVQA question family (dataset name for real datasets)",
            "latency_method": f"batch-1 {type(backend).__name__} episodes timed by the backend's hook meter, "
                              "total = preprocess + "
                              "vision + prefill + decode (ms), configs interleaved per sample in shuffled order, "
                              f"after {args.warmup} untimed warm-up round(s) over all configs",
            "phase_ms": "vision_ms / prefill_ms / decode_ms / preprocess_ms are per-phase means; "
                        "decode_ms_per_token = decode time over the decode steps after the first token",
            "importance": {"method": method, "source": source,
                           "split": None if source != "computed" else args.importance_split,
                           "files": sorted(p.name for p in out.glob("importance*.json"))},
            "knob_space": ks.to_dict(),
            "grid": {"tiers": sorted({c.tier for c in configs}, key=ks.tiers.index),
                     "top_k": sorted({c.top_k for c in configs}), "num_blocks": sorted({c.num_blocks for c in configs})},
            "device": args.device,
            "expert_kernel": backend.describe()["expert_kernel"],
            "executor": backend.executor.describe(),
            "load_average_start": load_start,
            "load_average_end": load_average(),
            "timing_s": timing,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
    }
    P.write_json(out / PROFILE_JSON, profile)
    if range_error:
        raise ValueError(f"{out / PROFILE_JSON} was written without budget_range_ms: {range_error} "
                         f"(profile more configs or more --latency_samples)")
    log(f"wrote {out / PROFILE_JSON}: budget_range_ms [{lo:.1f}, {hi:.1f}] ({rule}), "
        f"{len(front)} frontier configs, total {timing['total_s']:.0f}s")
    return profile


def request_shape(results) -> dict:
    """Decode ms per token and the request's size (vision tokens, MolmoE's crops) over a config's episodes."""
    steps = sum(r.extras["decode_steps"] for r in results)
    shape = {
        "decode_ms_per_token": sum(r.timings_ms["decode"] for r in results) / steps if steps else None,
        "vision_tokens_mean": sum(r.extras["vision_tokens"] for r in results) / len(results),
    }
    if "crops" in results[0].extras:
        shape["crops_mean"] = sum(r.extras["crops"] for r in results) / len(results)
    return shape


def cli(argv=None) -> int:
    """main() with a user's mistake as one line on stderr and status 2 (agents.cli)."""
    from agents.cli import exit_status

    return exit_status(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
