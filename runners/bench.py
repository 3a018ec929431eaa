"""Benchmarks of the embedded VLM backend: latency-meter overhead and "latency follows the knobs".

    python runners/bench.py --output bench.json --markdown bench.md

Model: --model_path (default: the shipped checkpoint envs/assets/budgetvlm-molmoe-tiny when it
exists); without it, a model of the shipped config (preset molmoe-tiny, SynthVQA vocabulary) with
random weights, built into a temporary dir. The output says which ("model" field).

1. Meter overhead: the same batch-1 episodes with the backend's forward hooks attached and
   detached, interleaved pair by pair in random order; wall clock of start_episode..finish in both
   modes (perf_counter around the calls, not the meter); median of each, their ratio and the
   median paired difference. Run for the full and the cheapest configuration. Also a
   microbenchmark of one hooked call on a no-op module (what one hook costs).
2. Latency follows the knobs: metered episode latency (preprocess + vision + prefill + decode, as
   the env counts it) of the full configuration and each knob's step down alone (tier
   high -> medium -> low, top-k max -> min, blocks max -> min) plus the cheapest configuration,
   all interleaved in one run; median, IQR and std per configuration and the slowest/fastest
   median ratio.
No numbers are asserted here; tests check the output's schema only.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from envs.backends.vlm import DEFAULT_MODEL_PATH, VLMBackend, VLMConfig, WordTokenizer, build_model
from envs.backends.vlm.config import PRESETS
from envs.machine import load_average, machine_info
from envs.profiling import (
    MODEL_FILES,
    StaticConfig,
    check_model_dir,
    check_positive_int,
    check_split,
    hook_cost_us,
    knob_latency,
    load_samples,
    meter_overhead,
    weights_sha256,
    write_json,
)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=None, help="model dir (default: the shipped one if present, else random)")
    ap.add_argument("--results_dir", default=None, help="dir with importance.json (default: --model_path)")
    ap.add_argument("--random_model", action="store_true", help="force a random-weight model of the shipped config")
    ap.add_argument("--preset", default="molmoe-tiny", choices=sorted(PRESETS), help="config of the random model")
    ap.add_argument("--pairs", type=int, default=200, help="hooks-on/off pairs per overhead config")
    ap.add_argument("--knob_samples", type=int, default=20, help="samples per knob config and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the knob samples")
    ap.add_argument("--split", default="test")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: batch-1 episodes are overhead-bound)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True, help="JSON results")
    ap.add_argument("--markdown", default=None, help="also write the results as a markdown section here")
    return ap.parse_args(argv)


def validate(args) -> None:
    for name in ("pairs", "knob_samples", "repeats", "max_new_tokens", "threads"):
        check_positive_int(f"--{name}", getattr(args, name))
    if args.warmup < 0:
        raise ValueError(f"--warmup={args.warmup} is invalid; expected an int >= 0")
    check_split(args.split, "--split")
    if args.model_path is not None:
        if args.random_model:
            raise ValueError("--model_path and --random_model are exclusive")
        args.model_path = check_model_dir(args.model_path, "--model_path")


@contextmanager
def bench_model(args):
    """(model_path, results_dir, description); a random model lives in a temporary dir."""
    shipped_ok = DEFAULT_MODEL_PATH.is_dir() and all((DEFAULT_MODEL_PATH / f).is_file() for f in MODEL_FILES)
    if args.model_path is None and not args.random_model and shipped_ok:
        args.model_path = DEFAULT_MODEL_PATH
    if args.model_path is not None:
        results = Path(args.results_dir) if args.results_dir else args.model_path
        kind = "shipped checkpoint" if Path(args.model_path).resolve() == DEFAULT_MODEL_PATH.resolve() else "given checkpoint"
        yield args.model_path, results, f"{kind} {args.model_path}"
        return
    from envs.data import synthvqa

    with tempfile.TemporaryDirectory(prefix="budgetvlm-bench-") as tmp:
        tok = WordTokenizer.build(synthvqa.vocabulary())
        cfg = VLMConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id, **PRESETS[args.preset])
        build_model(cfg, seed=args.seed).save(tmp, tok)
        # Random weights have no meaningful importance: zeros, so select_blocks keeps the earliest blocks.
        Path(tmp, "importance.json").write_text(
            json.dumps({"method": "uniform", "scores": {str(i): 0.0 for i in range(cfg.num_layers)}})
        )
        why = "forced" if args.random_model else f"no shipped checkpoint at {DEFAULT_MODEL_PATH}"
        yield Path(tmp), Path(tmp), f"random weights, preset {args.preset} ({why})"


def knob_configs(ks) -> dict[str, StaticConfig]:
    top, kmax, kmin = ks.tiers[-1], ks.top_k_values[-1], ks.top_k_values[0]
    nmax, nmin = ks.num_blocks_values[-1], ks.num_blocks_values[0]
    configs = {f"full ({top}, k={kmax}, N={nmax})": StaticConfig(top, kmax, nmax)}
    for tier in reversed(ks.tiers[:-1]):
        configs[f"tier {tier}"] = StaticConfig(tier, kmax, nmax)
    configs[f"top-k {kmin}"] = StaticConfig(top, kmin, nmax)
    configs[f"blocks {nmin}"] = StaticConfig(top, kmax, nmin)
    configs[f"cheapest ({ks.tiers[0]}, k={kmin}, N={nmin})"] = StaticConfig(ks.tiers[0], kmin, nmin)
    return configs


def main(argv=None) -> dict:
    args = parse_args(argv)
    validate(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    load_start = load_average()
    with bench_model(args) as (model_path, results_dir, model_desc):
        sha = weights_sha256(model_path)
        n = max(args.knob_samples, 8)
        backend = VLMBackend(model_path=model_path, results_dir=results_dir, budget_range_ms=(1.0, 2.0),
                             num_samples={args.split: n}, seed=args.seed, max_new_tokens=args.max_new_tokens)
        samples, _ = load_samples(backend, args.split, n)
        ks = backend.knob_space
        configs = knob_configs(ks)
        full, cheapest = list(configs.values())[0], list(configs.values())[-1]
        print(f"[bench] model: {model_desc}; threads {torch.get_num_threads()}; load {load_start}", file=sys.stderr)
        overhead = {
            name: meter_overhead(backend, samples, c, args.pairs, warmup=args.warmup, seed=args.seed)
            for name, c in (("full", full), ("cheapest", cheapest))
        }
        for name, r in overhead.items():
            print(f"[bench] overhead {name}: on {r['median_on_ms']:.2f} ms, off {r['median_off_ms']:.2f} ms, "
                  f"{r['overhead_pct']:+.2f}% (paired {r['paired_diff_pct']:+.2f}%)", file=sys.stderr)
        hook = hook_cost_us()
        knobs = knob_latency(backend, samples[: args.knob_samples], configs, repeats=args.repeats,
                             warmup=args.warmup, seed=args.seed)
        print(f"[bench] knobs: slowest/fastest = {knobs['slowest_over_fastest']:.2f}x", file=sys.stderr)
    result = {
        "model": model_desc,
        "weights_sha256": sha,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python runners/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "threads": torch.get_num_threads(),
        "meter_overhead": overhead,
        "hook_cost": hook,
        "knob_latency": knobs,
        "wall_s": time.perf_counter() - t_start,
    }
    write_json(Path(args.output), result)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(to_markdown(result))
    return result


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"Model: {r['model']}. Machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch {m['torch_version']}, "
        f"{r['threads']} torch thread(s). Date: {r['date']}. Load average (1/5/15 min) at start "
        f"{r['load_average_start']}, at end {r['load_average_end']}. Wall time {r['wall_s']:.0f} s.",
        "",
        f"Command: `{r['command']}`",
        "",
        "Meter overhead (wall clock of batch-1 episodes, hooks attached vs detached, interleaved pairs):",
        "",
        "| config | pairs | median on (ms) | median off (ms) | on/off | overhead | median paired diff | IQR on / off (ms) | hooked calls / episode |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, o in r["meter_overhead"].items():
        c = o["config"]
        lines.append(
            f"| {name} ({c['tier']}, k={c['top_k']}, N={c['num_blocks']}) | {o['pairs']} | {o['median_on_ms']:.2f} | "
            f"{o['median_off_ms']:.2f} | {o['ratio_on_off']:.4f} | {o['overhead_pct']:+.2f}% | "
            f"{o['median_paired_diff_ms']:+.3f} ms ({o['paired_diff_pct']:+.2f}%) | "
            f"{o['iqr_on_ms']:.2f} / {o['iqr_off_ms']:.2f} | {o['hooked_calls_per_episode']:.0f} |"
        )
    h = r["hook_cost"]
    lines += [
        "",
        f"One hooked call on a no-op module: {h['hooked_call_us']:.2f} us vs {h['plain_call_us']:.2f} us plain "
        f"(+{h['hook_overhead_us']:.2f} us per call for the pre + post stamps).",
        "",
        "Latency follows the knobs (metered total latency = preprocess + vision + prefill + decode):",
        "",
        "| config | n | median (ms) | IQR (ms) | std (ms) | vision | prefill | decode |",
        "|---|---|---|---|---|---|---|---|",
    ]
    k = r["knob_latency"]
    for name, c in k["configs"].items():
        lines.append(
            f"| {name} | {c['n']} | {c['median_ms']:.2f} | {c['iqr_ms']:.2f} | {c['std_ms']:.2f} | "
            f"{c['vision_median_ms']:.2f} | {c['prefill_median_ms']:.2f} | {c['decode_median_ms']:.2f} |"
        )
    lines += ["", f"Slowest / fastest median: {k['slowest']} / {k['fastest']} = {k['slowest_over_fastest']:.2f}x", ""]
    return "\n".join(lines)


def cli(argv=None) -> int:
    try:
        main(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
