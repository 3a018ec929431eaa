"""Molmo-style multi-crop preprocessing: a global view plus a per-image grid of crops, per tier.

A tier is a crop budget (Molmo's `max_crops`, VLMConfig.tier_max_crops): the image gets a global
view (resized into one crop with its aspect kept) and, unless the budget is 0, a rows x cols tiling
with rows * cols <= budget chosen by Molmo's rule (`select_tiling`): among all such grids the one
that needs the least upscaling, or, when every grid needs downscaling, the least downscaling. The
image is resized (aspect kept, centred, padded) to rows*crop x cols*crop and cut into cells. So the
number of vision tokens follows the image's size within a tier, as on MolmoE-1B. Unlike Molmo the
cells do not overlap (the embedded model has no overlap margins). The batched tensor path is shared
with pretraining: one call takes images of one size, which share one tiling.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from envs.backends.vlm.config import CLIP_MEAN, CLIP_STD, VLMConfig


def image_to_tensor(image: Image.Image, what: str = "image") -> torch.Tensor:
    """A PIL image -> (3, H, W) uint8 tensor. Grayscale, palette and RGBA images are converted to
    RGB as Molmo does."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what}: expected a PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def check_tier(cfg: VLMConfig, tier: str) -> str:
    if tier not in cfg.tier_max_crops:
        raise ValueError(f"tier={tier!r} is not known; expected one of {cfg.tiers}")
    return tier


def select_tiling(height: int, width: int, crop_size: int, max_crops: int) -> tuple[int, int]:
    """Molmo's grid choice: (rows, cols) with rows * cols <= max_crops for an image of this size.

    Candidates are ordered by (crops, rows); each needs scale min(rows*S/H, cols*S/W) to fit the
    image. If some candidate needs no downscaling, take the one needing the least upscaling;
    otherwise the one needing the least downscaling (the first such candidate on ties).
    """
    if max_crops < 1:
        raise ValueError(f"max_crops={max_crops}: expected >= 1 for a tiling")
    candidates = sorted(((r, c) for r in range(1, max_crops + 1) for c in range(1, max_crops + 1) if r * c <= max_crops),
                        key=lambda rc: (rc[0] * rc[1], rc[0]))
    scales = [min(r * crop_size / height, c * crop_size / width) for r, c in candidates]
    if all(s < 1 for s in scales):
        best = max(range(len(scales)), key=lambda i: (scales[i], -i))
    else:
        best = min((i for i, s in enumerate(scales) if s >= 1), key=lambda i: (scales[i], i))
    return candidates[best]


class Tiling(NamedTuple):
    """Where an image of (height, width) goes at one tier: the grid, and the resize into it."""

    rows: int  # 0 x 0 = global view only
    cols: int
    scale: float  # image px -> tiled-canvas px
    pad_top: int
    pad_left: int

    @property
    def num_crops(self) -> int:
        return 1 + self.rows * self.cols


def tiling(height: int, width: int, tier: str, cfg: VLMConfig) -> Tiling:
    check_tier(cfg, tier)
    budget = cfg.tier_max_crops[tier]
    if budget == 0:
        return Tiling(0, 0, 0.0, 0, 0)
    rows, cols = select_tiling(height, width, cfg.crop_size, budget)
    scale, (h, w) = _fit(height, width, rows * cfg.crop_size, cols * cfg.crop_size)
    return Tiling(rows, cols, scale, (rows * cfg.crop_size - h) // 2, (cols * cfg.crop_size - w) // 2)


def num_vision_tokens(height: int, width: int, tier: str, cfg: VLMConfig) -> int:
    """Vision tokens of an image of this size at `tier` (global view + its grid's cells)."""
    return tiling(height, width, tier, cfg).num_crops * cfg.tokens_per_crop


def make_crops(images: torch.Tensor, tier: str, cfg: VLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 or [0,1] float images (batch, 3, H, W), all of one size -> (normalised crops
    (batch, crops, 3, S, S), slot index of each crop (crops,)). The number of crops depends on the
    tier and on the image size: never assume it per tier."""
    check_tier(cfg, tier)
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    images = (images - mean) / std  # normalise first, so padding (zeros) is the mean colour
    size = cfg.crop_size
    views = [_resize_and_pad(images, size, size)[:, None]]
    tile = tiling(images.shape[-2], images.shape[-1], tier, cfg)
    if tile.rows:
        canvas = _resize_and_pad(images, tile.rows * size, tile.cols * size)
        batch = canvas.shape[0]
        # (batch, 3, rows*S, cols*S) -> (batch, rows*cols, 3, S, S), row-major cells
        cells = canvas.reshape(batch, 3, tile.rows, size, tile.cols, size).permute(0, 2, 4, 1, 3, 5)
        views.append(cells.reshape(batch, tile.rows * tile.cols, 3, size, size))
    slots = [0] + [1 + r * cfg.max_grid_side + c for r in range(tile.rows) for c in range(tile.cols)]
    return torch.cat(views, dim=1), torch.tensor(slots, dtype=torch.long, device=images.device)


def _fit(height: int, width: int, target_h: int, target_w: int) -> tuple[float, tuple[int, int]]:
    """Scale and size (>= 1 px per side) of an image resized into the target with its aspect kept."""
    scale = min(target_h / height, target_w / width)
    return scale, (max(1, min(target_h, round(height * scale))), max(1, min(target_w, round(width * scale))))


def _resize_and_pad(images: torch.Tensor, target_h: int, target_w: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    _, (h, w) = _fit(height, width, target_h, target_w)
    if (h, w) != (height, width):
        images = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    if (h, w) == (target_h, target_w):
        return images
    top, left = (target_h - h) // 2, (target_w - w) // 2
    return F.pad(images, (left, target_w - w - left, top, target_h - h - top))
