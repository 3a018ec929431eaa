"""Benchmarks: a backend's episodes (meter overhead, latency follows the knobs; the embedded VLM or a
MolmoE checkpoint) and, on CUDA, a MolmoE-1B-shaped model through the executor against stock
transformers generate.

    python runners/bench.py --output bench.json --markdown bench.md                 # CPU
    python runners/bench.py --device cuda --output bench_cuda.json --markdown bench_cuda.md
    python runners/bench.py --backend molmoe --model_path DIR --results_dir OUT --device cuda \
        --dtype bfloat16 --image_size 640 480 --output bench_molmoe.json --markdown bench_molmoe.md

On CUDA one command measures everything issue 12 asks for (sections 1, 2 and 4) and the
`checks` field compares the numbers with its targets.

Model: --backend vlm (default): --model_path (default: the shipped checkpoint
envs/assets/budgetvlm-molmoe-tiny when it exists); without it, a model of the shipped config
(preset molmoe-tiny, SynthVQA vocabulary) with random weights, built into a temporary dir.
--backend molmoe: --model_path is a MolmoE checkpoint directory (required; --image_size W H as the
backend's image_size), its importance.json in --results_dir (default: --model_path; written by
runners/profile_configs.py --backend molmoe). The output says which ("model" field). Sections 1
and 2 run on the backend's own episodes; section 3 is off by default with --backend molmoe (it
measures a MolmoE-shaped stand-in, not the port).

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
3. Controller (--controller_rounds, default 100; 0: off): both stages' measured compute per request
   as the env charges it (stage networks timed at batch size 1 between the model's phases, as a
   request runs them), the default config's controller under each policy.controller_runtime (eager,
   compiled and, on CPU, native; the same random weights), episodes in random order within each
   round of one per runtime; median and p95 of each, and their ratios to eager.
4. MolmoE-1B shape (--molmoe_shape, default on CUDA): see envs/profiling/molmoe_shape.py. Decode
   ms/token per (top-k, blocks), prefill per tier, vision per crop count, whole requests, and stock
   transformers OlmoeForCausalLM.generate per experts implementation and cache, same run.
No numbers are asserted here; tests check the output's schema only.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from agents.config import DEFAULT_CONFIG, apply_overrides, load_config
from agents.evaluation import run_episodes
from agents.factory import make_actor, make_env
from envs.backends import backend_class, make_backend
from envs.backends.vlm import DEFAULT_MODEL_PATH, VLMConfig, WordTokenizer, build_model
from envs.backends.vlm.config import PRESETS
from envs.machine import load_average, machine_info, resolve_device
from envs.profiling.molmoe_shape import ANSWER_TOKENS, SHAPES, MolmoeShapeBench
from envs.profiling import (
    MODEL_FILES,
    PROFILE_BACKENDS,
    StaticConfig,
    check_model_dir,
    check_positive_int,
    check_split,
    hook_cost_us,
    knob_latency,
    load_samples,
    meter_overhead,
    paired_knob_steps,
    weights_sha256,
    write_json,
)
from policies.controller import CONTROLLER_RUNTIMES


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="vlm", help=f"one of {PROFILE_BACKENDS}: the embedded model or MolmoE")
    ap.add_argument("--model_path", default=None,
                    help="model dir (vlm default: the shipped one if present, else random; molmoe: required)")
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA: decode steps run as CUDA graphs)")
    ap.add_argument("--dtype", default="float32", help="weights' dtype (float32, bfloat16; molmoe also float16)")
    ap.add_argument("--image_size", type=int, nargs=2, metavar=("W", "H"), default=None,
                    help="molmoe: resize every image to W x H first (the backend's image_size)")
    ap.add_argument("--molmoe_shape", default=None, choices=("none", *SHAPES),
                    help="MolmoE-shaped benchmark (default: molmoe-1b on CUDA, none on CPU)")
    # 64: over 16 steps the per-token IQR (0.015-0.025 ms on the H200) exceeded one expert's cost
    ap.add_argument("--decode_tokens", type=int, default=64,
                    help="decode steps timed per MolmoE-shape measurement (docs/BENCHMARKS.md 5f)")
    ap.add_argument("--molmoe_reps", type=int, default=20, help="repeats of every MolmoE-shape measurement")
    ap.add_argument("--stock_implementations", nargs="*", default=["eager", "batched_mm", "grouped_mm"],
                    help="transformers experts implementations to time (none: skip stock generate)")
    ap.add_argument("--stock_caches", nargs="*", default=["dynamic", "static"], choices=("dynamic", "static"))
    ap.add_argument("--stock_reps", type=int, default=3)
    ap.add_argument("--controller_rounds", type=int, default=100,
                    help="controller rounds, one episode per runtime each (section 3; 0: skip it)")
    ap.add_argument("--output", required=True, help="JSON results (rewritten after every section)")
    ap.add_argument("--markdown", default=None, help="also write the results as a markdown section here")
    return ap.parse_args(argv)


def validate(args) -> None:
    for name in ("pairs", "knob_samples", "repeats", "max_new_tokens", "threads", "decode_tokens", "molmoe_reps",
                 "stock_reps"):
        check_positive_int(f"--{name}", getattr(args, name))
    if args.controller_rounds < 0:
        raise ValueError(f"--controller_rounds={args.controller_rounds}: expected >= 0 (0 skips section 3)")
    if args.backend not in PROFILE_BACKENDS:
        raise ValueError(f"--backend={args.backend!r} is not known; expected one of {PROFILE_BACKENDS}")
    dtypes = backend_class(args.backend).DTYPES
    if args.dtype not in dtypes:
        raise ValueError(f"--dtype={args.dtype!r} is not supported by --backend {args.backend}; "
                         f"expected one of {tuple(dtypes)}")
    args.device = resolve_device(args.device, "--device")
    if args.molmoe_shape is None:
        args.molmoe_shape = "molmoe-1b" if args.device.type == "cuda" and args.backend == "vlm" else "none"
    if args.warmup < 0:
        raise ValueError(f"--warmup={args.warmup} is invalid; expected an int >= 0")
    check_split(args.split, "--split")
    if args.backend == "molmoe":
        if args.model_path is None:
            raise ValueError("--backend molmoe needs --model_path (a MolmoE checkpoint directory)")
        if args.random_model:
            raise ValueError("--random_model builds an embedded model; it is not an option of --backend molmoe")
    elif args.image_size is not None:
        raise ValueError(f"--image_size is an option of --backend molmoe, not of --backend {args.backend}")
    if args.model_path is not None:
        if args.random_model:
            raise ValueError("--model_path and --random_model are exclusive")
        args.model_path = check_model_dir(args.model_path, "--model_path", args.backend)


@contextmanager
def bench_model(args):
    """(model_path, results_dir, description); a random model lives in a temporary dir."""
    shipped_ok = DEFAULT_MODEL_PATH.is_dir() and all((DEFAULT_MODEL_PATH / f).is_file() for f in MODEL_FILES)
    if args.model_path is None and not args.random_model and shipped_ok:
        args.model_path = DEFAULT_MODEL_PATH
    if args.model_path is not None:
        results = Path(args.results_dir) if args.results_dir else args.model_path
        kind = ("shipped checkpoint" if Path(args.model_path).resolve() == DEFAULT_MODEL_PATH.resolve()
                else "given MolmoE checkpoint" if args.backend == "molmoe" else "given checkpoint")
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
    result = {
        "machine": machine_info(),
        "device": str(args.device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python runners/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "load_average_start": load_average(),
        "threads": torch.get_num_threads(),
    }
    out = Path(args.output)

    def save(**sections):  # after every section, so a run cut short keeps what it measured
        result.update(sections, load_average_end=load_average(), wall_s=time.perf_counter() - t_start)
        write_json(out, result)

    with bench_model(args) as (model_path, results_dir, model_desc):
        n = max(args.knob_samples, 8)
        options = {} if args.image_size is None else {"image_size": tuple(args.image_size)}
        backend = make_backend(args.backend, model_path=model_path, results_dir=results_dir,
                               budget_range_ms=(1.0, 2.0), num_samples={args.split: n}, seed=args.seed,
                               max_new_tokens=args.max_new_tokens, device=str(args.device), dtype=args.dtype,
                               **options)
        samples, _ = load_samples(backend, args.split, n)
        configs = knob_configs(backend.knob_space)
        full, cheapest = list(configs.values())[0], list(configs.values())[-1]
        print(f"[bench] model: {model_desc} on {args.device}; threads {torch.get_num_threads()}; "
              f"load {result['load_average_start']}", file=sys.stderr)
        result.update(model=model_desc, weights_sha256=weights_sha256(model_path), backend=backend.describe())
        overhead = {
            name: meter_overhead(backend, samples, c, args.pairs, warmup=args.warmup, seed=args.seed)
            for name, c in (("full", full), ("cheapest", cheapest))
        }
        for name, r in overhead.items():
            print(f"[bench] overhead {name}: on {r['median_on_ms']:.2f} ms, off {r['median_off_ms']:.2f} ms, "
                  f"{r['overhead_pct']:+.2f}% (paired {r['paired_diff_pct']:+.2f}%)", file=sys.stderr)
        save(meter_overhead=overhead, hook_cost=hook_cost_us())
        knobs = knob_latency(backend, samples[: args.knob_samples], configs, repeats=args.repeats,
                             warmup=args.warmup, seed=args.seed)
        print(f"[bench] knobs: slowest/fastest = {knobs['slowest_over_fastest']:.2f}x", file=sys.stderr)
        save(knob_latency=knobs)
        if args.controller_rounds:
            controller = controller_cost(backend, args.split, args.controller_rounds, str(args.device), args.seed)
            print("[bench] controller per request (median): " + ", ".join(
                f"{r} {controller[r]['median_ms']:.3f} ms" for r in CONTROLLER_RUNTIMES if r in controller),
                file=sys.stderr)
            save(controller=controller)
        del backend
    if args.molmoe_shape != "none":
        molmoe = {}
        for _ in molmoe_shape_section(args, molmoe):
            save(molmoe_shape=molmoe)
    save(checks=target_checks(result))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(to_markdown(result))
    return result


def controller_cost(backend, split: str, rounds: int, device: str, seed: int) -> dict:
    """Section 3 (module doc): both stages' time per request under each controller runtime, in the env."""
    cfg = apply_overrides(load_config(DEFAULT_CONFIG), {"train.device": device, "train.seed": seed})
    runtimes = [r for r in CONTROLLER_RUNTIMES if r != "native" or torch.device(device).type == "cpu"]
    actors = {r: make_actor(apply_overrides(cfg, {"policy.controller_runtime": r}), backend)[0] for r in runtimes}
    for actor in actors.values():
        actor.load_state_dict(actors["eager"].state_dict())
    env = make_env(cfg, backend, split, 1, 1)
    lo, hi = backend.budget_range_ms
    rng = random.Random(seed)
    times = {name: [] for name in actors}
    for i in range(-2, rounds):  # two warm-up rounds (the compiled stages compile in the first)
        for name in rng.sample(list(actors), len(actors)):
            ep = run_episodes(env, actors[name].eval(), torch.tensor([max(i, 0) % len(env.samples)]),
                              torch.tensor([(lo + hi) / 2]))["episode"]
            if i >= 0:
                times[name].append(float(ep["stage1_controller_ms"][0] + ep["stage2_controller_ms"][0]))
    out = {name: {"n": len(t), "median_ms": statistics.median(t),
                  "p95_ms": float(torch.quantile(torch.tensor(t), 0.95))} for name, t in times.items()}
    for name in runtimes[1:]:
        out[f"{name}_over_eager"] = out[name]["median_ms"] / out["eager"]["median_ms"]
    return out


def molmoe_shape_section(args, section: dict):
    """Fills `section` piece by piece, yielding after each (the caller saves)."""
    log = lambda msg: print(f"[bench] molmoe-shape {msg}", file=sys.stderr, flush=True)  # noqa: E731
    bench = MolmoeShapeBench(args.molmoe_shape, args.device, seed=args.seed, log=log)
    section.update(shape=args.molmoe_shape, **bench.describe())
    section["decode"] = bench.decode(args.decode_tokens, args.molmoe_reps)
    log(f"decode: { {k: round(v['median_ms'], 3) for k, v in section['decode'].items() if isinstance(v, dict)} }")
    yield
    section.update(bench.prefill_and_vision(args.molmoe_reps))
    yield
    section["request"] = bench.requests(args.molmoe_reps)
    log(f"requests: { {k: round(v['median_ms'], 2) for k, v in section['request'].items()} }")
    yield
    if args.stock_implementations:
        section["stock"] = {}
        # every implementation's dynamic cache first: the static cache compiles (minutes)
        for cache in args.stock_caches:
            for impl in args.stock_implementations:
                section["stock"].update(bench.stock([impl], [cache], args.decode_tokens, args.stock_reps))
                yield


def step_chains(names: list[str]) -> list[tuple[str, str]]:
    """Consecutive steps down per knob, from the first (full) configuration: tier in the listed order
    (high -> medium -> low), top-k and blocks by value, largest first."""
    steps = []
    for knob in ("tier ", "top-k ", "blocks "):
        chain = [n for n in names if n.startswith(knob)]
        if knob != "tier ":
            chain.sort(key=lambda n: -int(n.split()[1]))
        chain = [names[0], *chain]
        steps += list(zip(chain, chain[1:]))
    return steps


def knob_steps(rows: dict, steps: list[tuple[str, str]]) -> list[dict]:
    """Each (slower, faster) pair: does the step down lower the median by more than 3x the larger IQR?"""
    out = []
    for slow, fast in steps:
        a, b = rows[slow], rows[fast]
        drop, noise = a["median_ms"] - b["median_ms"], max(a["iqr_ms"], b["iqr_ms"])
        out.append({"from": slow, "to": fast, "drop_ms": drop, "iqr_ms": noise, "met": drop > 3 * noise})
    return out


def target_checks(r: dict) -> dict:
    """Issue 12's targets against this run's numbers (value, target, met)."""
    checks = {}
    overhead = max(o["overhead_pct"] for o in r["meter_overhead"].values())
    checks["meter_overhead_pct"] = {"value": overhead, "target": "<= 2", "met": overhead <= 2.0}
    knobs = r["knob_latency"]["configs"]
    names = list(knobs)
    full = knobs[names[0]]
    embedded = r["backend"]["backend"] == "VLMBackend"  # issue 12's targets are the embedded model's
    if r["device"].startswith("cuda") and embedded:
        checks["embedded_episode_full_ms"] = {"value": full["median_ms"], "target": "<= 10",
                                              "met": full["median_ms"] <= 10.0}
    checks["embedded_knob_steps" if embedded else "episode_knob_steps"] = knob_steps(knobs, step_chains(names))
    if r["knob_latency"].get("repeats", 1) >= 2:  # the same requests again: each step against one request's noise
        checks[("embedded" if embedded else "episode") + "_knob_steps_per_request"] = paired_knob_steps(
            knobs, step_chains(names))
    m = r.get("molmoe_shape")
    if m:
        cfg = m["decoder"]
        k, n = cfg["num_experts_per_tok"], cfg["num_hidden_layers"]
        decode = m["decode"][f"default/k{k}/N{n}"]["median_ms"]
        checks["decode_full_ms_per_token"] = {"value": decode, "target": "<= 3.0", "met": decode <= 3.0}
        stock = {name: s["median_ms"] for name, s in m.get("stock", {}).items() if "median_ms" in s}
        if stock:
            fastest = min(stock, key=stock.get)
            speedup = stock[fastest] / decode
            checks["decode_speedup_over_fastest_stock"] = {"value": speedup, "fastest_stock": fastest,
                                                           "target": ">= 5", "met": speedup >= 5.0}
        req = m["request"]
        checks["request_full_ms"] = {"value": req["full"]["median_ms"], "target": "<= 45",
                                     "met": req["full"]["median_ms"] <= 45.0}
        checks["request_cheapest_ms"] = {"value": req["cheapest"]["median_ms"], "target": "<= 15",
                                         "met": req["cheapest"]["median_ms"] <= 15.0}
        checks["request_knob_steps"] = knob_steps(req, step_chains(list(req)))
        rows = {name: v for name, v in m["decode"].items() if name.startswith("default/")}
        ks, ns = m["top_k_values"], m["num_blocks_values"]
        name = lambda kk, nn: f"default/k{kk}/N{nn}"  # noqa: E731
        steps = [(name(hi, nn), name(lo, nn)) for lo, hi in zip(ks, ks[1:]) for nn in ns]
        steps += [(name(kk, hi), name(kk, lo)) for lo, hi in zip(ns, ns[1:]) for kk in ks]
        checks["decode_knob_steps"] = knob_steps(rows, steps)
    return checks


def to_markdown(r: dict) -> str:
    m = r["machine"]
    gpu = f", GPU {m['cuda_device']}" if "cuda_device" in m else ""
    b = r["backend"]
    lines = [
        f"Model: {r['model']} on {r['device']} ({b['dtype']}, expert kernel {b['expert_kernel']}, batch-1 row "
        f"kernel {b['single_row_expert_kernel']}, decode {b['executor']['decode']}). Machine: {m['cpu_model']}, {m['cpu_cores']} cores{gpu}, torch {m['torch_version']}, "
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
    if "controller" in r:
        c = r["controller"]
        runtimes = [r for r in CONTROLLER_RUNTIMES if r in c]
        lines += ["Controller, both stages per request as the env charges them (each policy.controller_runtime, "
                  "same weights, episodes in random order per round):", "",
                  "| runtime | n | median (ms) | p95 (ms) | median / eager |", "|---|---|---|---|---|"]
        lines += [f"| {r} | {c[r]['n']} | {c[r]['median_ms']:.3f} | {c[r]['p95_ms']:.3f} | "
                  f"{c[r]['median_ms'] / c['eager']['median_ms']:.2f} |" for r in runtimes]
        lines += [""]
    if "molmoe_shape" in r:
        lines += molmoe_markdown(r["molmoe_shape"])
    lines += ["Target checks (issue 12):", "", "| check | value | target | met |", "|---|---|---|---|"]
    details = []
    for name, c in r["checks"].items():
        if isinstance(c, list):
            met = sum(x["met"] for x in c)
            lines.append(f"| {name} | {met}/{len(c)} steps drop > 3x IQR | all | {met == len(c)} |")
            details.append(f"{name}: " + "; ".join(f"{x['from']} -> {x['to']} {x['drop_ms']:+.3f} ms (IQR "
                                                    f"{x['iqr_ms']:.3f})" for x in c))
        else:
            lines.append(f"| {name} | {c['value']:.3f} | {c['target']} | {c['met']} |")
    lines += ["", *(f"- {d}" for d in details)]
    return "\n".join(lines) + "\n"


def molmoe_markdown(m: dict) -> list[str]:
    def table(title, rows):
        out = [title, "", "| measurement | n | median (ms) | IQR (ms) | min (ms) |", "|---|---|---|---|---|"]
        out += [f"| {name} | {v['n']} | {v['median_ms']:.3f} | {v['iqr_ms']:.3f} | {v['min_ms']:.3f} |"
                for name, v in rows.items() if isinstance(v, dict) and "median_ms" in v]
        return out + [""]

    d = m["decoder"]
    lines = [f"MolmoE-1B shape ({m['shape']}, random weights, {m['dtype']}): decoder {d['num_hidden_layers']} blocks, "
             f"d {d['hidden_size']}, {d['num_experts']} experts of width {d['intermediate_size']}, top-"
             f"{d['num_experts_per_tok']}; vision tower {m['vision_tower']['num_hidden_layers']} layers, "
             f"{m['vision_tower']['image_size']} px crops; decode mode {m['decode_mode']}.", ""]
    lines += table(f"Decode, ms per token ({m['decode']['tokens']} steps after a {m['decode']['prefill_tokens']}-token "
                   "prefill; default = the executor's mode, eager = the same code without graphs):", m["decode"])
    lines += table(f"Prefill (tokens per tier {m['prefill']['tokens']}), eager and as one graph per shape:", m["prefill"])
    lines += table("Vision tower + connector per crop count:", m["vision"])
    lines += table(f"Whole request (vision -> prefill -> {ANSWER_TOKENS}-token answer):", m["request"])
    stock = m.get("stock", {})
    if stock:
        lines += table("Stock transformers OlmoeForCausalLM.generate, ms per token (experts implementation / cache):",
                       stock)
        lines += [f"- {name}: {v['error']}" for name, v in stock.items() if "error" in v] + [""]
    return lines


def cli(argv=None) -> int:
    """main() with a user's mistake as one line on stderr and status 2 (agents.cli)."""
    from agents.cli import exit_status

    return exit_status(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
