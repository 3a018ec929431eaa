"""Elastic pretraining of the embedded VLM on SynthVQA, then block importance and an accuracy grid.

Every batch runs under knobs drawn at random, through the same elastic code as inference
(BudgetVLM.encode_images / blocks[i](..., top_k, ...) / logits), so every configuration the
controller can pick is one the model has seen:
  * with probability --full-prob the full configuration (high tier, top-k 8 everywhere, all blocks:
    it must stay the best); otherwise
  * tier uniform over the tiers; insertion p uniform over 1..5; blocks >= p at top-k uniform in
    4..8 (blocks < p at 8, as at inference); 0..4 blocks among p..L-1 dropped at random.
The sequence is [vision tokens][question][budget token][answer][<eos>], teacher-forced: the loss
is the cross-entropy of the answer and <eos> tokens, predicted from the budget position onwards.
The budget position holds the model's `embed_budget` of a random vector s * N(0, I), s ~ U(0, 1.5)
per sample, because at inference the controller's (LayerNorm-scaled) budget encoder output sits there.

After training: importance.json by the drop method (validation loss increase when a block alone is
skipped, full config otherwise), then test accuracy per family on a grid of configurations
(batched greedy decoding through envs.backends.vlm.executor with the backend's block plan) ->
eval.json. The model dir written to --out is a complete VLMBackend model_path.

In addition, when --glyph-weight > 0, an auxiliary loss (`glyph_loss`) teaches the vision tower to
read glyphs: a pretraining-only linear head classifies the glyph from the grid-crop vision token
under it (medium and high tiers only). Without it the detail family stayed at chance.

Multi-GPU: run under torchrun; every process takes --batch-size samples per step (gradients are
averaged), so 4 GPUs at --batch-size 256 train on 1024 samples per step.

Recipe of the shipped checkpoint envs/assets/budgetvlm-molmoe-tiny (three chained runs, one device
call each; each run restarts AdamW and the cosine schedule; 6.5M samples, ~65 GPU-minutes):
    A=envs/assets/budgetvlm-molmoe-tiny
    R="-m runners.pretrain_vlm --device cuda --workers 15 --steps 100000"  # the time limit binds
    # 1. from scratch, one H200, 3221 steps of 256. Ran at commit a86a948, whose box scenes held
    #    2-5 glyphs (now 1) and before the glyph loss existed.
    python $R --out $A --time-limit-min 7.2 --batch-size 256 --lr 1e-3 --full-prob 0.3 \
        --family-weights coarse=1,detail=2,reasoning=2
    # 2. 4 x H200, 3041 steps of 4 x 256 (commit 5d67abc: current data, no glyph loss yet)
    torchrun --standalone --nproc_per_node 4 $R --init $A --out $A --time-limit-min 7.5 \
        --batch-size 256 --lr 1e-3 --warmup 100 --full-prob 0.5 --family-weights coarse=1,detail=2.5,reasoning=2 \
        --glyph-weight 0
    # 3. 4 x H100, 2524 steps of 4 x 256, glyph loss on
    torchrun --standalone --nproc_per_node 4 $R --init $A --out $A --time-limit-min 7.0 \
        --batch-size 256 --lr 1e-3 --warmup 100 --full-prob 0.5 --family-weights coarse=1,detail=2.5,reasoning=2 \
        --glyph-weight 1
pretrain.log beside the checkpoint holds the three runs' logs, eval.json the last run's grid. The
recipe has not been re-run end to end (no device time left), so its reproducibility is unmeasured.
Run it as a module (`python -m runners.pretrain_vlm`), not as a path, so runners/ is not first on
sys.path. CPU smoke run (a tiny model, minutes):
    python -m runners.pretrain_vlm --out /tmp/vlm-test --preset test --steps 50 --batch-size 16 \
        --eval-samples 60 --val-samples 60 --workers 0
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils.data import DataLoader, Dataset

from envs.backends.vlm import VLMConfig, WordTokenizer, build_model, load_model, make_crops
from envs.backends.vlm.config import PRESETS
from envs.backends.vlm.executor import Executor, block_plan, encode_vision, full_plan, run_blocks
from envs.backends.vlm.preprocess import image_to_tensor
from envs.data import synthvqa
from envs.data.accuracy import score_answer
from envs.machine import resolve_device

TIERS = ("low", "medium", "high")
IGNORE = -100
BUDGET_SCALE_MAX = 1.5


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


def collate(items, pad_id: int):
    """Text part per sample: question, budget slot, answer, <eos>, right-padded.

    labels[t] is the token to predict at text position t (the budget slot predicts the first
    answer token, each answer token the next one), IGNORE elsewhere.
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


def sample_plan(rng: random.Random, num_layers: int, top_k: int, full_prob: float):
    """(tier, [(block, top_k), ...]) for one training batch (see module docstring)."""
    if rng.random() < full_prob:
        return "high", [(b, top_k) for b in range(num_layers)]
    tier = rng.choice(TIERS)
    p = rng.randint(1, min(5, num_layers))
    k = rng.randint(max(1, top_k - 4), top_k)
    dropped = set(rng.sample(range(p, num_layers), rng.randint(0, min(4, num_layers - p))))
    return tier, [(b, top_k if b < p else k) for b in range(num_layers) if b not in dropped]


def forward_text(model, images, ids, slot, budget, tier, plan):
    """Hidden states of the text part (batch, text_len, d_model) under `plan` (teacher forcing),
    and the vision tokens."""
    cfg = model.cfg
    vision = model.encode_images(*make_crops(images, tier, cfg))
    text = model.embed(ids)
    is_slot = torch.arange(ids.shape[1], device=ids.device)[None] == slot[:, None]
    text = torch.where(is_slot[..., None], model.embed_budget(budget)[:, None, :].to(text.dtype), text)
    hidden = torch.cat([vision, text], dim=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
    cos, sin = model.rope(positions, hidden)
    hidden = run_blocks(model, hidden, cos, sin, plan)
    return hidden[:, vision.shape[1] :], vision


def random_budget(batch: int, d_model: int, device, generator=None):
    scale = torch.rand(batch, 1, device=device, generator=generator) * BUDGET_SCALE_MAX
    return scale * torch.randn(batch, d_model, device=device, generator=generator)


def glyph_token_index(glyphs: torch.Tensor, tier: str, cfg: VLMConfig, image_size: int) -> torch.Tensor:
    """Index among the vision tokens of the grid-crop token that holds each glyph's centre.

    glyphs (batch, 3) = (class, x, y) in image pixels; the tier's grid tiles the image resized to
    grid * crop_size, each crop is (crop_size / (patch * pool))^2 tokens in row-major order.
    """
    grid, size = cfg.tier_grids[tier], cfg.crop_size
    token_px = cfg.patch_size * cfg.pool
    side = cfg.patches_per_side // cfg.pool
    scale = grid * size / image_size
    x = (glyphs[:, 1].float() * scale).long().clamp(0, grid * size - 1)
    y = (glyphs[:, 2].float() * scale).long().clamp(0, grid * size - 1)
    crop = 1 + (y // size) * grid + x // size  # crop 0 is the global view
    return crop * cfg.tokens_per_crop + (y % size // token_px) * side + x % size // token_px


def glyph_loss(glyph_head, vision, glyphs, tier, cfg):
    """Auxiliary pretraining loss: classify the glyph from the grid token that holds it.

    The answer alone gives the vision tower almost no signal to learn segment glyphs (whose ghost
    segments make lit and unlit strokes carry the same ink): the `detail` family stayed at chance
    over 2.5M samples. This direct target teaches the tower to read glyphs at the tiers whose
    grid crops can (not the global view, where the low tier is meant to fail).
    """
    has = glyphs[:, 0] >= 0
    if cfg.tier_grids[tier] == 0 or not bool(has.any()):
        return vision.new_zeros(())
    rows = has.nonzero().squeeze(1)
    index = glyph_token_index(glyphs[rows], tier, cfg, synthvqa.IMAGE_SIZE)
    logits = glyph_head(vision[rows, index].float())
    return F.cross_entropy(logits, glyphs[rows, 0])


def batch_loss(model, batch, tier, plan, device, generator=None, glyph_head=None, glyph_weight=1.0):
    """Answer cross-entropy (+ glyph_weight * glyph_loss when a glyph head is given)."""
    images, ids, labels, slot = (t.to(device, non_blocking=True) for t in batch[:4])
    budget = random_budget(ids.shape[0], model.cfg.d_model, device, generator)
    # bf16 matmuls on GPU (norms and softmax stay fp32 under autocast); CPU runs fp32.
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden, vision = forward_text(model, images, ids, slot, budget, tier, plan)
        logits = model.logits(hidden)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    if glyph_head is not None:
        loss = loss + glyph_weight * glyph_loss(glyph_head, vision, batch[6].to(device), tier, model.cfg)
    return loss


@torch.no_grad()
def greedy_answers(executor: Executor, tokenizer, batch, tier, plan, device, max_new_tokens: int):
    """Batched greedy answers through the executor (KV cache, the same plan for every step, like
    the backend); rows are grouped by prompt length so none is padded. Budget token: zeros."""
    model = executor.model
    images, ids, _, slot = (t.to(device) for t in batch[:4])
    vision = encode_vision(model, images, tier)
    budget = torch.zeros(ids.shape[0], model.cfg.d_model, device=device)
    answers = [None] * ids.shape[0]
    for length in sorted(set(slot.tolist())):
        rows = (slot == length).nonzero().squeeze(1)
        generated = executor.generate(vision[rows], ids[rows, :length], budget[rows], plan, max_new_tokens)
        for row, out in zip(rows.tolist(), generated):
            answers[row] = tokenizer.decode(out)
    return answers


def evaluate(model, tokenizer, batches, samples, configs, importance, device, max_new_tokens=2):
    """{config name: {"overall": acc, family: acc, ..., "config": knobs}} over `batches` of `samples`."""
    cfg = model.cfg
    results = {}
    model.eval()
    # Eager decoding: evaluation batches vary in size, so per-batch CUDA graphs would not be reused.
    executor = Executor(model, tokenizer.eos_id, mode="eager")
    for name, (tier, p, k, n) in configs.items():
        plan = block_plan(importance, p, k, n, cfg.num_layers, cfg.top_k)
        correct = {f: [0, 0] for f in synthvqa.FAMILIES}
        for batch in batches:
            answers = greedy_answers(executor, tokenizer, batch, tier, plan, device, max_new_tokens)
            for answer, index in zip(answers, batch[5].tolist()):
                sample = samples[index]
                correct[sample.family][0] += score_answer(answer, sample)
                correct[sample.family][1] += 1
        total = [sum(c[0] for c in correct.values()), sum(c[1] for c in correct.values())]
        results[name] = {"overall": total[0] / total[1], **{f: c[0] / max(c[1], 1) for f, c in correct.items()}}
        results[name]["config"] = {"tier": tier, "insertion": p, "top_k": k, "num_blocks": n}
    return results


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


def knob_grid(cfg: VLMConfig) -> dict[str, tuple[str, int, int, int]]:
    """Full config, each knob alone at each of its values (p = 1: top-k acts on blocks 1..L-1),
    and the cheapest config."""
    L, K = cfg.num_layers, cfg.top_k
    grid = {"full": ("high", 1, K, L)}
    for tier in TIERS[:-1]:
        grid[f"tier={tier}"] = (tier, 1, K, L)
    for k in range(max(1, K - 4), K):
        grid[f"top_k={k}"] = ("high", 1, k, L)
    for n in range(max(1, L - 4), L):
        grid[f"blocks={n}"] = ("high", 1, K, n)
    grid["cheapest"] = ("low", 1, max(1, K - 4), max(1, L - 4))
    return grid


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1): NCCL with one GPU per process
    (gloo on CPU, for smoke runs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    if torch.device(device).type == "cpu":
        dist.init_process_group("gloo")
        return dist.get_rank(), world, torch.device("cpu")
    dist.init_process_group("nccl")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    return dist.get_rank(), world, torch.device("cuda", local)


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """All-reduce the mean gradient in one flat buffer. Every rank draws the same knob plan
    (same plan RNG seed), so the same parameters have gradients on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="model dir to write (config, weights, tokenizer, importance)")
    ap.add_argument("--preset", default="molmoe-tiny", choices=sorted(PRESETS))
    ap.add_argument("--init", help="start from this model dir instead of random weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--time-limit-min", type=float, default=None, help="stop training after this many minutes")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--full-prob", type=float, default=0.3)
    ap.add_argument("--glyph-weight", type=float, default=1.0,
                    help="weight of the auxiliary glyph-reading loss (glyph_loss); 0 turns it off")
    ap.add_argument("--family-weights", default="", help="train family mix, e.g. coarse=1,detail=2,reasoning=1.5")
    ap.add_argument("--train-samples", type=int, default=5_000_000, help="size of the (lazy) train split")
    ap.add_argument("--val-samples", type=int, default=1024)
    ap.add_argument("--eval-samples", type=int, default=1200)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)

    resolve_device(args.device, "--device")  # a clear error before anything is built or written
    rank, world, device = init_distributed(args.device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.init:
        model, tokenizer = load_model(args.init, device)
    else:
        tokenizer = WordTokenizer.build(synthvqa.vocabulary())
        cfg = VLMConfig(
            vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
            **PRESETS[args.preset],
        )
        model = build_model(cfg, seed=args.seed).to(device)
    cfg = model.cfg
    if rank == 0:
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {cfg}; "
              f"{world} process(es) x batch {args.batch_size}", flush=True)

    train_weights = {k: float(v) for k, v in (kv.split("=") for kv in args.family_weights.split(",") if kv)} or None

    def loader(split, n, shuffle, batch_size):
        # Only the train split gets the family mix; val/test keep equal thirds.
        data = synthvqa.SynthVQA(split, n, seed=args.seed, family_weights=train_weights if shuffle else None)
        return data, DataLoader(
            EncodedSynthVQA(data, tokenizer), batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
            num_workers=args.workers, collate_fn=functools.partial(collate, pad_id=tokenizer.pad_id),
            pin_memory=device.type == "cuda", persistent_workers=args.workers > 0 and shuffle,
            # fork: workers start in seconds (spawn re-imports torch, transformers, torchrl in each)
            multiprocessing_context="fork" if args.workers > 0 else None,
            prefetch_factor=4 if args.workers > 0 else None,
            generator=torch.Generator().manual_seed(args.seed * 1000 + rank),  # each rank its own order
        )

    _, train_loader = loader("train", args.train_samples, True, args.batch_size)

    # Pretraining-only head (not saved): reads the glyph class off its vision token.
    glyph_head = torch.nn.Linear(cfg.d_model, len(GLYPH_CLASSES)).to(device) if args.glyph_weight > 0 else None
    params = list(model.parameters()) + (list(glyph_head.parameters()) if glyph_head is not None else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    start, step, running, data_wait = time.time(), 0, [], 0.0

    def progress(step):
        """Fraction of training done: by steps, or by time when a time limit is set and binds first.
        Rank 0's clock decides for every rank, so all stop at the same step with the same lr."""
        done = step / args.steps
        if args.time_limit_min:
            done = max(done, (time.time() - start) / 60 / args.time_limit_min)
        done = min(done, 1.0)
        if world == 1:
            return done
        shared = torch.tensor(done, device=device)
        dist.broadcast(shared, 0)
        return float(shared)

    done = 0.0
    # Linear warmup, then cosine decay to 10% over the progress fraction.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))
    )
    rng = random.Random(args.seed)
    model.train()
    while step < args.steps:
        fetched = time.time()
        for batch in train_loader:
            data_wait += time.time() - fetched
            tier, plan = sample_plan(rng, cfg.num_layers, cfg.top_k, args.full_prob)
            loss = batch_loss(model, batch, tier, plan, device, glyph_head=glyph_head, glyph_weight=args.glyph_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                average_gradients(params, world)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            done = progress(step)
            schedule.step()
            running.append(loss.item())
            if step % args.log_every == 0 and rank == 0:
                print(f"step {step} loss {sum(running) / len(running):.4f} lr {schedule.get_last_lr()[0]:.2e} "
                      f"{(time.time() - start) / 60:.1f} min (waited {data_wait:.0f} s for data)", flush=True)
                running = []
            if done >= 1.0:
                break
            fetched = time.time()
        if done >= 1.0:
            break
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return None
    print(f"trained {step} steps in {(time.time() - start) / 60:.1f} min", flush=True)

    out = Path(args.out)
    model.save(out, tokenizer)
    model.eval()
    # Rendered once, reused by every plan below.
    _, val_loader = loader("val", args.val_samples, False, 256)
    test_data, test_loader = loader("test", args.eval_samples, False, 256)
    val_batches, test_batches = list(val_loader), list(test_loader)
    test_samples = [test_data[i] for i in range(len(test_data))]
    importance = drop_importance(model, val_batches, device, args.seed)
    (out / "importance.json").write_text(json.dumps(
        {"method": "drop_loss", "scores": {str(b): s for b, s in importance.items()},
         "note": "validation loss increase when the block alone is skipped (pretrain_vlm.py)"}, indent=2) + "\n")
    print("importance:", {b: round(s, 4) for b, s in importance.items()}, flush=True)
    results = evaluate(model, tokenizer, test_batches, test_samples, knob_grid(cfg), importance, device)
    summary = {"steps": step, "train_minutes": (time.time() - start) / 60, "args": vars(args), "accuracy": results}
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:12s} " + " ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "config"), flush=True)
    return summary


if __name__ == "__main__":
    main()
