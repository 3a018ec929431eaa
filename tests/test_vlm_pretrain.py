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
    items = [(torch.zeros(3, 4, 4, dtype=torch.uint8), [5, 6, 7], [9, 2], 0, 0),
             (torch.zeros(3, 4, 4, dtype=torch.uint8), [5], [8, 2], 1, 1)]
    _, ids, labels, slot, families, indices = pretrain.collate(items, pad_id=0)
    assert slot.tolist() == [3, 1]
    assert ids[0].tolist() == [5, 6, 7, 0, 9, 2] and labels[0].tolist() == [-100, -100, -100, 9, 2, -100]
    assert ids[1].tolist()[:4] == [5, 0, 8, 2] and labels[1].tolist()[:3] == [-100, 8, 2]
    assert families.tolist() == [0, 1] and indices.tolist() == [0, 1]


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
