"""One executor of the embedded VLM's plans: every path encodes, runs blocks and decodes through it.

A plan is what one request computes: the crops of its tier (`encode_vision`; the number of vision
tokens is whatever the preprocessing returns for that image, never a per-tier constant), the
prefill sequence [vision][prompt][budget token] (`prefill_sequence`), the kept blocks and their
per-block top-k (`block_plan`: the first p run before the latency token is read), and the decode
length (max_new_tokens). The same functions run
  * batch-1 episodes (VLMBackend.start_episode / run_to / finish),
  * batched greedy evaluation (envs.profiling.BatchedEvaluator, pretraining's evaluation): the
    rows of a batch share one prefill length, so no padding enters and every row computes what its
    batch-1 episode computes,
  * batched teacher-forced training (`run_blocks` without a cache, runners/pretrain_vlm.py).

Greedy decoding (`Executor.decode`), one decoder for all of them, in one of three modes:
  eager   (the default on CPU) steps over the dict KV cache, stopping once every row has <eos>
          (on CPU reading that flag costs nothing);
  static  the prefill's KV entries are copied into a StaticKVCache and every step (embed -> rope
          -> the plan's blocks -> logits -> argmax -> position + 1) has fixed shapes and reads
          nothing on the host: the step count is fixed (max_new_tokens - 1, the plan's decode
          length), the tokens stay on the device, and the ids after <eos> are dropped when the
          caller reads them;
  graphs  (the default on CUDA) the static step captured as a CUDA graph per (plan, batch) on
          first use, kept in an LRU cache of at most `max_graphs`, and replayed per token.
In graphs mode the vision encoder is a graph per crop shape too (`encode`; its output is copied
into the prefill sequence at once).
The batch-1 decoder prefill (`Executor.prefill`, the episode's two stretches: blocks 0..p-1 in
run_to, the plan's blocks from p on in finish) runs in graphs mode as one graph per (length bucket,
steps) when the executor has a `prefill_bucket`: the prefill length changes with every image's crop
grid and every prompt, so it is padded on the right to the next multiple of prefill_bucket (at
most max_positions) and few shapes recur. Causal attention keeps the padding out of every real
position (and the MoE routes each position alone), so the real positions' hidden states and KV
entries are the unpadded prefill's; only those are copied out of the graph. The steps name the
stretch, so they are the key (the same steps after a different p are the same computation). In
static mode the same padded prefill runs eagerly, so CPU tests check it against the unpadded one.
Without a prefill_bucket (MolmoE's long, wide prefill, whose graphs would each hold their blocks'
KV entries of up to thousands of positions) and in eager mode the prefill is `run_blocks`.
The first use of a shape in graphs mode pays the capture (`captures` counts them); `prepare`,
`prepare_vision` and `prepare_prefill` capture ahead of a timed call, as VLMBackend does outside
its latency sections.
Static mode runs on any device, so CPU tests check the graphs' computation against the eager
decoder.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Callable, ContextManager, Mapping, Sequence

import torch
import torch.nn.functional as F

from envs.backends.vlm.elastic import KVCache, StaticKVCache
from envs.backends.vlm.preprocess import make_crops
from envs.knobs import select_blocks

Step = tuple[int, int]  # (block index, top-k)
DECODE_MODES = ("eager", "static", "graphs")


def _steps(steps: Sequence[Step]) -> tuple[Step, ...]:
    """A plan's steps as a hashable key of plain ints."""
    return tuple((int(b), int(k)) for b, k in steps)


def block_plan(
    importance: Mapping[int, float], insertion: int, top_k: int, num_blocks: int, num_layers: int,
    prefix_top_k: int, first_block_top_k: int | None = None,
) -> tuple[Step, ...]:
    """The (block, top-k) steps of a request, in order: select_blocks by importance; block 0 at
    first_block_top_k (default prefix_top_k), blocks 1..p-1 at prefix_top_k (the model's top-k),
    the kept blocks from p on at `top_k`."""
    first = prefix_top_k if first_block_top_k is None else first_block_top_k
    blocks = select_blocks(importance, insertion, num_blocks, num_layers)
    return tuple((b, first if b == 0 else prefix_top_k if b < insertion else top_k) for b in blocks)


def full_plan(num_layers: int, prefix_top_k: int, first_block_top_k: int | None = None) -> tuple[Step, ...]:
    """Every block at the model's top-k (block 0 at first_block_top_k)."""
    return block_plan({b: 0.0 for b in range(num_layers)}, num_layers, prefix_top_k, num_layers, num_layers,
                      prefix_top_k, first_block_top_k)


def encode_vision(model, images: torch.Tensor, tier: str) -> torch.Tensor:
    """Vision tokens (batch, V, d_model) of same-size images (batch, 3, H, W) at `tier`."""
    return model.encode_images(*make_crops(images, tier, model.cfg))


def prefill_sequence(model, vision: torch.Tensor, prompt_ids: torch.Tensor, budget: torch.Tensor):
    """[vision][prompt][budget token] (batch, V + P + 1, d_model) and its rotary cos, sin.

    vision (batch, V, d); prompt_ids (batch, P); budget (batch, d_model), entering as
    model.embed_budget(budget)."""
    prefix = torch.cat([vision, model.embed(prompt_ids)], dim=1)
    return with_budget_token(model, prefix, model.embed_budget(budget.to(vision.dtype)))


def with_budget_token(model, prefix: torch.Tensor, budget_embedding: torch.Tensor):
    """[prefix][budget token] (batch, T + 1, d_model) and its rotary cos, sin: prefix (batch, T, d) is
    the model's input embeddings of image and prompt, budget_embedding (batch, d) already scaled."""
    seq = torch.cat([prefix, budget_embedding.to(prefix.dtype)[:, None]], dim=1)
    if seq.shape[1] > model.cfg.max_positions:
        raise ValueError(
            f"prefill of {seq.shape[1]} positions exceeds the model's max_positions={model.cfg.max_positions}"
        )
    cos, sin = model.rope(torch.arange(seq.shape[1], device=seq.device)[None], seq)
    return seq, cos, sin


def run_blocks(model, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, steps: Sequence[Step],
               cache: KVCache | None = None) -> torch.Tensor:
    """The plan's blocks over `hidden`; with a cache each block keeps its KV entry (inference), without
    one it is a plain causal forward (teacher-forced training)."""
    for block, k in steps:
        hidden = model.blocks[block](hidden, cos, sin, k, cache)
    return hidden


def prefill_bucket(length: int, multiple: int, max_positions: int) -> int:
    """The padded length a prefill of `length` positions runs at: the next multiple of `multiple`,
    at most max_positions."""
    if not 1 <= length <= max_positions:
        raise ValueError(f"prefill of {length} positions: expected 1..{max_positions} (the model's max_positions)")
    return min(-(-length // multiple) * multiple, max_positions)


def pad_positions(length: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors` (batch, T, width) zero-padded on the right to `length` positions."""
    return tuple(F.pad(t, (0, 0, 0, length - t.shape[1])) for t in tensors)


def padded_prefill(model, steps: Sequence[Step], hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The prefill of `steps` over right-padded inputs (what a prefill graph captures): the output
    (batch, T, d) and the blocks' keys and values stacked in step order, (blocks, batch, heads, T,
    head_dim) each, so that one copy takes them out."""
    cache: KVCache = {}
    hidden = run_blocks(model, hidden, cos, sin, steps, cache)
    return hidden, torch.stack([cache[b][0] for b, _ in steps]), torch.stack([cache[b][1] for b, _ in steps])


def first_tokens(model, hidden: torch.Tensor) -> torch.Tensor:
    """Greedy token (batch, 1) after the prefill's last position."""
    return model.logits(hidden[:, -1:]).argmax(-1)


def trim_at_eos(ids: torch.Tensor, eos_id: int) -> list[list[int]]:
    """Rows of generated ids (batch, n) up to and including the first <eos>."""
    out = []
    for row in ids.tolist():
        kept = []
        for t in row:
            kept.append(t)
            if t == eos_id:
                break
        out.append(kept)
    return out


class CapturedCall:
    """`fn(*inputs)` captured as one CUDA graph on static copies of `inputs` (tensors of fixed
    shapes); calling it copies new inputs in and replays. The returned tensors are the graph's own
    outputs, overwritten by the next call: a caller that keeps them clones them. For stretches run
    one at a time with fixed shapes (a vision tower per crop count, a prefill per length bucket).
    pool: a torch.cuda.graph_pool_handle() shared with other captures; it is safe only if every
    replay's outputs are used up before any graph of the pool replays (one's scratch memory may be
    another's outputs)."""

    def __init__(self, fn: Callable, *inputs: torch.Tensor, quiet: Callable[[], ContextManager] | None = None,
                 pool=None):
        device = inputs[0].device
        if device.type != "cuda":
            raise ValueError(f"CapturedCall needs CUDA inputs; got {device}")
        self.inputs = tuple(t.clone() for t in inputs)
        try:
            with (quiet or nullcontext)():
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # warm-up: lazy init must not be captured
                    fn(*self.inputs)
                torch.cuda.current_stream(device).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=pool):
                    self.outputs = fn(*self.inputs)
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError(f"CUDA out of memory on {device} while capturing a graph of input shapes "
                               f"{[tuple(t.shape) for t in inputs]}; run it eagerly or free memory") from None

    def __call__(self, *inputs: torch.Tensor):
        for static, new in zip(self.inputs, inputs):
            if new.data_ptr() != static.data_ptr():
                static.copy_(new)
        self.graph.replay()
        return self.outputs


class _DecodeGraph:
    """One captured decode step of a plan: reads `token` (batch, 1), writes the next token there and
    advances `static`'s position (held here: the graph addresses its memory)."""

    def __init__(self, graph, token: torch.Tensor, static: StaticKVCache):
        self.graph, self.token, self.static = graph, token, static


class Executor:
    """Greedy decoding (and the batch-1 prefill) of the model under a plan, eager or as CUDA graphs
    (see the module docstring).

    quiet: a context-manager factory entered around graph warm-up and capture (the backend passes
    its latency meter's `suspended`, so hooks fired there are not timed).
    max_graphs bounds the decode graphs and the vision graphs (each an LRU cache);
    prefill_bucket: the multiple the prefill length is padded to in static and graphs modes (None:
    an eager prefill in every mode); max_prefill_graphs (default max_graphs) bounds its graphs.
    The model needs embed(ids), rope(positions, like), blocks[i](h, cos, sin, k, cache), logits(h)
    and encode_images (BudgetVLM, ElasticDecoder and the MolmoE port have them).
    """

    def __init__(self, model, eos_id: int, mode: str | None = None, max_graphs: int = 64,
                 quiet: Callable[[], ContextManager] | None = None, prefill_bucket: int | None = None,
                 max_prefill_graphs: int | None = None):
        self.model, self.eos_id = model, int(eos_id)
        self.num_layers, self.max_positions = model.cfg.num_layers, model.cfg.max_positions
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        mode = ("graphs" if cuda else "eager") if mode is None else mode
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode={mode!r} is not known; expected one of {DECODE_MODES}")
        if mode == "graphs" and not cuda:
            raise ValueError(f"decode mode 'graphs' needs a model on a CUDA device; the model is on {self.device}")
        self.mode = mode
        if int(max_graphs) < 1:
            raise ValueError(f"max_graphs={max_graphs}: expected >= 1")
        self.max_graphs = int(max_graphs)
        if prefill_bucket is not None and int(prefill_bucket) < 1:
            raise ValueError(f"prefill_bucket={prefill_bucket}: expected >= 1 positions, or None (an eager prefill)")
        self.prefill_bucket = None if prefill_bucket is None else int(prefill_bucket)
        self.max_prefill_graphs = self.max_graphs if max_prefill_graphs is None else int(max_prefill_graphs)
        if self.max_prefill_graphs < 1:
            raise ValueError(f"max_prefill_graphs={max_prefill_graphs}: expected >= 1")
        self.quiet = quiet or nullcontext
        self.captures = 0
        self._decode_graphs: OrderedDict[tuple, _DecodeGraph] = OrderedDict()
        self._static: dict[int, StaticKVCache] = {}
        self._vision_graphs: OrderedDict[tuple, CapturedCall] = OrderedDict()
        self._prefill_graphs: OrderedDict[tuple, CapturedCall] = OrderedDict()
        # One memory pool for all prefill graphs: they replay one at a time and `prefill` copies each
        # replay's outputs out at once, so the blocks' scratch memory (in float32 the gathered expert
        # weights, up to 256 MB a chunk) is held once instead of once per graph.
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.graphs and self.prefill_bucket else None

    @property
    def graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs (no module is called, so no hook fires)."""
        return self.mode == "graphs"

    def describe(self) -> dict:
        return {"decode": self.mode, "max_graphs": self.max_graphs, "captures": self.captures,
                "decode_graphs": len(self._decode_graphs), "vision_graphs": len(self._vision_graphs),
                "prefill_bucket": self.prefill_bucket, "max_prefill_graphs": self.max_prefill_graphs,
                "prefill_graphs": len(self._prefill_graphs)}

    def _captured(self, graphs: OrderedDict, limit: int, key: tuple, capture: Callable[[], object]):
        """graphs[key], captured by `capture()` on first use; the least recently used go beyond `limit`."""
        if key in graphs:
            graphs.move_to_end(key)
            return graphs[key]
        while len(graphs) >= limit:
            graphs.popitem(last=False)
        graphs[key] = capture()
        self.captures += 1
        return graphs[key]

    # ------------------------------------------------------------------ vision
    def prepare_vision(self, crops: torch.Tensor, slots: torch.Tensor) -> None:
        """In graphs mode, capture the vision encoder for this crop shape now if it is not cached
        (outside any latency section, like `prepare`)."""
        if self.graphs:
            self._captured(self._vision_graphs, self.max_graphs, (tuple(crops.shape), tuple(slots.shape)),
                           lambda: CapturedCall(self.model.encode_images, crops, slots, quiet=self.quiet))

    def encode(self, crops: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Vision tokens of `crops`: the captured graph of their shape (graphs mode; the result is the
        graph's own output, valid until the next call of that shape) or the encoder itself."""
        if self.graphs:
            self.prepare_vision(crops, slots)
            return self._vision_graphs[(tuple(crops.shape), tuple(slots.shape))](crops, slots)
        return self.model.encode_images(crops, slots)

    # ------------------------------------------------------------------ prefill
    def prepare_prefill(self, steps: Sequence[Step], hidden: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> None:
        """In graphs mode with a prefill_bucket, capture the prefill of `steps` at the bucket of
        hidden's length now if it is not cached (outside any latency section, like `prepare`)."""
        if self.graphs and self.prefill_bucket is not None and steps:
            self._prefill_graph(_steps(steps), self._padded(hidden, cos, sin))

    def prefill(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, steps: Sequence[Step],
                cache: KVCache) -> torch.Tensor:
        """The blocks of `steps` over prefill positions hidden (batch, T, d) with their rotary cos, sin;
        returns their output (batch, T, d) and puts each block's KV entry of the T positions into
        `cache`. With a prefill_bucket the positions are padded to T's bucket: run eagerly (static
        mode) or as the bucket's graph (graphs mode); otherwise, and in eager mode, run_blocks."""
        if self.mode == "eager" or self.prefill_bucket is None or not steps:
            return run_blocks(self.model, hidden, cos, sin, steps, cache)
        steps, length = _steps(steps), hidden.shape[1]
        padded = self._padded(hidden, cos, sin)
        run = self._prefill_graph(steps, padded) if self.graphs else partial(padded_prefill, self.model, steps)
        hidden, keys, values = run(*padded)
        # the real positions only, copied out of the graph's buffers (its next replay overwrites them)
        hidden, keys, values = (t[..., :length, :].clone() for t in (hidden, keys, values))
        cache.update(zip((b for b, _ in steps), zip(keys, values)))
        return hidden

    def _padded(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return pad_positions(prefill_bucket(hidden.shape[1], self.prefill_bucket, self.max_positions), hidden, cos, sin)

    def _prefill_graph(self, steps: tuple, padded: tuple) -> CapturedCall:
        key = (steps, *(tuple(t.shape) for t in padded))
        return self._captured(self._prefill_graphs, self.max_prefill_graphs, key, lambda: CapturedCall(
            partial(padded_prefill, self.model, steps), *padded, quiet=self.quiet, pool=self._prefill_pool))

    # ------------------------------------------------------------------ decode
    def prepare(self, steps: Sequence[Step], batch: int, cache: KVCache) -> None:
        """In graphs mode, capture the decode step of `steps` now if it is not cached, so that a timed
        decode only replays (a capture must not count as the request's latency)."""
        if self.graphs:
            self._decode_graph(_steps(steps), batch, self._static_cache(batch, cache))

    def decode(self, first: torch.Tensor, cache: KVCache, steps: Sequence[Step], prefill_length: int,
               max_new_tokens: int) -> torch.Tensor:
        """Greedy ids (batch, n) starting with `first` (batch, 1); rows stop mattering after <eos>
        (trim_at_eos). Eager: n <= max_new_tokens (stops when every row has <eos>); static and
        graphs: n = max_new_tokens. `cache` holds the prefill's entries of the plan's blocks."""
        steps = _steps(steps)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
        if prefill_length + max_new_tokens - 1 > self.max_positions:
            raise ValueError(f"a prefill of {prefill_length} positions and {max_new_tokens} new tokens exceed the "
                             f"model's max_positions={self.max_positions}")
        if self.mode == "eager":
            return self._decode_eager(first, cache, steps, prefill_length, max_new_tokens)
        return self._decode_static(first, cache, steps, prefill_length, max_new_tokens)

    def _decode_eager(self, token, cache, steps, position, max_new_tokens):
        model = self.model
        generated = [token]
        done = token[:, 0] == self.eos_id
        while len(generated) < max_new_tokens and not bool(done.all()):
            hidden = model.embed(token)
            cos, sin = model.rope(torch.tensor([[position]], device=hidden.device), hidden)
            token = first_tokens(model, run_blocks(model, hidden, cos, sin, steps, cache))
            generated.append(token)
            done |= token[:, 0] == self.eos_id
            position += 1
        return torch.cat(generated, dim=1)

    def _decode_static(self, first, cache, steps, prefill_length, max_new_tokens):
        batch = first.shape[0]
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=first.device)
        out[:, :1].copy_(first)
        if max_new_tokens == 1:
            return out
        static = self._static_cache(batch, cache)
        if self.graphs:
            step = self._decode_graph(steps, batch, static)
            run, token = step.graph.replay, step.token
        else:
            token = torch.empty_like(first)
            run = self._step_body(steps, static, token)
        static.load({b: cache[b] for b, _ in steps}, prefill_length)
        token.copy_(first)
        for i in range(1, max_new_tokens):
            run()
            out[:, i : i + 1].copy_(token)
        return out

    def _step_body(self, steps: tuple, static: StaticKVCache, token: torch.Tensor) -> Callable[[], None]:
        """One static decode step: reads `token`, writes the next one there, advances the position."""
        model = self.model

        def body():
            hidden = model.embed(token)
            cos, sin = model.rope(static.position.view(1, 1), hidden)
            static.begin_step()
            token.copy_(first_tokens(model, run_blocks(model, hidden, cos, sin, steps, static)))
            static.position.add_(1)

        return body

    def _static_cache(self, batch: int, cache: KVCache) -> StaticKVCache:
        if batch not in self._static:
            if len(self._static) >= 2:  # a batch-1 episode cache and one evaluation batch size
                evicted = next(iter(self._static))
                del self._static[evicted]
                for key in [key for key in self._decode_graphs if key[1] == evicted]:
                    del self._decode_graphs[key]
            k = next(iter(cache.values()))[0]
            self._static[batch] = StaticKVCache(self.num_layers, batch, k.shape[1], self.max_positions,
                                                k.shape[3], k.dtype, k.device)
        return self._static[batch]

    def _decode_graph(self, steps: tuple, batch: int, static: StaticKVCache) -> _DecodeGraph:
        return self._captured(self._decode_graphs, self.max_graphs, (steps, batch),
                              lambda: self._capture_decode(steps, batch, static))

    def _capture_decode(self, steps: tuple, batch: int, static: StaticKVCache) -> _DecodeGraph:
        token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        body = self._step_body(steps, static, token)
        position = static.position.clone()
        try:
            with self.quiet():
                # Warm-up on a side stream (lazy kernel and handle init must not be captured).
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    body()
                torch.cuda.current_stream(self.device).wait_stream(side)
                static.position.copy_(position)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    body()
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError(
                f"CUDA out of memory on {self.device} while capturing the decode graph of a {len(steps)}-block plan "
                f"at batch {batch} ({len(self._decode_graphs)} graphs cached); lower max_graphs, the batch size, "
                f"or decode without CUDA graphs (mode 'static') or on --device cpu"
            ) from None
        static.position.copy_(position)
        return _DecodeGraph(graph, token, static)

    # ------------------------------------------------------------------ batched generation
    def generate(self, vision: torch.Tensor, prompt_ids: torch.Tensor, budget: torch.Tensor,
                 steps: Sequence[Step], max_new_tokens: int) -> list[list[int]]:
        """Greedy ids per row (up to <eos>) of rows sharing one prompt length."""
        hidden, cos, sin = prefill_sequence(self.model, vision, prompt_ids, budget)
        cache: KVCache = {}
        hidden = run_blocks(self.model, hidden, cos, sin, steps, cache)
        ids = self.decode(first_tokens(self.model, hidden), cache, steps, hidden.shape[1], max_new_tokens)
        return trim_at_eos(ids, self.eos_id)
