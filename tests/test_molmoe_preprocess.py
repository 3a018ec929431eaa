"""Molmo's processor against the reference's outputs: tiling, token layout, image tensors, masks."""
import pytest
import torch

from envs.backends.molmoe import MolmoEConfig, MolmoETokenizer, chat_prompt, preprocess, select_tiling
from molmoe_fixture import FIXTURE, cases, image_tensor, requires_fixture, tensors

pytestmark = requires_fixture


@pytest.fixture(scope="module")
def cfg():
    return MolmoEConfig.load(FIXTURE)


@pytest.fixture(scope="module")
def tokenizer():
    return MolmoETokenizer.load(FIXTURE)


def run(case, cfg, tokenizer):
    ids = tokenizer.encode(chat_prompt(case["prompt"]))
    return preprocess(image_tensor(case), ids, tokenizer.bos_id, case["max_crops"], cfg, tokenizer.image_ids)


@pytest.mark.parametrize("case", cases(), ids=lambda c: c["id"])
def test_processor_matches_reference(case, cfg, tokenizer):
    ref = tensors()
    inputs = run(case, cfg, tokenizer)
    name = case["id"]
    assert list(inputs.grid) == case["crop_grid_rows_cols"]
    assert inputs.num_crops == case["n_crops"]
    assert torch.equal(inputs.input_ids, ref[f"{name}.input_ids"])
    assert torch.equal(inputs.image_input_idx, ref[f"{name}.image_input_idx"].long())
    assert inputs.vision_tokens == case["n_image_patch_tokens"] == int((inputs.input_ids == 50282).sum())
    torch.testing.assert_close(inputs.image_masks, ref[f"{name}.image_masks"], atol=0, rtol=0)
    torch.testing.assert_close(inputs.images.double().sum(-1).float(), ref[f"{name}.images_patch_sum"], atol=1e-4, rtol=0)
    torch.testing.assert_close(inputs.images.reshape(-1)[::1009], ref[f"{name}.images_sample"], atol=1e-5, rtol=0)


def test_mask_rows_keep_the_reference_shift(cfg, tokenizer):
    """Row k of image_masks is grid crop k's mask (not crop k's); the last row is all -1."""
    inputs = run(cases()[0], cfg, tokenizer)
    assert torch.all(inputs.image_masks[-1] == -1)
    assert torch.all(inputs.image_masks[:-1] >= 0)


def test_token_layout(cfg, tokenizer):
    """<im_start> 12 x (12 patches, col) <im_end>, then R x (C patches, col) for the 2x3 grid (R=20, C=28)."""
    inputs = run(cases()[0], cfg, tokenizer)
    ids = tokenizer.image_ids
    seq = inputs.input_ids.tolist()
    assert seq[0] == tokenizer.bos_id and seq[1] == ids.start and seq[158] == ids.end
    assert seq[2:15] == [ids.patch] * 12 + [ids.col]
    tiled = seq[159 : 159 + 2 + 20 * 29]
    assert tiled[0] == ids.start and tiled[-1] == ids.end
    assert tiled[1:30] == [ids.patch] * 28 + [ids.col]


@pytest.mark.parametrize("hw, max_crops, expected", [
    ((368, 528), 12, (2, 3)),   # landscape 480x640 minus margins: the least upscaling grid
    ((1288, 288), 12, (6, 2)),  # tall portrait: downscaling forced, least of it
    ((88, 88), 12, (1, 1)),     # small: one crop
    ((368, 528), 1, (1, 1)),
    ((1288, 288), 4, (4, 1)),
])
def test_select_tiling(hw, max_crops, expected):
    assert select_tiling(*hw, 224, max_crops) == expected


def test_bad_image_is_named(cfg, tokenizer):
    with pytest.raises(ValueError, match=r"image: expected a uint8 \(3, H, W\) tensor"):
        preprocess(torch.zeros(3, 10, 10), [1], tokenizer.bos_id, 4, cfg, tokenizer.image_ids)
    with pytest.raises(ValueError, match="max_crops=0"):
        preprocess(torch.zeros(3, 400, 400, dtype=torch.uint8), [1], tokenizer.bos_id, 0, cfg, tokenizer.image_ids)
