"""Molmo-style multi-crop preprocessing: a global view plus a grid of crops, per tier.

low    = global view only                (1 crop)
medium = global + 2x2 grid of the image  (5 crops)
high   = global + 3x3 grid               (10 crops)
(the grids come from VLMConfig.tier_grids). The global view is the whole image resized to one
crop; a g x g grid tiles the image resized to g*crop_size, so on SynthVQA's 192x192 images the
3x3 grid is the native resolution. The batched tensor path is shared with pretraining.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from envs.backends.vlm.config import CLIP_MEAN, CLIP_STD, VLMConfig


def image_to_tensor(image: Image.Image, what: str = "image") -> torch.Tensor:
    """An RGB PIL image -> (3, H, W) uint8 tensor; any other mode is an error (no silent conversion)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what}: expected a PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"{what}: image mode is {image.mode!r}, expected 'RGB'")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def check_tier(cfg: VLMConfig, tier: str) -> str:
    if tier not in cfg.tier_grids:
        raise ValueError(f"tier={tier!r} is not known; expected one of {tuple(cfg.tier_grids)}")
    return tier


def make_crops(images: torch.Tensor, tier: str, cfg: VLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 or [0,1] float images (batch, 3, H, W), all of one size -> (normalised crops
    (batch, crops, 3, S, S), slot index of each crop (crops,)). The number of crops depends on the
    tier and may depend on the image size: never assume it per tier."""
    check_tier(cfg, tier)
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    size, grid = cfg.crop_size, cfg.tier_grids[tier]
    views = [_resize(images, size)[:, None]]
    if grid:
        tiled = _resize(images, grid * size)
        batch = tiled.shape[0]
        # (batch, 3, grid*S, grid*S) -> (batch, grid*grid, 3, S, S), row-major cells
        cells = tiled.reshape(batch, 3, grid, size, grid, size).permute(0, 2, 4, 1, 3, 5)
        views.append(cells.reshape(batch, grid * grid, 3, size, size))
    crops = torch.cat(views, dim=1)
    mean = torch.tensor(CLIP_MEAN, device=crops.device, dtype=crops.dtype).view(1, 1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=crops.device, dtype=crops.dtype).view(1, 1, 3, 1, 1)
    return (crops - mean) / std, _crop_slots(tier, cfg, crops.device)


def _crop_slots(tier: str, cfg: VLMConfig, device: str | torch.device = "cpu") -> torch.Tensor:
    """Slot index of each crop of `tier` (0 = global view, then this grid's cells)."""
    check_tier(cfg, tier)
    cells = cfg.tier_grids[tier] ** 2
    offset = cfg.crop_slot_offset(tier)
    return torch.tensor([0, *range(offset, offset + cells)], dtype=torch.long, device=device)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
