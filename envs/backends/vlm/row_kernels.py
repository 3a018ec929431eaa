"""Batch-1 MoE experts on CUDA as two Triton matrix-vector kernels (the decode step's expert work).

Why: at batch 1 a decode token sends one row to k experts, so the work is reading k experts'
weights (2 x I x d + d x I each). `torch._grouped_mm` tiles that as k tiny GEMMs whose tiles fit in
one wave of the GPU's SMs, so its time moves in steps of two experts (k 5 and 6 cost the same on
an H200, docs/BENCHMARKS.md 5d). Here every (row, block of output features) is one program that
streams its expert's weights, so the bytes read, and with them the time, follow the rows:
  gate_up   program (row j, block): h[j] = act(W_gate[e_j] x_j) * (W_up[e_j] x_j), fp32 accumulation;
  down      program (row j, block): y[j] = W_down[e_j] h[j].
Same contract as the `gathered` kernel (each routed row multiplies its own expert's weights, any
order, no counts); rows may be a stride-0 expansion of one row (nothing is copied). Inference only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # CUDA builds of torch ship Triton; CPU builds (CI) do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

# Output features per program and the reduction chunk per load, tuned on the H200 for the
# MolmoE-1B shape (d 2048, I 1024, bf16; docs/BENCHMARKS.md 5f); chunks are capped at the reduced
# dimension, so small models do not load masked lanes.
GATE_UP_ROWS, GATE_UP_CHUNK, GATE_UP_WARPS = 4, 2048, 4
DOWN_ROWS, DOWN_CHUNK, DOWN_WARPS = 2, 1024, 4


def available(x: torch.Tensor, experts: nn.Module) -> bool:
    """Whether the row kernels serve this call: Triton present, CUDA inference, SiLU experts
    (transformers' `SiLUActivation` or torch's, the OLMoE/MolmoE activation)."""
    act = getattr(experts, "act_fn", None)
    silu = act is F.silu or isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return triton is not None and x.is_cuda and not torch.is_grad_enabled() and silu


if triton is not None:
    @triton.jit
    def _gate_up_kernel(x_ptr, stride_x, w_ptr, ids_ptr, h_ptr, D, I, stride_e, stride_r,
                        ROWS: tl.constexpr, CHUNK: tl.constexpr):
        row = tl.program_id(0)
        outs = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        out_ok = outs < I
        base = w_ptr + tl.load(ids_ptr + row).to(tl.int64) * stride_e
        gate = tl.zeros((ROWS,), dtype=tl.float32)
        up = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(0, D, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            col_ok = cols < D
            x = tl.load(x_ptr + row * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
            ok = out_ok[:, None] & col_ok[None, :]
            wg = tl.load(base + outs[:, None] * stride_r + cols[None, :], mask=ok, other=0.0)
            wu = tl.load(base + (outs[:, None] + I) * stride_r + cols[None, :], mask=ok, other=0.0)
            gate += tl.sum(wg.to(tl.float32) * x[None, :], axis=1)
            up += tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
        h = gate * tl.sigmoid(gate) * up
        tl.store(h_ptr + row * I + outs, h.to(h_ptr.dtype.element_ty), mask=out_ok)

    @triton.jit
    def _down_kernel(h_ptr, w_ptr, ids_ptr, y_ptr, D, I, stride_e, stride_r,
                     ROWS: tl.constexpr, CHUNK: tl.constexpr):
        row = tl.program_id(0)
        outs = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        out_ok = outs < D
        base = w_ptr + tl.load(ids_ptr + row).to(tl.int64) * stride_e
        acc = tl.zeros((ROWS,), dtype=tl.float32)
        for start in range(0, I, CHUNK):
            cols = start + tl.arange(0, CHUNK)
            col_ok = cols < I
            h = tl.load(h_ptr + row * I + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(base + outs[:, None] * stride_r + cols[None, :],
                        mask=out_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
        tl.store(y_ptr + row * D + outs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


def row_experts(experts: nn.Module, rows: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
    """expert_{expert_of_row[j]}(rows[j]) for every row j: (n, d) -> (n, d); rows need unit stride
    along d only (a stride-0 `expand` of one row is read in place). Needs `available(rows, experts)`."""
    gate_up, down = experts.gate_up_proj, experts.down_proj  # (E, 2I, d), (E, d, I)
    _, two_i, d = gate_up.shape
    inner = two_i // 2
    if gate_up.stride(-1) != 1 or down.stride(-1) != 1 or rows.stride(-1) != 1:
        raise ValueError("row_experts needs rows and expert weights contiguous in their last dimension "
                         f"(strides {rows.stride()}, {gate_up.stride()}, {down.stride()})")
    n = rows.shape[0]
    ids = expert_of_row.contiguous()
    h = torch.empty(n, inner, device=rows.device, dtype=rows.dtype)
    y = torch.empty(n, d, device=rows.device, dtype=rows.dtype)
    _gate_up_kernel[(n, triton.cdiv(inner, GATE_UP_ROWS))](
        rows, rows.stride(0), gate_up, ids, h, d, inner, gate_up.stride(0), gate_up.stride(1),
        ROWS=GATE_UP_ROWS, CHUNK=min(GATE_UP_CHUNK, triton.next_power_of_2(d)), num_warps=GATE_UP_WARPS)
    _down_kernel[(n, triton.cdiv(d, DOWN_ROWS))](
        h, down, ids, y, d, inner, down.stride(0), down.stride(1),
        ROWS=DOWN_ROWS, CHUNK=min(DOWN_CHUNK, triton.next_power_of_2(inner)), num_warps=DOWN_WARPS)
    return y
