"""runners/pretrain_vlm.py end to end on the tiny preset: trains, writes a model dir VLMBackend loads."""
import itertools
import json

import pytest
import torch

from envs.backends.vlm import VLMBackend
from helpers import load_runner, tiny_model

pretrain = load_runner("pretrain_vlm")


def test_row_plans_follow_the_per_family_knob_rules():
    gen = torch.Generator().manual_seed(0)
    families = torch.arange(3).repeat(200)  # coarse, detail, reasoning
    elastic = torch.tensor([True, True, False])
    plan = pretrain.sample_row_plans(gen, families, elastic, elastic, 16, 8, full_prob=0.3)
    assert plan.top_k.shape == plan.keep.shape == (600, 16)
    reasoning = families == 2
    assert (plan.top_k[reasoning] == 8).all() and plan.keep[reasoning].all()  # full decoder only
    rows = ~reasoning
    kept = plan.keep[rows].sum(1)
    assert ((12 <= kept) & (kept <= 16)).all() and plan.keep[:, 0].all() and (plan.top_k[:, 0] == 8).all()
    for ks, keep in zip(plan.top_k[rows].tolist(), plan.keep[rows].tolist()):
        p = next((b for b, k in enumerate(ks) if k != 8), None)
        if p is not None:  # one top-k from the insertion point on, nothing dropped before it
            assert 1 <= p <= 5 and all(k == ks[p] for k in ks[p:]) and 4 <= ks[p] <= 7 and all(keep[:p])
    reduced = ((plan.top_k[rows] != 8).any(1) | ~plan.keep[rows].all(1)).float().mean()
    assert 0.5 < reduced < 0.8  # 1 - full_prob, less the draws that happen to be full


def test_a_family_elastic_in_one_knob_keeps_the_other_at_full():
    elastic = pretrain.parse_elastic_families("coarse,detail:top_k,reasoning:blocks")
    assert elastic == {"coarse": {"top_k", "blocks"}, "detail": {"top_k"}, "reasoning": {"blocks"}}
    from envs.data import synthvqa

    top_k, blocks = (torch.tensor([knob in elastic.get(f, ()) for f in synthvqa.FAMILIES])
                     for knob in pretrain.ELASTIC_KNOBS)
    families = torch.arange(4).repeat(300)  # coarse, detail, reasoning, knowledge
    plan = pretrain.sample_row_plans(torch.Generator().manual_seed(1), families, top_k, blocks, 16, 8, 0.3)
    fewer_k, dropped = (plan.top_k < 8).any(1), ~plan.keep.all(1)
    by_family = [(fewer_k[families == f].float().mean(), dropped[families == f].float().mean()) for f in range(4)]
    assert by_family[0][0] > 0.4 and by_family[0][1] > 0.4  # both knobs
    assert by_family[1][0] > 0.4 and by_family[1][1] == 0  # top-k only
    assert by_family[2][0] == 0 and by_family[2][1] > 0.4  # blocks only
    assert by_family[3] == (0, 0)  # not listed: full decoder only


@pytest.mark.parametrize("text, match", [
    ("coarse,physics", "unknown family 'physics'"),
    ("detail:experts", r"'detail:experts' has knobs \['experts'\]"),
    ("detail:", "'detail:' has knobs"),
])
def test_bad_elastic_families_name_the_item(text, match):
    with pytest.raises(ValueError, match=match):
        pretrain.parse_elastic_families(text)


def test_router_focus_loss_is_zero_only_when_the_mass_sits_evenly_on_top_k():
    weight = torch.eye(4)  # 4 experts reading the first 4 features
    uniform = pretrain.router_focus_loss([torch.zeros(5, 4)], [weight], top_k=2)
    assert torch.isclose(uniform, torch.tensor(2.0).log())  # mass 1/4 each: KL(U_2 || U_4) = log 2
    focused = pretrain.router_focus_loss([torch.tensor([[30.0, 30.0, 0.0, 0.0]])], [weight], top_k=2)
    assert focused.abs() < 1e-6
    peaked = pretrain.router_focus_loss([torch.tensor([[30.0, 0.0, 0.0, 0.0]])], [weight], top_k=2)
    assert peaked > 10  # all mass on one expert: the second of the top 2 is starved
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    router = torch.nn.Parameter(torch.randn(4, 4, generator=generator))
    optimizer = torch.optim.SGD([router], lr=0.5)
    start = pretrain.router_focus_loss([x], [router], 2).item()
    for _ in range(200):
        optimizer.zero_grad()
        pretrain.router_focus_loss([x], [router], 2).backward()
        optimizer.step()
    assert pretrain.router_focus_loss([x], [router], 2).item() < 0.5 * start  # gradient descent focuses it


def test_pretrain_loss_adds_the_router_focus_of_every_block():
    from envs.data import synthvqa

    model, tokenizer = tiny_model()
    data = synthvqa.SynthVQA("train", 32, seed=0)
    encoded = pretrain.EncodedSynthVQA(data, tokenizer)
    batch = pretrain.collate([encoded[i] for i in pretrain.size_batches(data.size_index, 4)[0]], tokenizer.pad_id)
    plan = pretrain.full_plan(model.cfg.num_layers, model.cfg.top_k)
    plain, none = pretrain.PretrainLoss(model, None, 0.0)(batch, "low", plan, torch.device("cpu"),
                                                          torch.Generator().manual_seed(0))
    objective = pretrain.PretrainLoss(model, None, 0.0, router_weight=0.5)
    total, focus = objective(batch, "low", plan, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert none is None and float(focus) > 0
    assert torch.isclose(total, plain + 0.5 * focus)
    assert objective._moe_inputs == []  # nothing held between steps
    budget = torch.zeros(len(batch[1]), model.cfg.d_model)
    pretrain.forward_text(model, batch[0], batch[1], batch[3], budget, "low", plan)
    assert objective._moe_inputs == []  # a forward outside the loss (evaluation) collects nothing
    total.backward()
    assert all(block.layer.mlp.gate.weight.grad is not None for block in model.blocks)


def test_size_batches_share_one_image_size():
    from envs.data import synthvqa

    data = synthvqa.SynthVQA("val", 200, seed=0)
    sampler = pretrain.SizeBatchSampler(data.size_index, 8, seed=0)
    batches = [b for _, b in zip(range(20), sampler)]
    assert all(len(set(data.size_index[b].tolist())) == 1 and len(b) == 8 for b in batches)
    state = sampler.state()
    after = [b for _, b in zip(range(3), sampler)]
    sampler.load_state(state)
    assert [b for _, b in zip(range(3), sampler)] == after  # resumable position
    evaluation = pretrain.size_batches(data.size_index, 16)
    assert sorted(i for b in evaluation for i in b) == list(range(200))
    assert all(len(set(data.size_index[b].tolist())) == 1 for b in evaluation)


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
    cases = ((192, 192, [[0, 100, 30], [1, 5, 190]]), (128, 256, [[0, 250, 3], [1, 40, 120]]))
    for (height, width, glyphs), tier in itertools.product(cases, ("medium", "high")):
        images = torch.zeros(2, 3, height, width, dtype=torch.uint8)
        glyphs = torch.tensor(glyphs)
        marked = images.clone().index_put_((torch.tensor([0, 1]), torch.tensor([0, 0]), glyphs[:, 2], glyphs[:, 1]),
                                           torch.tensor(255, dtype=torch.uint8))
        index = pretrain.glyph_token_index(glyphs, tier, cfg, height, width)
        changed = (make_crops(marked, tier, cfg)[0] - make_crops(images, tier, cfg)[0]).abs()[:, :, 0]
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

    # --eval-only: the same weights and importance.json, a grid over the asked top-k values only,
    # and the knob grid's rows that the grid holds are its rows (not decoded twice).
    evaluated = pretrain.main([
        "--out", str(tmp_path / "eval"), "--eval-only", "--init", str(out), "--device", "cpu", "--grid", "all",
        "--grid-top-k", "4,8", "--val-samples", "6", "--eval-samples", "6", "--workers", "0",
    ])
    test_grid = evaluated["grid"]["test"]
    assert evaluated["steps"] == 0 and len(test_grid) == 3 * 2 * 5 == len(evaluated["grid"]["val"])
    assert {r["config"]["top_k"] for r in test_grid.values()} == {4, 8}
    assert evaluated["accuracy"]["full"] == test_grid["high/k8/N6"]
    assert evaluated["accuracy"]["top_k=5"]["config"]["top_k"] == 5
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["eval.json"]
    with pytest.raises(ValueError, match="--grid-top-k '9'"):
        pretrain.main(["--out", str(tmp_path / "bad"), "--eval-only", "--init", str(out), "--device", "cpu",
                       "--grid", "all", "--grid-top-k", "9"])
    with pytest.raises(ValueError, match="--eval-only: expected --init"):
        pretrain.main(["--out", str(tmp_path / "bad"), "--eval-only", "--device", "cpu"])


def test_extend_vocabulary_keeps_every_known_word_and_adds_the_new_ones():
    model, old_tok = tiny_model(["red", "blue", "what"])
    grown, new_tok = pretrain.extend_vocabulary(model, old_tok, ["red", "blue", "what", "fact"])
    assert new_tok.vocab_size == old_tok.vocab_size + 1 and grown.cfg.vocab_size == new_tok.vocab_size
    old_ids, new_ids = torch.tensor([old_tok.encode("what red blue")]), torch.tensor([new_tok.encode("what red blue")])
    assert torch.equal(model.embed(old_ids), grown.embed(new_ids))
    old_vocab, new_vocab = old_tok.vocabulary(), new_tok.vocabulary()
    for word in ("red", "blue", "what"):
        assert torch.equal(model.lm_head.weight[old_vocab[word]], grown.lm_head.weight[new_vocab[word]])
    same, _ = pretrain.extend_vocabulary(model, old_tok, ["red", "blue", "what"])
    assert same is model
    with pytest.raises(ValueError, match="no longer uses.*blue"):
        pretrain.extend_vocabulary(model, old_tok, ["red", "what"])
