"""runners/pretrain_vlm.py end to end on the tiny preset: trains, writes a model dir VLMBackend loads."""
import json
import random

import torch

from envs.backends.vlm import VLMBackend
from helpers import load_runner

pretrain = load_runner("pretrain_vlm")


def test_sample_plan_respects_the_knob_rules():
    rng = random.Random(0)
    for _ in range(200):
        tier, plan = pretrain.sample_plan(rng, 16, 8, full_prob=0.3)
        blocks = [b for b, _ in plan]
        assert tier in ("low", "medium", "high") and blocks == sorted(blocks)
        assert 12 <= len(blocks) <= 16 and blocks[0] == 0  # up to 4 non-first blocks dropped
        ks = [k for _, k in plan]
        assert ks[0] == 8 and all(4 <= k <= 8 for k in ks)
        p = next((i for i, (b, k) in enumerate(plan) if k != 8), len(plan))
        assert all(k == ks[-1] for k in ks[p:])  # one top-k after the insertion point


def test_collate_labels_predict_answer_from_the_budget_slot():
    items = [(torch.zeros(3, 4, 4, dtype=torch.uint8), [5, 6, 7], [9, 2], 0, 0, (-1, 0, 0)),
             (torch.zeros(3, 4, 4, dtype=torch.uint8), [5], [8, 2], 1, 1, (3, 10, 20))]
    _, ids, labels, slot, families, indices, glyphs = pretrain.collate(items, pad_id=0)
    assert slot.tolist() == [3, 1]
    assert ids[0].tolist() == [5, 6, 7, 0, 9, 2] and labels[0].tolist() == [-100, -100, -100, 9, 2, -100]
    assert ids[1].tolist()[:4] == [5, 0, 8, 2] and labels[1].tolist()[:3] == [-100, 8, 2]
    assert families.tolist() == [0, 1] and indices.tolist() == [0, 1]
    assert glyphs.tolist() == [[-1, 0, 0], [3, 10, 20]]


def test_glyph_token_is_the_grid_token_under_the_glyph():
    """The auxiliary glyph target sits on the vision token whose pixels hold the glyph's centre."""
    from envs.backends.vlm import VLMConfig, make_crops

    cfg = VLMConfig(vocab_size=8, pad_token_id=0, eos_token_id=1)  # 64-px crops, 16-px tokens
    images = torch.zeros(2, 3, 192, 192, dtype=torch.uint8)
    glyphs = torch.tensor([[0, 100, 30], [1, 5, 190]])
    for tier in ("medium", "high"):
        crops = make_crops(images.clone().index_put_((torch.tensor([0, 1]), torch.tensor([0, 0]),
                                                      glyphs[:, 2], glyphs[:, 1]), torch.tensor(255, dtype=torch.uint8)),
                           tier, cfg)[0]
        index = pretrain.glyph_token_index(glyphs, tier, cfg, 192)
        changed = (crops - make_crops(images, tier, cfg)[0]).abs()[:, :, 0]  # (batch, crops, S, S)
        for row in range(2):
            crop, token = divmod(int(index[row]), cfg.tokens_per_crop)
            assert crop > 0 and changed[row, crop].sum() > 0  # a grid crop, and it sees the glyph
            ty, tx = divmod(token, 4)
            assert changed[row, crop, ty * 16 : ty * 16 + 16, tx * 16 : tx * 16 + 16].sum() > 0


def test_pretrain_runs_on_cpu_and_writes_a_loadable_model(tmp_path):
    out = tmp_path / "model"
    summary = pretrain.main([
        "--out", str(out), "--preset", "test", "--device", "cpu", "--steps", "2", "--batch-size", "4",
        "--val-samples", "6", "--eval-samples", "6", "--workers", "0", "--warmup", "1",
    ])
    assert summary["steps"] == 2 and "full" in summary["accuracy"]
    importance = json.loads((out / "importance.json").read_text())
    assert importance["method"] == "drop_loss" and len(importance["scores"]) == 6
    backend = VLMBackend(model_path=out, budget_range_ms=[1, 2], num_samples=2)
    ep = backend.start_episode(backend.dataset("test")[0], "low", torch.zeros(backend.d_model))
    backend.run_to(ep, 1)
    assert backend.finish(ep, 4, 6).timings_ms["prefill"] > 0
