"""The controller's stage networks at batch size 1 as one C call each (policy.controller_runtime: native).

A request's two stage networks are ~155k multiply-adds at the default width, but through torch they
cost what ~25 small ops (eager) or one compiled graph's guards and wrapper (torch.compile) cost right
after the model's phases have evicted the caches: 1.58 (compiled) to 1.99 ms (eager) a request in the env
on the 2-core VM, 2-3% of the lowest evaluated budget, against 0.16 ms here (docs/BENCHMARKS.md 2d). `NativeStage` runs the same arithmetic
(policies/native_stages.c) over the parameters' own float32 storage, so an optimiser step or a
load_state_dict (both in place) is read at the next call; `refresh` re-reads the storage addresses
(outside the request's time) in case a parameter was replaced. CPU only.

The library is compiled once per machine with the system C compiler (`CC`, else cc) into a cache
directory (BUDGETVLM_NATIVE_CACHE, else the temp dir), named by a hash of the source and the flags.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from policies.budget_encoder import SINUSOID_SCALE, sinusoid_frequencies
from policies.predictors import Knob1PredictorBudgetLanguage, Knob2Knob3Predictor

SOURCE = Path(__file__).with_name("native_stages.c")
# -march=native: the library is built on (and cached for) the machine that runs it.
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared")
_P = ctypes.POINTER(ctypes.c_void_p)
_I = ctypes.POINTER(ctypes.c_int)


@functools.lru_cache(maxsize=None)
def native_library() -> ctypes.CDLL:
    """The compiled native_stages.c (built on first use; a clear error when no C compiler is found)."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"policy.controller_runtime='native' compiles {SOURCE.name} with a C compiler, and "
                           f"{compiler!r} (the CC environment variable, else cc) is not on PATH: install one "
                           f"(e.g. gcc) or choose controller_runtime 'eager' or 'compiled'")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("BUDGETVLM_NATIVE_CACHE") or Path(tempfile.gettempdir()) / f"budgetvlm-native-{os.getuid()}")
    path = cache / f"native_stages_{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".{path.name}.{os.getpid()}"  # then renamed: another process never loads half a file
        done = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"policy.controller_runtime='native': compiling {SOURCE} with {compiler!r} failed "
                               f"(exit {done.returncode}):\n{done.stderr.strip()}")
        os.replace(partial, path)
    lib = ctypes.CDLL(str(path))
    v = ctypes.c_void_p
    f = ctypes.c_float
    lib.stage1.argtypes = [_P, _I, f, f, v, v, v, v, v]
    lib.stage2.argtypes = [_P, _I, f, f, v, v, v, v, v, v]
    lib.stage1.restype = lib.stage2.restype = None
    return lib


def _linear(m: torch.nn.Linear) -> list[torch.Tensor]:
    return [m.weight, m.bias]


class NativeStage:
    """One stage's networks (a policies.controller._StageNetwork: its predictor, budget encoder, heads and
    argument names) at batch size 1 in C: `run` gives the same {out_key: tensor} as the network's torch
    forward, up to float rounding, and each row's time."""

    def __init__(self, network: torch.nn.Module):
        self.lib = native_library()
        predictor, budget_encoder = network.predictor, network.budget_encoder
        self.heads, self.argument_names = network.heads, list(network.argument_names)
        if isinstance(predictor, Knob1PredictorBudgetLanguage):
            if budget_encoder is None:
                raise ValueError("native Stage 1 needs its budget encoder")
            enc, mlp = budget_encoder, budget_encoder.mlp
            self.stage = 1
            self.freqs = sinusoid_frequencies(enc.sinusoidal_dim)
            self.tensors = [self.freqs, *_linear(mlp[0]), mlp[1].weight, mlp[1].bias, *_linear(mlp[3]), mlp[4].weight,
                            mlp[4].bias, predictor.language_norm.weight, predictor.language_norm.bias,
                            *_linear(predictor.trunk[0]), *_linear(predictor.trunk[2]),
                            *_linear(predictor.tier_head), *_linear(predictor.insertion_head), enc.budget_range_ms]
            d, lang = mlp[3].out_features, predictor.language_norm.normalized_shape[0]
            hidden = predictor.trunk[2].out_features
            self.sizes = (predictor.tier_head.out_features, predictor.insertion_head.out_features)
            dims = (enc.sinusoidal_dim, d, lang, hidden, *self.sizes)
            self.token = d
            self.widths = {"budget_feature": 1, "language_feature": lang}
            work = enc.sinusoidal_dim + 2 * d + lang + 2 * hidden
        elif isinstance(predictor, Knob2Knob3Predictor):
            self.stage = 2
            hidden = predictor.trunk[2].out_features
            code = predictor.elapsed_code
            self.freqs = sinusoid_frequencies(code.dim_per_value) if code is not None else None
            null = torch.empty(0)  # a NULL pointer's place: the C code skips what the option does not read
            norm = [predictor.token_norm.weight, predictor.token_norm.bias] if predictor.reads_token else [null, null]
            self.tensors = [*norm, predictor.insertion_embedding.weight,
                            self.freqs if code is not None else null,
                            *_linear(predictor.trunk[0]), *_linear(predictor.trunk[2]),
                            *_linear(predictor.top_k_head), *_linear(predictor.num_blocks_head),
                            code.scale_ms if code is not None else null]
            d = predictor.token_norm.normalized_shape[0] if predictor.reads_token else 0
            half = code.dim_per_value // 2 if code is not None else 0
            self.sizes = (predictor.top_k_head.out_features, predictor.num_blocks_head.out_features)
            dims = (d, hidden, half, *self.sizes)
            self.token = 0
            self.widths = {"latency_token": d, "insertion_index": 1, "elapsed_ms": 1, "remaining_ms": 1}
            self.num_insertions = predictor.insertion_embedding.num_embeddings
            work = d + hidden + 4 * half + 2 * hidden
        else:
            raise TypeError(f"no native stage for {type(predictor).__name__}")
        self.dims = (ctypes.c_int * len(dims))(*dims)
        self.work = torch.empty(work)
        self.pointers = (ctypes.c_void_p * len(self.tensors))()
        self.addresses: list[int] = []
        self.refresh()

    def refresh(self) -> None:
        """Re-read the parameters' storage addresses (a parameter replaced rather than updated in place)."""
        addresses = [t.data_ptr() if t.numel() else 0 for t in self.tensors]
        if addresses == self.addresses:
            return
        for t in self.tensors:
            if t.numel() and (t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()):
                raise ValueError(f"policy.controller_runtime='native' runs float32 CPU parameters; got one of "
                                 f"{t.dtype} on {t.device} (contiguous: {t.is_contiguous()}): use 'eager' or 'compiled' "
                                 f"on another device")
        self.pointers[:] = addresses
        self.addresses = addresses

    def run(self, inputs: list[torch.Tensor], time_scale: float) -> tuple[dict, list[float]]:
        """Every row of the in_keys' batch tensors alone, one C call each: ({out_key: (n, ...) tensor},
        each row's call time in ms). The output rows and input addresses are laid out before the
        timed calls (a served request's buffers exist before it arrives); a call reads its row's
        times, scales them and runs the stage."""
        x = {name: (t.long() if name == "insertion_index" else t.float()).contiguous()
             for name, t in zip(self.argument_names, inputs)}
        self._check(x)
        n = next(iter(x.values())).shape[0]
        a, b = self.sizes
        logits = torch.empty(n, a + b)
        out = {}
        if self.stage == 1:
            token = torch.empty(n, self.token)
            out[("action", "budget_token")] = token
            rows = [x["budget_feature"], x["language_feature"], logits, token]
            call = functools.partial(self.lib.stage1, self.pointers, self.dims, time_scale, SINUSOID_SCALE)
        else:
            rows = [x.get("latency_token"), x["insertion_index"], x.get("elapsed_ms"), x.get("remaining_ms"), logits]
            call = functools.partial(self.lib.stage2, self.pointers, self.dims, time_scale, SINUSOID_SCALE)
        # (address of row 0, bytes per row) of each argument; None: the option does not read it
        steps = [(t.data_ptr(), t.stride(0) * t.element_size()) if t is not None else (None, 0) for t in rows]
        times, work = [], self.work.data_ptr()
        for i in range(n):
            start = time.perf_counter()
            call(*[base + i * step if base is not None else None for base, step in steps], work)
            times.append((time.perf_counter() - start) * 1e3)
        out[("logits", self.heads[0], "logits")] = logits[:, :a].unsqueeze(1)
        out[("logits", self.heads[1], "logits")] = logits[:, a:].unsqueeze(1)
        return out, times

    def _check(self, x: dict) -> None:
        """The C code reads fixed widths and indexes the insertion embedding unchecked: check them here."""
        for name, t in x.items():
            width = self.widths[name]
            if t.device.type != "cpu" or t.dim() != 2 or t.shape[1] != width:
                raise ValueError(f"native Stage {self.stage} input {name!r}: expected a CPU (rows, {width}) tensor, "
                                 f"got {tuple(t.shape)} on {t.device}")
        if "insertion_index" in x:
            bad = (x["insertion_index"] < 0) | (x["insertion_index"] >= self.num_insertions)
            if bool(bad.any()):
                raise ValueError(f"native Stage 2 input 'insertion_index'={int(x['insertion_index'][bad][0])}: expected "
                                 f"an index in [0, {self.num_insertions - 1}]")
