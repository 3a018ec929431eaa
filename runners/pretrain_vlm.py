"""Pretraining of the embedded VLM on SynthVQA, then block importance and an accuracy grid.

MolmoE-1B was trained at its full configuration only, and on real data its knobs cost accuracy
differently per dataset. This recipe makes the test bed behave that way: knobs are drawn PER SAMPLE
and PER FAMILY, through the same elastic code as inference (BudgetVLM.encode_images /
blocks[i](..., top_k, ...) / logits):
  * the tier is drawn per batch from --tier-weights (a batch holds images of one size, so one tiling);
  * a sample of an --elastic-families family (default coarse, detail: questions the controller should
    be able to answer cheaply) runs, with probability 1 - --full-prob, a reduced decoder: insertion p
    uniform over 1..5, top-k uniform in K-4..K for the blocks >= p (blocks < p at K), and 0..4 of the
    blocks p..L-1 dropped at random; otherwise the full decoder. `family:top_k` or `family:blocks`
    reduces that one knob only, so the family learns to survive it and stays sensitive to the other;
  * every other family always runs the full decoder (all blocks at top-k K), like MolmoE-1B:
    nothing teaches it to survive a smaller top-k or fewer blocks.
The kept experts' weights are not renormalised (VLMConfig.norm_topk_prob, as OLMoE ships).
--router-focus-weight W adds W * `router_focus_loss`: it teaches every router to spread its mass
evenly over exactly K experts (the shipped routers put ~22% of their mass on ranks 5-8 and as much
on ranks 9-16). Measured (docs/RESULTS.md section 1): at W = 0.3 the loss fell from 0.40 to 0.10,
yet top-k 8 -> 4 still cost nothing, also on a family trained at top-k 8 only.
The sequence is [vision tokens][question][budget token][answer][<eos>], teacher-forced: the loss
is the cross-entropy of the answer and <eos> tokens, predicted from the budget position onwards.
The budget position holds the model's `embed_budget` of a random vector s * N(0, I), s ~ U(0, 1.5)
per sample, because at inference the controller's (LayerNorm-scaled) budget encoder output sits there.

After training: importance.json by the drop method (validation loss increase when a block alone is
skipped, full config otherwise), then accuracy per family on a grid of configurations (batched
greedy decoding through envs.backends.vlm.executor with the backend's block plan; --grid all: every static configuration, on the val
and the test split) -> eval.json. The model dir written to --out is a complete VLMBackend model_path.
Training state (weights, optimizer, schedule, RNGs, data position) is saved to
--out/train_state.pt every --save-every-min minutes and at the end; --resume continues from it, so a
run can span several commands of a time-limited machine.

In addition, when --glyph-weight > 0, an auxiliary loss (`glyph_loss`) teaches the vision tower to
read glyphs: a pretraining-only linear head classifies the glyph from the grid-crop vision token
under it (medium and high tiers only). Without it the detail family stayed at chance.

Multi-GPU: run under torchrun; every process takes --batch-size samples per step (gradients are
averaged by DistributedDataParallel), so 4 GPUs at --batch-size 256 train on 1024 samples per step.

Recipe of the shipped checkpoint envs/assets/budgetvlm-molmoe-tiny: docs/RESULTS.md section 1
("Recipe so far") lists every stage's command, GPU-minutes and numbers;
pretrain.log beside the checkpoint holds the stages' logs, eval.json the last stage's grid.
Run it as a module (`python -m runners.pretrain_vlm`), not as a path, so runners/ is not first on
sys.path. CPU smoke run (a tiny model, minutes):
    python -m runners.pretrain_vlm --out /tmp/vlm-test --preset test --steps 50 --batch-size 16 \
        --eval-samples 60 --val-samples 60 --workers 0
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from agents.cli import user_input
from agents.distributed import close_distributed, init_distributed, wrap_ddp
from envs.backends.vlm import VLMConfig, WordTokenizer, build_model, load_model
from envs.backends.vlm.config import PRESETS
from envs.backends.vlm.backend import load_importance
from envs.backends.vlm.executor import Executor, block_plan, encode_vision, full_plan, run_blocks
from envs.backends.vlm.preprocess import image_to_tensor, tiling
from envs.data import synthvqa
from envs.data.accuracy import score_answer
from envs.machine import resolve_device

TIERS = ("low", "medium", "high")
IGNORE = -100
BUDGET_SCALE_MAX = 1.5
MAX_INSERTION = 5  # the design's insertion positions 1..5
MAX_DROPPED = 4  # the design's 12..16 blocks
TRAIN_STATE_FILE = "train_state.pt"


GLYPH_CLASSES = synthvqa.DIGITS + synthvqa.LETTERS


class EncodedSynthVQA(Dataset):
    """SynthVQA samples as (image uint8 (3, H, W), question ids, answer ids + <eos>, family, index,
    glyph (class, centre x, centre y) or (-1, 0, 0) when the scene has no glyph)."""

    def __init__(self, data: synthvqa.SynthVQA, tokenizer: WordTokenizer):
        self.data, self.tokenizer = data, tokenizer

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        rec = self.data.record(index)
        glyphs = [it for it in rec.scene.items if isinstance(it, synthvqa.Glyph)]
        glyph = (-1, 0, 0)
        if len(glyphs) == 1:
            x0, y0, x1, y1 = glyphs[0].bbox()
            glyph = (GLYPH_CLASSES.index(glyphs[0].char), (x0 + x1) // 2, (y0 + y1) // 2)
        return (
            image_to_tensor(synthvqa.render_scene(rec.scene)),
            self.tokenizer.encode(rec.question),
            self.tokenizer.encode(rec.answer) + [self.tokenizer.eos_id],
            synthvqa.FAMILIES.index(rec.family),
            index,
            glyph,
        )


class SizeBatchSampler(Sampler):
    """Endless batches of indices that share one image size (so one tiling per batch).

    Each batch picks a size with probability proportional to its share of the data, then takes the
    next `batch_size` indices of that size's own shuffled order (reshuffled when used up).
    `state`/`load_state` make the position resumable.
    """

    def __init__(self, size_index: np.ndarray, batch_size: int, seed: int):
        self.batch_size = batch_size
        self.groups = [np.flatnonzero(size_index == s) for s in range(int(size_index.max()) + 1)]
        self.groups = [g for g in self.groups if len(g) >= batch_size]
        if not self.groups:
            raise ValueError(f"no image size has batch_size={batch_size} samples")
        self.rng = np.random.default_rng(seed)
        self.weights = np.array([len(g) for g in self.groups], dtype=float) / sum(len(g) for g in self.groups)
        self.orders = [self.rng.permutation(g) for g in self.groups]
        self.cursors = [0] * len(self.groups)

    def __iter__(self):
        while True:
            g = int(self.rng.choice(len(self.groups), p=self.weights))
            if self.cursors[g] + self.batch_size > len(self.orders[g]):
                self.orders[g], self.cursors[g] = self.rng.permutation(self.groups[g]), 0
            start = self.cursors[g]
            self.cursors[g] += self.batch_size
            yield self.orders[g][start : start + self.batch_size].tolist()

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "orders": self.orders, "cursors": list(self.cursors)}

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.orders, self.cursors = list(state["orders"]), list(state["cursors"])


def size_batches(size_index: np.ndarray, batch_size: int) -> list[list[int]]:
    """Every index once, in batches that share one image size (evaluation order: by size, then index)."""
    batches = []
    for s in range(int(size_index.max()) + 1):
        idx = np.flatnonzero(size_index == s).tolist()
        batches += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    return batches


def collate(items, pad_id: int):
    """Text part per sample: question, budget slot, answer, <eos>, right-padded.

    labels[t] is the token to predict at text position t (the budget slot predicts the first
    answer token, each answer token the next one), IGNORE elsewhere. Images must share one size.
    """
    images = torch.stack([it[0] for it in items])
    width = max(len(it[1]) + 1 + len(it[2]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    slot = torch.zeros(len(items), dtype=torch.long)
    for row, (_, q, a, *_) in enumerate(items):
        n = len(q)
        ids[row, :n] = torch.tensor(q)
        ids[row, n + 1 : n + 1 + len(a)] = torch.tensor(a)
        labels[row, n : n + len(a)] = torch.tensor(a)
        slot[row] = n
    families = torch.tensor([it[3] for it in items])
    indices = torch.tensor([it[4] for it in items])
    glyphs = torch.tensor([it[5] for it in items], dtype=torch.long)
    return images, ids, labels, slot, families, indices, glyphs


class RowPlan(NamedTuple):
    """Per-sample decoder knobs of a training batch: top_k (batch, L) and keep (batch, L) bool."""

    top_k: torch.Tensor
    keep: torch.Tensor


def extend_vocabulary(model, tokenizer: WordTokenizer, words) -> tuple:
    """The model and tokenizer for the vocabulary `words` (a new SynthVQA family brings new words):
    rows of words the model knows are kept, a new word's embedding and LM-head rows start at the
    mean of the known rows. Returns the inputs unchanged when the vocabulary is the same."""
    new_tok = WordTokenizer.build(words)
    old_vocab, new_vocab = tokenizer.vocabulary(), new_tok.vocabulary()
    if old_vocab == new_vocab:
        return model, tokenizer
    dropped = sorted(set(old_vocab) - set(new_vocab))
    if dropped:
        raise ValueError(f"--init model's vocabulary has words SynthVQA no longer uses: {dropped[:5]}")
    cfg = dataclasses.replace(model.cfg, vocab_size=new_tok.vocab_size)
    grown = build_model(cfg).to(next(model.parameters()).device)
    state = model.state_dict()
    for name in ("decoder.model.embed_tokens.weight", "decoder.lm_head.weight"):
        old = state[name]
        rows = old.mean(0, keepdim=True).repeat(new_tok.vocab_size, 1)
        rows[[new_vocab[w] for w in old_vocab]] = old[[old_vocab[w] for w in old_vocab]]
        state[name] = rows
    grown.load_state_dict(state, strict=True)
    return grown, new_tok


def sample_tier(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


ELASTIC_KNOBS = ("top_k", "blocks")


def parse_elastic_families(text: str) -> dict[str, frozenset[str]]:
    """'coarse,knowledge:blocks,reasoning:top_k+blocks' -> the decoder knobs each family's reduced
    rows vary (a bare family name: all of ELASTIC_KNOBS)."""
    out = {}
    for item in (i for i in text.split(",") if i):
        family, sep, knobs = item.partition(":")
        if family not in synthvqa.FAMILIES:
            raise ValueError(f"--elastic-families: unknown family {family!r}; expected names among {synthvqa.FAMILIES}")
        chosen = frozenset(knobs.split("+")) if sep else frozenset(ELASTIC_KNOBS)
        if not chosen or not chosen <= set(ELASTIC_KNOBS):
            raise ValueError(f"--elastic-families: {item!r} has knobs {sorted(chosen)}; expected "
                             f"family or family:knob[+knob] with knobs among {ELASTIC_KNOBS}")
        out[family] = chosen
    return out


def sample_row_plans(generator: torch.Generator, families: torch.Tensor, elastic_top_k: torch.Tensor,
                     elastic_blocks: torch.Tensor, num_layers: int, top_k: int, full_prob: float) -> RowPlan:
    """Per-sample decoder knobs (see module docstring): rows of an elastic family get, with
    probability 1 - full_prob, insertion p ~ U{1..5}, top-k ~ U{K-4..K} on blocks >= p (where the
    family's top-k is elastic) and 0..4 of blocks p..L-1 dropped (where its blocks are); every
    other row runs all blocks at top-k K. elastic_*: (num families,) bool."""
    batch = families.shape[0]
    g = generator
    reduced = (elastic_top_k | elastic_blocks)[families] & (torch.rand(batch, generator=g) >= full_prob)
    p = torch.randint(1, min(MAX_INSERTION, num_layers) + 1, (batch, 1), generator=g)
    k = torch.randint(max(1, top_k - 4), top_k + 1, (batch, 1), generator=g)
    blocks = torch.arange(num_layers)[None]
    reduce_k = (reduced & elastic_top_k[families])[:, None]
    ks = torch.where(reduce_k & (blocks >= p), k, torch.full_like(k, top_k))
    # drop n ~ U{0..4} of the blocks >= p: the n droppable blocks with the smallest random scores
    n = torch.randint(0, MAX_DROPPED + 1, (batch, 1), generator=g)
    scores = torch.rand(batch, num_layers, generator=g).masked_fill(blocks < p, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    keep = ~((reduced & elastic_blocks[families])[:, None] & (rank < n))
    return RowPlan(ks, keep)


def forward_text(model, images, ids, slot, budget, tier, plan):
    """Hidden states of the text part (batch, text_len, d_model) under `plan` (teacher forcing),
    and the vision tokens. plan: [(block, top_k), ...] for every row, or a RowPlan (per row)."""
    vision = encode_vision(model, images, tier)
    text = model.embed(ids)
    is_slot = torch.arange(ids.shape[1], device=ids.device)[None] == slot[:, None]
    text = torch.where(is_slot[..., None], model.embed_budget(budget)[:, None, :].to(text.dtype), text)
    hidden = torch.cat([vision, text], dim=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
    cos, sin = model.rope(positions, hidden)
    if isinstance(plan, RowPlan):  # per-sample knobs (training): every block runs, rows keep or skip it
        for block in range(model.cfg.num_layers):
            out = model.blocks[block](hidden, cos, sin, plan.top_k[:, block], None)
            hidden = torch.where(plan.keep[:, block, None, None], out, hidden)
    else:
        hidden = run_blocks(model, hidden, cos, sin, plan)
    return hidden[:, vision.shape[1] :], vision


def random_budget(batch: int, d_model: int, device, generator=None):
    scale = torch.rand(batch, 1, device=device, generator=generator) * BUDGET_SCALE_MAX
    return scale * torch.randn(batch, d_model, device=device, generator=generator)


def glyph_token_index(glyphs: torch.Tensor, tier: str, cfg: VLMConfig, height: int, width: int) -> torch.Tensor:
    """Index among the vision tokens of the grid-crop token that holds each glyph's centre.

    glyphs (batch, 3) = (class, x, y) in image pixels of (height, width) images; the tier's tiling
    places the image (scaled, padded) on a rows x cols canvas of crop_size cells, each crop is
    (crop_size / (patch * pool))^2 tokens in row-major order after the global view.
    """
    tile, size = tiling(height, width, tier, cfg), cfg.crop_size
    token_px = cfg.patch_size * cfg.pool
    side = cfg.patches_per_side // cfg.pool
    x = (glyphs[:, 1].float() * tile.scale + tile.pad_left).long().clamp(0, tile.cols * size - 1)
    y = (glyphs[:, 2].float() * tile.scale + tile.pad_top).long().clamp(0, tile.rows * size - 1)
    crop = 1 + (y // size) * tile.cols + x // size  # crop 0 is the global view
    return crop * cfg.tokens_per_crop + (y % size // token_px) * side + x % size // token_px


def glyph_loss(glyph_head, vision, glyphs, tier, cfg, height: int, width: int):
    """Auxiliary pretraining loss: classify the glyph from the grid token that holds it.

    The answer alone gives the vision tower almost no signal to learn segment glyphs (whose ghost
    segments make lit and unlit strokes carry the same ink): the `detail` family stayed at chance
    over 2.5M samples. This direct target teaches the tower to read glyphs at the tiers whose
    grid crops can (not the global view, where the low tier is meant to fail).
    """
    has = glyphs[:, 0] >= 0
    if cfg.tier_max_crops[tier] == 0 or not bool(has.any()):
        return vision.new_zeros(())
    rows = has.nonzero().squeeze(1)
    index = glyph_token_index(glyphs[rows], tier, cfg, height, width)
    logits = glyph_head(vision[rows, index].float())
    return F.cross_entropy(logits, glyphs[rows, 0])


def batch_loss(model, batch, tier, plan, device, generator=None, glyph_head=None, glyph_weight=1.0):
    """Answer cross-entropy (+ glyph_weight * glyph_loss when a glyph head is given)."""
    images, ids, labels, slot = (t.to(device, non_blocking=True) for t in batch[:4])
    if isinstance(plan, RowPlan):
        plan = RowPlan(plan.top_k.to(device), plan.keep.to(device))
    budget = random_budget(ids.shape[0], model.cfg.d_model, device, generator)
    # bf16 matmuls on GPU (norms and softmax stay fp32 under autocast); CPU runs fp32.
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden, vision = forward_text(model, images, ids, slot, budget, tier, plan)
        logits = model.logits(hidden)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    if glyph_head is not None:
        height, width = images.shape[-2:]
        loss = loss + glyph_weight * glyph_loss(glyph_head, vision, batch[6].to(device), tier, model.cfg, height, width)
    return loss


@torch.no_grad()
def greedy_answers(executor: Executor, tokenizer, batch, tier, plan, device, max_new_tokens: int, vision=None):
    """Batched greedy answers through the executor (KV cache, the same plan for every step, like
    the backend); rows are grouped by prompt length so none is padded. Budget token: zeros.
    `vision`: the batch's features at `tier` if already encoded (the tower does not depend on the plan)."""
    model = executor.model
    images, ids, _, slot = (t.to(device) for t in batch[:4])
    if vision is None:
        vision = encode_vision(model, images, tier)
    budget = torch.zeros(ids.shape[0], model.cfg.d_model, device=device)
    answers = [None] * ids.shape[0]
    for length in sorted(set(slot.tolist())):
        rows = (slot == length).nonzero().squeeze(1)
        generated = executor.generate(vision[rows], ids[rows, :length], budget[rows], plan, max_new_tokens)
        for row, out in zip(rows.tolist(), generated):
            answers[row] = tokenizer.decode(out)
    return answers


@torch.no_grad()  # the cached vision features must not hold the tower's autograd graph
def evaluate(model, tokenizer, batches, samples, configs, importance, device, max_new_tokens=2):
    """{config name: {"overall": acc, family: acc, ..., "config": knobs}} over `batches` of `samples`."""
    cfg = model.cfg
    results = {}
    model.eval()
    # Eager decoding: evaluation batches vary in size, so per-batch CUDA graphs would not be reused.
    executor = Executor(model, tokenizer.eos_id, mode="eager")
    # Configs in tier order, so each batch's vision features are encoded once per tier, not per config.
    cached_tier, vision = None, []
    for name, (tier, p, k, n) in sorted(configs.items(), key=lambda item: TIERS.index(item[1][0])):
        if tier != cached_tier:
            cached_tier, vision = tier, [encode_vision(model, b[0].to(device), tier) for b in batches]
        plan = block_plan(importance, p, k, n, cfg.num_layers, cfg.top_k)
        correct = {f: [0, 0] for f in synthvqa.FAMILIES}
        for i, batch in enumerate(batches):
            answers = greedy_answers(executor, tokenizer, batch, tier, plan, device, max_new_tokens,
                                     vision=vision[i])
            for answer, index in zip(answers, batch[5].tolist()):
                sample = samples[index]
                correct[sample.family][0] += score_answer(answer, sample)
                correct[sample.family][1] += 1
        total = [sum(c[0] for c in correct.values()), sum(c[1] for c in correct.values())]
        results[name] = {"overall": total[0] / total[1], **{f: c[0] / max(c[1], 1) for f, c in correct.items()}}
        results[name]["config"] = {"tier": tier, "insertion": p, "top_k": k, "num_blocks": n}
    return {name: results[name] for name in configs}


@torch.no_grad()
def drop_importance(model, batches, device, seed: int) -> dict[int, float]:
    """Validation loss increase when block b alone is skipped (full config otherwise)."""
    cfg = model.cfg
    model.eval()

    def loss_of(plan):
        gen = torch.Generator(device=device).manual_seed(seed)  # same budget tokens for every plan
        losses = [batch_loss(model, batch, "high", plan, device, gen).item() for batch in batches]
        return sum(losses) / len(losses)

    full = full_plan(cfg.num_layers, cfg.top_k)
    base = loss_of(full)
    return {b: loss_of([x for x in full if x[0] != b]) - base for b in range(cfg.num_layers)}


def top_k_values(cfg: VLMConfig) -> list[int]:
    """The top-k values the grids and the profile cover: the trained k and the 4 below it."""
    return list(range(max(1, cfg.top_k - 4), cfg.top_k + 1))


def knob_grid(cfg: VLMConfig) -> dict[str, tuple[str, int, int, int]]:
    """Full config, each knob alone at each of its values (p = 1: top-k acts on blocks 1..L-1),
    and the cheapest config."""
    L, K = cfg.num_layers, cfg.top_k
    grid = {"full": ("high", 1, K, L)}
    for tier in TIERS[:-1]:
        grid[f"tier={tier}"] = (tier, 1, K, L)
    for k in top_k_values(cfg)[:-1]:
        grid[f"top_k={k}"] = ("high", 1, k, L)
    for n in range(max(1, L - 4), L):
        grid[f"blocks={n}"] = ("high", 1, K, n)
    grid["cheapest"] = ("low", 1, top_k_values(cfg)[0], max(1, L - 4))
    return grid


def static_grid(cfg: VLMConfig, top_ks: list[int] | None = None) -> dict[str, tuple[str, int, int, int]]:
    """Every static configuration the profile measures: tier x top-k x blocks at p = 1 (top-k values
    limited to `top_ks` if given)."""
    L = cfg.num_layers
    ks = [k for k in top_k_values(cfg) if top_ks is None or k in top_ks]
    return {f"{t}/k{k}/N{n}": (t, 1, k, n) for t in TIERS for k in ks
            for n in range(max(1, L - MAX_DROPPED), L + 1)}


def router_focus_loss(moe_inputs, gates, top_k: int) -> torch.Tensor:
    """Mean over blocks and tokens of KL(uniform over the token's top_k experts || router softmax):
    zero when a router puts 1/top_k on each of top_k experts and nothing elsewhere.
    moe_inputs[b]: block b's MoE input (..., d); gates[b]: its router weight (E, d)."""
    losses = []
    for x, weight in zip(moe_inputs, gates):
        log_probs = torch.log_softmax(F.linear(x.float(), weight.float()), dim=-1)
        losses.append(-log_probs.topk(top_k, dim=-1).values.mean() - math.log(top_k))
    return torch.stack(losses).mean()


class PretrainLoss(torch.nn.Module):
    """batch_loss (+ router_weight * router_focus_loss) as a module: what DistributedDataParallel
    wraps, so that the model's and the glyph head's gradients are averaged over the ranks in backward.
    forward returns (total loss, router focus loss or None)."""

    def __init__(self, model, glyph_head, glyph_weight: float, router_weight: float = 0.0):
        super().__init__()
        self.model, self.glyph_head, self.glyph_weight = model, glyph_head, glyph_weight
        self.router_weight = router_weight
        self._moe_inputs, self._collecting = [], False
        if router_weight > 0:  # the MoE input is the post-attention norm's output (ElasticBlock)
            for block in model.blocks:
                block.layer.post_attention_layernorm.register_forward_hook(self._collect)

    def _collect(self, module, args, out):
        if self._collecting:  # only inside forward: evaluation and importance runs keep nothing
            self._moe_inputs.append(out)

    def forward(self, batch, tier, plan, device, generator=None):
        self._collecting = self.router_weight > 0
        try:
            loss = batch_loss(self.model, batch, tier, plan, device, generator, self.glyph_head, self.glyph_weight)
        finally:
            self._collecting = False
        if self.router_weight <= 0:
            return loss, None
        gates = [block.layer.mlp.gate.weight for block in self.model.blocks]
        focus = router_focus_loss(self._moe_inputs, gates, self.model.cfg.top_k)
        self._moe_inputs.clear()
        return loss + self.router_weight * focus, focus.detach()


def parse_weights(text: str, keys, flag: str) -> dict[str, float] | None:
    """'a=1,b=2' -> {'a': 1.0, 'b': 2.0}; keys must be among `keys`."""
    if not text:
        return None
    out = {}
    for kv in text.split(","):
        key, _, value = kv.partition("=")
        if key not in keys:
            raise ValueError(f"{flag}: unknown key {key!r}; expected keys among {tuple(keys)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"{flag}: {kv!r} is not key=number") from None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="model dir to write (config, weights, tokenizer, importance)")
    ap.add_argument("--preset", default="molmoe-tiny", choices=sorted(PRESETS))
    ap.add_argument("--init", help="start from this model dir instead of random weights")
    ap.add_argument("--resume", action="store_true", help=f"continue from --out/{TRAIN_STATE_FILE}")
    ap.add_argument("--eval-only", action="store_true",
                    help="no training: evaluate --init's weights with its importance.json (the knob grid, and "
                         "with --grid all every static config) into --out/eval.json, e.g. on another device")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--time-limit-min", type=float, default=None,
                    help="stop training after this many minutes of training (summed over resumed runs)")
    ap.add_argument("--stop-after-min", type=float, default=None,
                    help="end this process after this many minutes of training, saving the train state "
                         "(the schedule still follows --time-limit-min / --steps; continue with --resume)")
    ap.add_argument("--save-every-min", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--full-prob", type=float, default=0.3,
                    help="probability that an elastic-family sample still runs the full decoder")
    ap.add_argument("--router-focus-weight", type=float, default=0.0,
                    help="weight of router_focus_loss (each router's mass evenly on top-k experts); 0: off")
    ap.add_argument("--elastic-families", default="coarse,detail",
                    help="families trained under reduced decoder knobs, e.g. coarse,knowledge:blocks,reasoning:top_k "
                         "(a bare name: top_k+blocks; the others: full decoder only)")
    ap.add_argument("--tier-weights", default="low=1,medium=1,high=2", help="tier mix of the batches")
    ap.add_argument("--glyph-weight", type=float, default=1.0,
                    help="weight of the auxiliary glyph-reading loss (glyph_loss); 0 turns it off")
    ap.add_argument("--family-weights", default="", help="train family mix, e.g. coarse=1,detail=2,reasoning=1.5")
    ap.add_argument("--train-samples", type=int, default=5_000_000, help="size of the (lazy) train split")
    ap.add_argument("--val-samples", type=int, default=1024)
    ap.add_argument("--eval-samples", type=int, default=1200)
    ap.add_argument("--grid", choices=("knobs", "all"), default="knobs",
                    help="knobs: each knob alone; all: every static config on val and test (eval.json 'grid')")
    ap.add_argument("--grid-top-k", default="",
                    help="--grid all over these top-k values only, e.g. 4,8 (default: every value)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)
    elastic_knobs = parse_elastic_families(args.elastic_families)
    if not (math.isfinite(args.router_focus_weight) and args.router_focus_weight >= 0):
        raise ValueError(f"--router-focus-weight {args.router_focus_weight!r}: expected a finite number >= 0")
    tier_weights = parse_weights(args.tier_weights, TIERS, "--tier-weights") or {t: 1.0 for t in TIERS}
    train_weights = parse_weights(args.family_weights, synthvqa.FAMILIES, "--family-weights")
    try:
        grid_top_ks = [int(k) for k in args.grid_top_k.split(",") if k] or None
    except ValueError:
        raise ValueError(f"--grid-top-k {args.grid_top_k!r}: expected comma-separated integers, e.g. 4,8") from None

    resolve_device(args.device, "--device")  # a clear error before anything is built or written
    ranks = init_distributed(args.device)
    rank, world, device = ranks.rank, ranks.world_size, ranks.device
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    state_path = out / TRAIN_STATE_FILE
    if args.resume and not state_path.is_file():
        raise FileNotFoundError(f"--resume: {state_path} does not exist")
    if args.eval_only and (not args.init or args.resume):
        raise ValueError("--eval-only: expected --init MODEL_DIR (the weights to evaluate) and no --resume")
    if args.init or args.resume:
        model, tokenizer = load_model(args.out if args.resume else args.init, device)
        if args.init:
            model, tokenizer = extend_vocabulary(model, tokenizer, synthvqa.vocabulary())
    else:
        tokenizer = WordTokenizer.build(synthvqa.vocabulary())
        cfg = VLMConfig(
            vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
            **PRESETS[args.preset],
        )
        model = build_model(cfg, seed=args.seed).to(device)
    cfg = model.cfg
    if grid_top_ks and not set(grid_top_ks) <= set(top_k_values(cfg)):
        raise ValueError(f"--grid-top-k {args.grid_top_k!r}: expected values in {top_k_values(cfg)}")
    if rank == 0:
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg}; "
              f"{world} process(es) x batch {args.batch_size}", flush=True)

    def data(split, n, family_weights=None):
        return synthvqa.SynthVQA(split, n, seed=args.seed, family_weights=family_weights)

    def loader(dataset, batch_sampler):
        return DataLoader(
            EncodedSynthVQA(dataset, tokenizer), batch_sampler=batch_sampler,
            num_workers=args.workers, collate_fn=functools.partial(collate, pad_id=tokenizer.pad_id),
            pin_memory=device.type == "cuda",
            # fork: workers start in seconds (spawn re-imports torch, transformers, torchrl in each)
            multiprocessing_context="fork" if args.workers > 0 else None,
            prefetch_factor=4 if args.workers > 0 else None,
        )

    def evaluate_grids(importance, steps, trained_s):
        """The knob grid on test (and with --grid all every static config on val and test) into eval.json."""
        model.eval()
        # Rendered once, reused by every plan below.
        val_data, test_data = data("val", args.val_samples), data("test", args.eval_samples)
        val_batches = list(loader(val_data, size_batches(val_data.size_index, 256)))
        test_batches = list(loader(test_data, size_batches(test_data.size_index, 256)))
        if importance is None:
            importance = drop_importance(model, val_batches, device, args.seed)
            (out / "importance.json").write_text(json.dumps(
                {"method": "drop_loss", "scores": {str(b): s for b, s in importance.items()},
                 "note": "validation loss increase when the block alone is skipped (pretrain_vlm.py)"}, indent=2) + "\n")
            print("importance:", {b: round(s, 4) for b, s in importance.items()}, flush=True)
        test_samples = [test_data[i] for i in range(len(test_data))]
        grid, measured = {}, {}
        if args.grid == "all":
            val_samples = [val_data[i] for i in range(len(val_data))]
            static = static_grid(cfg, grid_top_ks)
            grid = {"val": evaluate(model, tokenizer, val_batches, val_samples, static, importance, device),
                    "test": evaluate(model, tokenizer, test_batches, test_samples, static, importance, device)}
            # A knob-grid config that the test grid already holds is not decoded again.
            measured = {c: grid["test"][name] for name, c in static.items()}
        knobs = knob_grid(cfg)
        missing = {name: c for name, c in knobs.items() if c not in measured}
        results = evaluate(model, tokenizer, test_batches, test_samples, missing, importance, device) if missing else {}
        results = {name: results[name] if name in missing else measured[c] for name, c in knobs.items()}
        summary = {"steps": steps, "train_minutes": trained_s / 60, "args": vars(args), "accuracy": results}
        for name, r in results.items():
            print(f"{name:12s} " + " ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "config"), flush=True)
        if grid:
            summary["grid"] = grid
        (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    if args.eval_only:
        out.mkdir(parents=True, exist_ok=True)
        _, scores = load_importance(Path(args.init), cfg.num_layers, None)
        return evaluate_grids(scores, 0, 0.0)

    # Only the train split gets the family mix; val/test keep equal shares.
    train_data = data("train", args.train_samples, train_weights)
    sampler = SizeBatchSampler(train_data.size_index, args.batch_size, seed=args.seed * 1000 + rank)
    elastic_top_k, elastic_blocks = (torch.tensor([knob in elastic_knobs.get(f, ()) for f in synthvqa.FAMILIES])
                                     for knob in ELASTIC_KNOBS)

    # Pretraining-only head (not saved with the model): reads the glyph class off its vision token.
    glyph_head = torch.nn.Linear(cfg.d_model, len(GLYPH_CLASSES)).to(device) if args.glyph_weight > 0 else None
    params = list(model.parameters()) + (list(glyph_head.parameters()) if glyph_head is not None else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    # Each row's plan runs some blocks and experts only, and the glyph head reads medium and high
    # tiers only: parameters a rank did not use this step get no gradient there.
    objective = wrap_ddp(ranks, PretrainLoss(model, glyph_head, args.glyph_weight, args.router_focus_weight),
                          find_unused_parameters=True)
    rng = random.Random(args.seed)  # the tier per batch: the same on every rank
    plan_gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    step, trained_s = 0, 0.0
    if args.resume:
        state = torch.load(state_path, map_location=device, weights_only=False)  # our own file
        optimizer.load_state_dict(state["optimizer"])
        if glyph_head is not None and state["glyph_head"] is not None:
            glyph_head.load_state_dict(state["glyph_head"])
        step, trained_s = state["step"], state["trained_s"]
        rng.setstate(state["rng"])
        plan_gen.set_state(state["plan_gen"])
        sampler.load_state(state["sampler"][rank])
        if rank == 0:
            print(f"resumed at step {step} after {trained_s / 60:.1f} min of training", flush=True)

    def save_state():
        """Weights (model dir) and everything else needed to continue (train_state.pt); rank 0 writes."""
        samplers = [None] * world
        if world > 1:
            dist.all_gather_object(samplers, sampler.state())
        else:
            samplers = [sampler.state()]
        if rank != 0:
            return
        model.save(out, tokenizer, dtype=torch.float32)
        tmp = state_path.with_suffix(".tmp")
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "trained_s": trained_s,
                    "glyph_head": glyph_head.state_dict() if glyph_head is not None else None,
                    "rng": rng.getstate(), "plan_gen": plan_gen.get_state(), "sampler": samplers}, tmp)
        os.replace(tmp, state_path)

    def progress(step, trained_s):
        """Fraction of training done: by steps, or by training time when a time limit is set and
        binds first. Rank 0's clock decides for every rank, so all stop at the same step."""
        done = step / args.steps
        if args.time_limit_min:
            done = max(done, trained_s / 60 / args.time_limit_min)
        done = min(done, 1.0)
        if world == 1:
            return done
        shared = torch.tensor(done, device=device)
        dist.broadcast(shared, 0)
        return float(shared)

    done = progress(step, trained_s)
    # Linear warmup, then cosine decay to 10% over the progress fraction.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))
    )
    model.train()
    started, last_save, running, running_focus, data_wait = time.time(), time.time(), [], [], 0.0
    session_start_s = trained_s
    fetched = time.time()
    stop_reason = "done"
    for batch in loader(train_data, sampler):
        if done >= 1.0:
            break
        data_wait += time.time() - fetched
        tier = sample_tier(rng, tier_weights)
        plan = sample_row_plans(plan_gen, batch[4], elastic_top_k, elastic_blocks, cfg.num_layers, cfg.top_k,
                                args.full_prob)
        loss, focus = objective(batch, tier, plan, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        trained_s = session_start_s + time.time() - started
        done = progress(step, trained_s)
        schedule.step()
        running.append(loss.item())
        if focus is not None:
            running_focus.append(focus.item())
        if step % args.log_every == 0 and rank == 0:
            router = f" router_focus {sum(running_focus) / len(running_focus):.4f}" if running_focus else ""
            print(f"step {step} loss {sum(running) / len(running):.4f}{router} lr {schedule.get_last_lr()[0]:.2e} "
                  f"{trained_s / 60:.1f} min (waited {data_wait:.0f} s for data)", flush=True)
            running, running_focus = [], []
        if args.save_every_min and time.time() - last_save > args.save_every_min * 60:
            save_state()
            last_save = time.time()
        if args.stop_after_min and (trained_s - session_start_s) / 60 >= args.stop_after_min and done < 1.0:
            stop_reason = "stop-after"
            break
        fetched = time.time()
    save_state()
    close_distributed(ranks)
    if rank != 0:
        return None
    print(f"trained {step} steps, {trained_s / 60:.1f} min in all ({stop_reason})", flush=True)
    if stop_reason != "done":
        return None

    model.save(out, tokenizer)  # the shipped format: fp16
    return evaluate_grids(None, step, trained_s)


if __name__ == "__main__":
    with user_input():  # a user's mistake: one line and status 2
        main()
