"""Molmo's image preprocessing: tiling rule, overlapping crops, image-token layout.

One image at a crop budget `max_crops` becomes (as the reference processor makes it):
  * a global crop: the whole image resized into one crop (aspect kept, centred, zero padding
    before normalising);
  * a rows x cols grid of overlapping crops (`select_tiling`) over the image resized to
    rows * W + M by cols * W + M pixels, where W is a crop's window (crop minus both margins) and
    M the two margins: neighbouring crops overlap by the margins, and each crop's features in the
    overlap are dropped (image_input_idx -100) so every image region enters the sequence once;
  * image tokens: <im_start> (12 x (12 x <im_patch>, <im_col>)) <im_end> for the global crop, then
    <im_start> (R x (C x <im_patch>, <im_col>)) <im_end> for the grid, R, C = the grid's pooled
    patch rows and columns;
  * image_masks: share of real (non-padding) pixels per patch, reproducing the reference's quirk:
    the rows belong to the grid crops only and a row of -1 is appended at the end, so row k goes
    with crop k although crop 0 is the global crop (the published weights were trained so).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from envs.backends.molmoe.config import MolmoEConfig


@dataclass
class MolmoEInputs:
    """Processor output for one image and prompt (batch 1)."""

    input_ids: torch.Tensor  # (T,) int64
    images: torch.Tensor  # (K, patches per crop, patch_size**2 * 3) float32, crop 0 = global
    image_masks: torch.Tensor  # (K, patches per crop) float32 (the reference's row order)
    image_input_idx: torch.Tensor  # (K, tokens per crop) int64: position in input_ids, -100 = dropped
    grid: tuple[int, int]  # (rows, cols) of the tiled crops

    @property
    def num_crops(self) -> int:
        return self.images.shape[0]

    @property
    def vision_tokens(self) -> int:
        """Positions that receive an image feature (the <im_patch> tokens)."""
        return int((self.image_input_idx >= 0).sum())


def select_tiling(height: float, width: float, window: int, max_crops: int) -> tuple[int, int]:
    """Molmo's tiling rule: the (rows, cols) grid with rows * cols <= max_crops whose windows fit
    the image with the least upscaling, or, when every grid needs downscaling, the least
    downscaling; ties go to fewer crops, then fewer rows."""
    if max_crops < 1:
        raise ValueError(f"max_crops={max_crops}: expected >= 1")
    tilings = sorted(
        ((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops),
        key=lambda t: (t[0] * t[1], t[0]),
    )
    size = np.array([height, width], dtype=np.float32)
    scales = (np.array(tilings, dtype=np.float32) * window / size).min(axis=1)
    if np.all(scales < 1):
        index = int(np.argmax(scales))
    else:
        index = int(np.argmin(np.where(scales < 1.0, np.float32(1e10), scales)))
    return tilings[index]


def resize_and_pad(image: torch.Tensor, height: int, width: int, cfg: MolmoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (3, H, W) -> normalised float32 (height, width, 3) and its bool real-pixel mask.

    Aspect kept (scale computed in float32 like the reference), bilinear with antialiasing,
    centred, zero padding applied before normalising.
    """
    h, w = image.shape[-2:]
    scale = min(np.float32(height) / np.float32(h), np.float32(width) / np.float32(w))
    new_h, new_w = int(np.float32(h) * scale), int(np.float32(w) * scale)
    pixels = image.float().div(255.0)[None]
    if (new_h, new_w) != (h, w):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    pixels = pixels.clamp(0.0, 1.0)[0]
    top, left = (height - new_h) // 2, (width - new_w) // 2
    padding = (left, width - new_w - left, top, height - new_h - top)
    pixels = F.pad(pixels, padding)
    mask = F.pad(torch.ones(new_h, new_w, dtype=torch.bool), padding)
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(cfg.image_std).view(3, 1, 1)
    return ((pixels - mean) / std).permute(1, 2, 0), mask


def _to_patches(crop: torch.Tensor, patch: int) -> torch.Tensor:
    """(S, S, ...) -> (patches row-major, patch*patch*...) flattened as (dy, dx, ...)."""
    side = crop.shape[0] // patch
    rest = crop.shape[2:]
    grid = crop.reshape(side, patch, side, patch, *rest).transpose(1, 2)
    return grid.reshape(side * side, -1)


@dataclass(frozen=True)
class ImageTokenIds:
    start: int
    end: int
    patch: int
    col: int


def image_tokens_and_crops(image: torch.Tensor, max_crops: int, cfg: MolmoEConfig, ids: ImageTokenIds):
    """(crops (K, N, D), masks (K, N), image token ids (n,), per-crop token rank (K, 144) or -1, grid)."""
    patch, crop_px = cfg.image_patch_size, cfg.crop_size
    side = cfg.patches_per_side
    left, right = cfg.overlap_margins
    window_patches = side - left - right
    window_px, margin_px = window_patches * patch, (left + right) * patch
    h, w = image.shape[-2:]
    rows, cols = select_tiling(h - margin_px, w - margin_px, window_px, max_crops)
    src, mask = resize_and_pad(image, rows * window_px + margin_px, cols * window_px + margin_px, cfg)

    pooled = cfg.image_token_length_h  # pooled cells per crop side
    # Kept pooled cells of each crop: the first row/column of crops keep their leading margin,
    # the last keep their trailing one, every crop drops the half-margins it shares.
    def kept(index: int, count: int) -> tuple[int, int]:
        first = 0 if index == 0 else left // 2
        length = window_patches + (left if index == 0 else 0) + (right if index == count - 1 else 0)
        return first, (length + 1) // 2

    row_spans = [kept(i, rows) for i in range(rows)]
    col_spans = [kept(j, cols) for j in range(cols)]
    grid_w = sum(n for _, n in col_spans)  # pooled columns of the tiled image
    grid_h = sum(n for _, n in row_spans)
    crops, masks, ranks = [], [], []
    row0 = 0
    for i, (y_first, y_len) in enumerate(row_spans):
        col0 = 0
        for j, (x_first, x_len) in enumerate(col_spans):
            y, x = i * window_px, j * window_px
            crops.append(_to_patches(src[y : y + crop_px, x : x + crop_px], patch))
            masks.append(_to_patches(mask[y : y + crop_px, x : x + crop_px], patch).float().mean(-1))
            # rank of each kept cell in the tiled image's row-major pooled grid
            rank = torch.full((pooled, pooled), -1, dtype=torch.long)
            yy = torch.arange(y_len)[:, None] + row0
            xx = torch.arange(x_len)[None, :] + col0
            rank[y_first : y_first + y_len, x_first : x_first + x_len] = yy * grid_w + xx
            ranks.append(rank.reshape(-1))
            col0 += x_len
        row0 += y_len
    global_crop, _ = resize_and_pad(image, crop_px, crop_px, cfg)
    crops.insert(0, _to_patches(global_crop, patch))
    tokens_per_crop = pooled * pooled
    ranks = [torch.arange(tokens_per_crop)] + [torch.where(r >= 0, r + tokens_per_crop, r) for r in ranks]

    def layout(height: int, width: int) -> list[int]:
        return [ids.start] + ([ids.patch] * width + [ids.col]) * height + [ids.end]

    tokens = layout(pooled, pooled) + layout(grid_h, grid_w)
    # The reference's mask rows: grid crops only, then a -1 row (see the module docstring).
    image_masks = torch.cat([torch.stack(masks), torch.full((1, side * side), -1.0)])
    return torch.stack(crops), image_masks, torch.tensor(tokens, dtype=torch.long), torch.stack(ranks), (rows, cols)


def preprocess(image: torch.Tensor, text_ids: list[int], bos_id: int, max_crops: int, cfg: MolmoEConfig,
               ids: ImageTokenIds) -> MolmoEInputs:
    """[bos] + image tokens + text_ids, with the crops and where each crop's features go."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    crops, masks, image_tokens, ranks, grid = image_tokens_and_crops(image, max_crops, cfg, ids)
    input_ids = torch.cat([torch.tensor([bos_id]), image_tokens, torch.tensor(text_ids, dtype=torch.long)])
    patch_positions = torch.nonzero(input_ids == ids.patch)[:, 0]
    safe = ranks.clamp(min=0)
    image_input_idx = torch.where(ranks >= 0, patch_positions[safe], torch.full_like(ranks, -100))
    return MolmoEInputs(input_ids, crops.float(), masks, image_input_idx, grid)
