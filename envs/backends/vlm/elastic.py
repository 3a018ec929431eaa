"""Elastic execution of OLMoE decoder blocks: per-block top-k, any subset of blocks, own KV cache.

Why our own block forward instead of `OlmoeDecoderLayer.forward`:
  * top-k must vary per block and per call, while transformers' router reads a fixed
    `config.num_experts_per_tok`;
  * the work must be proportional to k. Stock transformers `grouped_mm` experts cost the same
    for every k on CPU; here the (token, expert) assignments are sorted by expert and each expert
    runs its gate_up/down matmuls on exactly the rows routed to it (`run_experts`, with the
    kernel `expert_kernel` picks per device and dtype and every profile records), so FLOPs scale
    with tokens*k and a decode token touches exactly k experts. GPU training alone uses
    `dense_experts` (same math, zero weights off the top-k, few launches);
  * routing reads nothing on the host at inference (expert counts by index_add_, not bincount), so
    a CUDA decode step can be captured as a graph;
  * the cache must hold only the blocks that actually ran (skipped blocks have no entry), which
    `DynamicCache` (indexed by layer position) does not express, and its call signature differs
    between transformers 5.17 (`past_key_values=`) and 5.24 (`cache=`). A dict of the blocks that
    ran serves the prefill and eager decoding; `StaticKVCache` (fixed shapes) the graphed decode.
The weights and submodules are those of transformers' `OlmoeDecoderLayer` (q/k/v/o projections,
q/k RMS norms, router `mlp.gate.weight`, packed experts `mlp.experts.gate_up_proj`/`down_proj`),
so a stock OLMoE checkpoint runs unchanged; only the orchestration is ours. For CUDA inference the
q/k/v weights and the q/k norm weights are moved into one storage (`shared_storage`: same Parameter
objects, state dict unchanged), so a block reads them in one product and one norm. The same code runs
the batched teacher-forced training forward (runners/pretrain_vlm.py) and the batch-1 episodes,
driven by envs.backends.vlm.executor.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from envs.backends.vlm import row_kernels

# layer index -> (keys, values), each (batch, heads, positions, head_dim)
KVCache = Dict[int, Tuple[torch.Tensor, torch.Tensor]]


class StaticKVCache:
    """Preallocated keys and values of every block, (layers, batch, heads, max_positions, head_dim),
    and the next decode position as a device tensor: the decode step has fixed shapes and no host
    reads, so it can be captured as a CUDA graph and replayed for every token.

    `load(prefill_cache, length)` copies an episode's prefill entries in and sets the position;
    each decode step calls `begin_step()`, then every block writes its key/value at `position` and
    attends to positions <= it (stale entries of earlier episodes beyond it are masked out); the
    caller advances `position`.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, max_positions: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch, heads, max_positions, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self._slots = torch.arange(max_positions, device=device)
        self._bias = torch.zeros((1, 1, max_positions), dtype=dtype, device=device)  # 0 or -inf per slot

    def load(self, prefill: KVCache, length: int) -> None:
        for index, (k, v) in prefill.items():
            self.keys[index, :, :, :length].copy_(k)
            self.values[index, :, :, :length].copy_(v)
        self.position.fill_(length)

    def begin_step(self) -> None:
        """Mask the slots beyond `position` for this step's blocks (once per step, not per block)."""
        self._bias.copy_(torch.where(self._slots <= self.position, 0.0, float("-inf")))

    def attend(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode attention of block `index` for one new position (q, k, v: (batch, heads, 1, head_dim)),
        after this step's begin_step."""
        if q.shape[2] != 1:
            raise ValueError(f"block {index}: the static cache decodes one position at a time, got {q.shape[2]}")
        keys, values = self.keys[index], self.values[index]
        keys.index_copy_(2, self.position.view(1), k)
        values.index_copy_(2, self.position.view(1), v)
        batch, heads, slots, dim = keys.shape
        # One query against max_positions slots, written out (scale and mask in the same kernel as
        # the product): on the H200 the fused SDPA kernel picked for a masked fp32 call took 54 us
        # per block, a third of a graphed decode step.
        scores = torch.baddbmm(self._bias, q.reshape(batch * heads, 1, dim),
                               keys.reshape(batch * heads, slots, dim).transpose(1, 2), alpha=scale)
        # Softmax accumulates in float32 for half types anyway; in their dtype it is one kernel, not a
        # float32 softmax and a cast.
        weights = torch.softmax(scores, dim=-1)
        return torch.bmm(weights, values.reshape(batch * heads, slots, dim)).view(batch, heads, 1, dim)


class FusedRMSNorm(nn.Module):
    """An RMSNorm module's weight and eps as one F.rms_norm call (one kernel where torch fuses it).

    transformers' OlmoeRMSNorm takes six kernels (cast, square, mean, add, rsqrt, scale) and a
    block runs four of them: at batch-1 decode on the GPU every kernel launch is latency. Same
    function; in bfloat16 the weight is applied before the one rounding instead of after it.
    It holds the same Parameter, so state dicts, loading and hooks on the module are unchanged."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)


def fuse_norms(module: nn.Module, names: tuple[str, ...]) -> None:
    """Swap the RMSNorm submodules `names` of `module` for FusedRMSNorm (same parameters)."""
    for name in names:
        norm = getattr(module, name)
        if not isinstance(norm, FusedRMSNorm):
            setattr(module, name, FusedRMSNorm(norm))


def rope_tables(rotary: nn.Module, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of a transformers rotary embedding at `positions` (batch, length), in `like`'s
    dtype, the sin with its first half negated: the form apply_rope takes, computed once per call
    of the model instead of once per block."""
    cos, sin = rotary(like, positions)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding x * cos + rotate_half(x) * sin, with rope_tables' signed sin: rotate_half(x)
    * sin = roll(x, half) * signed_sin, so three kernels (product, roll, addcmul) instead of five."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def shared_storage(params: tuple[nn.Parameter, ...], fused: torch.Tensor | None) -> torch.Tensor | None:
    """One flat tensor whose consecutive pieces are `params`' own storage, so one kernel can read
    them all (q/k/v projections as one matrix product). `fused`, a previous result, is returned
    while the parameters still live in it; otherwise their values are copied into a new one and
    each parameter's .data becomes its piece: the Parameter objects stay (optimizers, state dicts
    and loading keep working, in-place updates show in the fused tensor). `.to()` gives every
    parameter its own storage again, so this is checked on every call. None while a CUDA graph is
    being captured and the pieces are apart (the copy must not be part of a graph)."""
    first = params[0]
    if fused is not None and fused.device == first.device and fused.dtype == first.dtype:
        offset, size = 0, fused.element_size()
        for p in params:
            if p.dtype != fused.dtype or p.data_ptr() != fused.data_ptr() + offset * size:
                break
            offset += p.numel()
        else:
            if offset == fused.numel():
                return fused
    if first.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even under inference_mode
        fused = torch.cat([p.detach().reshape(-1) for p in params])
        offset = 0
        for p in params:
            p.data = fused[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
    return fused


# torch._grouped_mm runs every expert's rows in one call with work proportional to the rows; its
# CPU kernel has no backward (torch 2.13), and on CUDA it needs bf16, so it serves inference.
_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
# Cap on the gathered kernel's per-chunk copy of expert weights (bytes), so a long prefill does not
# materialise every row's weights at once.
_GATHER_CHUNK_BYTES = 256 << 20
EXPERT_KERNELS = ("grouped_mm", "gathered", "row", "loop", "dense")
log = logging.getLogger(__name__)
_warned_loop = False  # the loop fallback is logged once per process


def expert_kernel(device: torch.device | str, dtype: torch.dtype, training: bool) -> str:
    """Which expert kernel runs on `device`/`dtype` (recorded with every profile and benchmark).

    grouped_mm  one torch._grouped_mm call per matrix over the rows sorted by expert (inference on
                CPU, and on CUDA in bf16); work proportional to the routed rows, no host sync.
    gathered    each routed row multiplies its own expert's weights (a batched matmul over gathered
                weights); CUDA inference in other dtypes; work proportional to k, no host sync.
    row         two Triton matrix-vector kernels, one program per (row, block of outputs): the
                batch-1 rows of CUDA inference where Triton is present (`single_row_kernel`); time
                follows k where grouped_mm's moves in steps of two experts.
    loop        one matmul per expert that got rows (reads the counts on the host): CPU training,
                and CPU inference when this torch has no torch._grouped_mm (a logged fallback
                whose latency differs from the grouped kernel's).
    dense       every expert on every row, zero-weighted off the top-k (GPU training only).
    """
    cuda = torch.device(device).type == "cuda"
    if training:
        return "dense" if cuda else "loop"
    if cuda:
        return "grouped_mm" if _HAS_GROUPED_MM and dtype == torch.bfloat16 else "gathered"
    return "grouped_mm" if _HAS_GROUPED_MM else "loop"


def single_row_kernel(device: torch.device | str, dtype: torch.dtype, experts: nn.Module) -> str:
    """The expert kernel of batch-1 rows (decode steps) at inference (recorded beside expert_kernel)."""
    with torch.inference_mode():
        probe = torch.empty(0, device=device, dtype=dtype)
        row = row_kernels.available(probe, experts)
    if row:
        return "row"
    return "gathered" if probe.is_cuda and _single_row_bytes(experts, 8) <= _SINGLE_ROW_GATHER_BYTES else \
        expert_kernel(device, dtype, training=False)


def run_experts(experts: nn.Module, routed: torch.Tensor, counts: torch.Tensor | None,
                expert_of_row: torch.Tensor | None = None, kernel: str | None = None) -> torch.Tensor:
    """SwiGLU expert FFNs on `routed` rows sorted by expert; counts[e] rows go to expert e
    (expert_of_row: each row's expert id, where the caller has it; with it, the gathered kernel
    needs no counts (None) and no sorted order). kernel: default expert_kernel(...).

    The single place sparse expert work happens (tests wrap it to count the rows each expert
    computes). The kernel is `expert_kernel(...)` of the rows' device and dtype.
    """
    kernel = kernel or expert_kernel(routed.device, routed.dtype, torch.is_grad_enabled())
    if kernel == "loop":
        global _warned_loop
        if not torch.is_grad_enabled() and not _warned_loop:
            log.warning("torch %s has no torch._grouped_mm: MoE experts run as a per-expert loop on %s, whose "
                        "latency differs from the grouped kernel's (recorded as expert_kernel='loop')",
                        torch.__version__, routed.device)
            _warned_loop = True
    if kernel == "gathered":
        return gathered_experts(experts, routed, counts, expert_of_row)
    if kernel == "row":
        return row_kernels.row_experts(experts, routed, expert_of_row)
    if kernel == "grouped_mm":
        return grouped_experts(experts, routed, counts, expert_of_row)
    if counts is None:
        counts = expert_counts(expert_of_row, experts.gate_up_proj.shape[0])
    return SPARSE_KERNELS[kernel](experts, routed, counts)


def grouped_experts(experts: nn.Module, routed: torch.Tensor, counts: torch.Tensor | None,
                    expert_of_row: torch.Tensor | None = None) -> torch.Tensor:
    """counts None: the rows' experts `expert_of_row` (sorted) give the offsets instead."""
    gate_up, down = experts.gate_up_proj, experts.down_proj  # (E, 2I, d), (E, d, I)
    offsets = (torch.cumsum(counts, 0, dtype=torch.int32) if counts is not None
               else expert_offsets(expert_of_row, gate_up.shape[0]))
    gate, up = torch._grouped_mm(routed, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    return torch._grouped_mm(experts.act_fn(gate) * up, down.transpose(1, 2), offs=offsets)


def gathered_experts(experts: nn.Module, routed: torch.Tensor, counts: torch.Tensor,
                     expert_of_row: torch.Tensor | None = None) -> torch.Tensor:
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if expert_of_row is None:  # output_size keeps repeat_interleave from reading the counts on the host
        expert_of_row = torch.repeat_interleave(
            torch.arange(counts.numel(), device=counts.device), counts, output_size=routed.shape[0])
    row_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    chunk = max(1, _GATHER_CHUNK_BYTES // row_bytes)
    outputs = []
    for start in range(0, routed.shape[0], chunk):
        rows, which = routed[start : start + chunk, :, None], expert_of_row[start : start + chunk]
        gate, up = torch.bmm(gate_up[which], rows).squeeze(-1).chunk(2, dim=-1)
        outputs.append(torch.bmm(down[which], (experts.act_fn(gate) * up)[:, :, None]).squeeze(-1))
    return torch.cat(outputs)


def looped_experts(experts: nn.Module, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    gate_up, down = experts.gate_up_proj, experts.down_proj
    outputs, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            gate, up = F.linear(routed[start : start + count], gate_up[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(experts.act_fn(gate) * up, down[expert]))
            start += count
    return torch.cat(outputs)


SPARSE_KERNELS = {"grouped_mm": grouped_experts, "gathered": gathered_experts, "loop": looped_experts}


def dense_experts(experts: nn.Module, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Every expert on every row, combined with `gates` (rows, E) that are zero off each row's top-k.

    Same output and gradients as the sparse path (an unselected expert gets weight 0), with a
    handful of large matmuls instead of per-expert launches and host syncs: the GPU training
    kernel. Its work does not depend on k, so latency is never measured through it.
    """
    gate, up = torch.einsum("nd,efd->enf", x, experts.gate_up_proj).chunk(2, dim=-1)
    out = torch.einsum("eni,edi->end", experts.act_fn(gate) * up, experts.down_proj)
    return torch.einsum("end,ne->nd", out, gates.to(out.dtype))


# On CUDA, batch-1 rows whose k experts' weights take at most this many bytes are computed by the
# gathered kernel whatever the dtype: a copy of under a few MB costs less than grouped_mm's two
# launches per matrix (on the H200 the shipped model's bf16 decode took 5.3 ms per episode with
# grouped_mm, 4.4 in float32 with gathered). MolmoE's experts (8 x 12.6 MB) stay grouped; on CPU
# the gathered copy is the slower one (the shipped model's block: 330 vs 153 us at k 8).
_SINGLE_ROW_GATHER_BYTES = 8 << 20


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows per expert (num_experts,) of the assignments `expert_ids`; index_add_ instead of
    bincount, which reads its output size on the host (a CUDA sync)."""
    return torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device).index_add_(
        0, expert_ids, torch.ones_like(expert_ids))


_EXPERT_IDS: dict[tuple[int, torch.device], torch.Tensor] = {}  # arange(num_experts) per device


def expert_offsets(sorted_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """End offset of each expert's rows (num_experts,) int32, for expert ids sorted ascending: one
    searchsorted instead of counts and their cumsum (four kernels; at batch-1 decode on the GPU
    every kernel is latency)."""
    key = (num_experts, sorted_ids.device)
    ids = _EXPERT_IDS.get(key)
    if ids is None:
        ids = torch.arange(num_experts, device=sorted_ids.device)
        if not (ids.is_cuda and torch.cuda.is_current_stream_capturing()):  # no cached graph-pool memory
            _EXPERT_IDS[key] = ids
    return torch.searchsorted(sorted_ids, ids, right=True, out_int32=True)


def _single_row_bytes(experts: nn.Module, k: int) -> int:
    """Bytes of k experts' weights (what the gathered kernel copies for one row)."""
    return k * (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * experts.gate_up_proj.element_size()


def single_row_moe(experts: nn.Module, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE output (1, d) of one row x (1, d) routed to experts `chosen` (k,) with `weights` (k,),
    plus `residual` (1, d) if given (in the combining product: one kernel less)."""
    k = chosen.shape[0]
    if row_kernels.available(x, experts):  # CUDA inference: time follows k (envs/backends/vlm/row_kernels.py)
        y = run_experts(experts, x.expand(k, -1), None, chosen, kernel="row")
    elif x.is_cuda and _single_row_bytes(experts, k) <= _SINGLE_ROW_GATHER_BYTES and not torch.is_grad_enabled():
        y = run_experts(experts, x.expand(k, -1).contiguous(), None, chosen, kernel="gathered")  # any order
    else:
        chosen, order = torch.sort(chosen)
        weights = weights[order]
        y = run_experts(experts, x.expand(k, -1).contiguous(), None, chosen)  # sorted: offsets without counts
    weights = weights.to(y.dtype)[None]
    return weights @ y if residual is None else torch.addmm(residual, weights, y)


def moe_forward(mlp: nn.Module, x: torch.Tensor, top_k: int | torch.Tensor, norm_topk_prob: bool,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """OLMoE sparse MoE on x (rows, d) with `top_k` experts per row, plus `residual` (rows, d) if
    given; work proportional to top_k except in GPU training (see dense_experts). top_k may be a
    (rows,) tensor of per-row values (pretraining's per-sample knobs): then the experts run dense."""
    logits = F.linear(x, mlp.gate.weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    per_row = isinstance(top_k, torch.Tensor)
    k = int(top_k.max()) if per_row else top_k
    if x.shape[0] == 1 and not per_row:  # one sort kernel; CUDA's topk is two (a select, then a sort)
        weights, chosen = (t[:, :k] for t in torch.sort(probs, dim=-1, descending=True))
    else:
        weights, chosen = torch.topk(probs, k, dim=-1)
    if per_row:  # keep each row's first top_k[row] ranks
        weights = weights * (torch.arange(weights.shape[1], device=x.device) < top_k[:, None])
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if per_row or expert_kernel(x.device, x.dtype, torch.is_grad_enabled()) == "dense":
        out = dense_experts(mlp.experts, x, torch.zeros_like(probs).scatter(1, chosen, weights)).to(x.dtype)
        return out if residual is None else residual + out
    if x.shape[0] == 1:  # batch-1 decode: k copies of one row, no gathers or scatters of rows
        return single_row_moe(mlp.experts, x, chosen[0], weights[0], residual)
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = order // top_k  # the row each (row, slot) assignment belongs to, grouped by expert
    y = run_experts(mlp.experts, x[rows], expert_counts(flat, mlp.gate.weight.shape[0])) * weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
    return (torch.zeros_like(x) if residual is None else residual).index_add(0, rows, y)


class ElasticBlock(nn.Module):
    """Runs one `OlmoeDecoderLayer` with a chosen top-k, reading/writing its KV-cache entry.

    The layer is held outside the module tree (no duplicate parameters in state_dict); this
    module exists so the latency meter and tests can hook every block call.
    """

    def __init__(self, layer: nn.Module, index: int, norm_topk_prob: bool):
        super().__init__()
        self.__dict__["layer"] = layer
        self.index = index
        self.norm_topk_prob = norm_topk_prob
        fuse_norms(layer, ("input_layernorm", "post_attention_layernorm"))
        fuse_norms(layer.self_attn, ("q_norm", "k_norm"))
        self._qkv: torch.Tensor | None = None  # shared_storage of the q/k/v weights, then the q/k norms'
        attn = layer.self_attn
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        # One q/k/v product needs bias-free projections of one width and one norm eps (OLMoE's
        # layout): fixed by the layer, so decided here and not on every call.
        self._fusable_qkv = (all(m.bias is None and m.out_features == attn.q_proj.out_features for m in projections)
                             and attn.q_norm.variance_epsilon == attn.k_norm.variance_epsilon)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        top_k: int | torch.Tensor,
        cache: Optional[KVCache | StaticKVCache] = None,
    ) -> torch.Tensor:
        """top_k: an int, or a (batch,) tensor of per-sample values (pretraining)."""
        layer = self.layer
        hidden = self._attention(layer.input_layernorm(hidden), cos, sin, cache, hidden)
        batch, length, width = hidden.shape
        moe_in = layer.post_attention_layernorm(hidden).reshape(-1, width)
        if isinstance(top_k, torch.Tensor):
            top_k = top_k.repeat_interleave(length)
        return moe_forward(layer.mlp, moe_in, top_k, self.norm_topk_prob,
                           hidden.reshape(-1, width)).reshape(batch, length, width)

    def _attention(self, x, cos, sin, cache, residual):
        """residual + the attention output; the residual is added in the output projection's
        product (one kernel less per block)."""
        attn = self.layer.self_attn
        batch, length, _ = x.shape
        shape = (batch, length, -1, attn.head_dim)
        fused = self._fused_qk(x, shape) if self._fusable_qkv and x.is_cuda and not torch.is_grad_enabled() else None
        if fused is None:
            q = attn.q_norm(attn.q_proj(x)).view(shape).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(x)).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            qk = torch.cat((q, k), dim=1)
        else:
            qk, v = fused
        # q and k rotated together: one rope instead of two
        q_heads = attn.q_proj.out_features // attn.head_dim
        q, k = apply_rope(qk, cos.unsqueeze(1), sin.unsqueeze(1)).split((q_heads, qk.shape[1] - q_heads), dim=1)
        if isinstance(cache, StaticKVCache):
            return self._output(cache.attend(self.index, q, k, v, attn.scaling), residual)
        past = cache.get(self.index) if cache is not None else None
        if past is not None:
            if length != 1:
                raise ValueError(f"block {self.index}: cached attention takes one new position, got {length}")
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        if cache is not None:
            cache[self.index] = (k, v)
        # Prefill: causal. Decode: the single new position sees every cached one. Training pads on
        # the right, so causal attention never lets a real position see padding.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and length > 1, scale=attn.scaling)
        return self._output(out, residual)

    def _fused_qk(self, x: torch.Tensor, shape: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        """CUDA inference: (normed q and k concatenated over heads, v), each (batch, heads, length,
        head_dim), from one matrix product and one norm (three kernels where the separate
        projections, norms and concatenation take six; at batch-1 decode every kernel is latency),
        for a layer whose layout allows it (`_fusable_qkv`). None while a CUDA graph is being
        captured and the weights are apart (shared_storage)."""
        attn = self.layer.self_attn
        norms = (attn.q_norm, attn.k_norm)
        width = attn.q_proj.out_features
        weights = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, norms[0].weight, norms[1].weight)
        self._qkv = shared_storage(weights, self._qkv)
        if self._qkv is None:
            return None
        batch, length, _ = x.shape
        qkv_weight = self._qkv[: 3 * width * x.shape[-1]].view(3 * width, -1)
        qkv = F.linear(x, qkv_weight)
        qk = F.rms_norm(qkv[..., : 2 * width].view(batch, length, 2, width), (width,), None,
                        norms[0].variance_epsilon) * self._qkv[3 * width * x.shape[-1]:].view(2, width)
        qk = qk.view(batch, length, -1, attn.head_dim).transpose(1, 2)
        return qk, qkv[..., 2 * width:].view(shape).transpose(1, 2)

    def _output(self, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual (batch, length, d) + o_proj of the heads' outputs (batch, heads, length, head_dim)."""
        o_proj = self.layer.self_attn.o_proj
        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch * length, -1)
        if o_proj.bias is not None:
            residual = residual + o_proj.bias
        return torch.addmm(residual.reshape(batch * length, -1), out, o_proj.weight.t()).view_as(residual)
