"""VLMBackend on a tiny random-weight model of the real classes: the knobs must really act."""
import json
from collections import Counter

import pytest
import torch
from PIL import Image

from envs.backends.vlm import VLMBackend
from envs.backends.vlm import elastic
from envs.data.sample import ImageLoadError, VQASample
from envs.knobs import select_blocks
from helpers import TINY_LAYERS, make_tiny_model_dir

WORDS = ["what", "color", "is", "the", "big", "shape", "red", "blue", "green", "yes", "no"]
LAYERS = TINY_LAYERS


def make_model_dir(path, seed=0):
    return make_tiny_model_dir(path, WORDS, seed)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def backend(model_dir):
    return VLMBackend(model_path=model_dir, max_new_tokens=3)


def sample(question="what color is the big shape?", image=None, mode="RGB"):
    image = image if image is not None else Image.new(mode, (48, 48), color=(200, 30, 30) if mode == "RGB" else 0)
    return VQASample(question=question, answers=["red"] * 10, question_id=1, dataset="synthvqa",
                     image_loader=lambda: image, family="coarse")


def budget(backend, seed=0):
    return torch.randn(backend.d_model, generator=torch.Generator().manual_seed(seed))


class BlockLog:
    """Per-block forward calls (with their sequence length, top-k and cache length) and expert rows."""

    def __init__(self, backend, monkeypatch):
        self.calls, self.expert_rows, self._current = [], [], None
        self.handles = [b.register_forward_pre_hook(self._pre) for b in backend.model.blocks]
        real = elastic.run_experts

        def counting(experts, routed, counts, expert_of_row=None, kernel=None):
            if counts is None:  # the gathered batch-1 path passes each row's expert instead
                counts = torch.bincount(expert_of_row, minlength=experts.gate_up_proj.shape[0])
            self.expert_rows.append((self._current, counts.clone()))
            return real(experts, routed, counts, expert_of_row, kernel)

        monkeypatch.setattr(elastic, "run_experts", counting)

    def _pre(self, block, args):
        hidden, cos, sin, top_k, cache = args
        past = cache.get(block.index) if cache is not None else None
        self._current = (block.index, hidden.shape[1], top_k, 0 if past is None else past[0].shape[2])
        self.calls.append(self._current)

    def close(self):
        for h in self.handles:
            h.remove()


def run_episode(backend, tier="high", p=2, k=5, n=4, s=None, seed=0):
    ep = backend.start_episode(s or sample(), tier, budget(backend, seed))
    token = backend.run_to(ep, p)
    return ep, token, backend.finish(ep, k, n)


def test_knob_space_and_dims_follow_the_model(backend):
    ks = backend.knob_space
    assert ks.num_layers == LAYERS and ks.tiers == ("low", "medium", "high")
    assert ks.top_k_values == (4, 5, 6, 7, 8) and ks.first_block_top_k == 8
    assert ks.num_blocks_values == (2, 3, 4, 5, 6) and ks.insertion_positions == (1, 2)
    assert backend.d_model == backend.language_dim == 32
    assert backend.budget_range_ms == (5.0, 50.0)
    assert backend.language_feature(sample()).shape == (32,)


def test_tier_changes_the_number_of_vision_tokens(backend):
    counts = {}
    for tier in ("low", "medium", "high"):
        _, _, result = run_episode(backend, tier=tier)
        counts[tier] = result.extras["vision_tokens"]
        question_tokens = len(backend.tokenizer.encode(sample().question))
        assert result.extras["prefill_tokens"] == counts[tier] + question_tokens + 1  # + budget token
    assert counts == {"low": 4, "medium": 20, "high": 40}  # 1 / 5 / 10 crops of 4 tokens


def test_latency_token_is_block_p_minus_1_output_at_the_last_position(backend):
    for p in (1, 2, 4):
        seen = {}
        handle = backend.model.blocks[p - 1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
        try:
            ep = backend.start_episode(sample(), "medium", budget(backend))
            token = backend.run_to(ep, p)
        finally:
            handle.remove()
        assert token.shape == (backend.d_model,)
        torch.testing.assert_close(token, seen["out"][0, -1])
        backend.finish(ep, 8, 6)


def test_topk_skipping_cache_reuse_and_decode_config(backend, monkeypatch):
    p, k, n = 2, 5, 4
    log = BlockLog(backend, monkeypatch)
    try:
        _, _, result = run_episode(backend, tier="medium", p=p, k=k, n=n)
    finally:
        log.close()
    blocks = select_blocks(backend.importance, p, n, LAYERS)
    assert result.extras["blocks"] == blocks and len(blocks) == n
    prefill_len = result.extras["prefill_tokens"]
    decode_steps = result.extras["generated_tokens"] - 1
    expected_k = {b: (8 if b < p else k) for b in blocks}
    # Every run block runs once over the prefill (the first p are NOT recomputed in finish) and once
    # per decode step; skipped blocks never run.
    per_block = Counter(call[0] for call in log.calls)
    assert per_block == Counter({b: 1 + decode_steps for b in blocks})
    for block, length, top_k, cached in log.calls:
        assert top_k == expected_k[block]  # block 0 at 8, blocks 1..p-1 at the default 8, the rest at k
        assert (length, cached) == (prefill_len, 0) or (length == 1 and cached >= prefill_len)
    # Expert work: every prefill position goes to exactly top_k experts of its block; a decode
    # token computes exactly top_k experts (not all of them).
    for (block, length, top_k, _), counts in log.expert_rows:
        assert int(counts.sum()) == length * top_k
        if length == 1:
            assert int((counts > 0).sum()) == top_k


def test_budget_token_is_in_prefill_only(backend, monkeypatch):
    inputs = []
    handle = backend.model.blocks[0].register_forward_pre_hook(
        lambda m, args: inputs.append((args[0].clone(), args[4].get(0)[0].shape[2] if 0 in args[4] else 0))
    )
    try:
        bt = budget(backend, seed=3)
        ep = backend.start_episode(sample(), "low", bt)
        backend.run_to(ep, 1)
        result = backend.finish(ep, 8, LAYERS)
    finally:
        handle.remove()
    prefill, _ = inputs[0]
    torch.testing.assert_close(prefill[0, -1], backend.model.embed_budget(bt))  # the budget token is the last prefill position
    assert result.extras["generated_tokens"] == 1 + (len(inputs) - 1)
    for step, (hidden, cached) in enumerate(inputs[1:]):
        assert hidden.shape[1] == 1 and cached == prefill.shape[1] + step  # no new budget position
        assert not torch.allclose(hidden[0, -1], backend.model.embed_budget(bt))


def test_budget_token_reaches_the_answer_through_the_cache(backend):
    """Changing only the budget token changes the logits the answer is decoded from: the first
    answer token's (read at the budget position, after every kept block) and, with the same
    first token, the next decode step's, which sees the budget position only through the cache."""
    logits = []
    handle = backend.model.lm_head.register_forward_hook(lambda m, args, out: logits.append(out[0, -1].clone()))
    try:
        runs = []
        # A small change of the token, so that the first answer token stays the same.
        for token in (budget(backend, 1), budget(backend, 1) + 0.05 * budget(backend, 2)):
            ep = backend.start_episode(sample(), "low", token)
            backend.run_to(ep, 2)
            logits.clear()
            result = backend.finish(ep, 8, 6)
            runs.append((list(logits), result.extras["generated_ids"]))
    finally:
        handle.remove()
    (la, ids_a), (lb, ids_b) = runs
    assert len(la) >= 2 and len(lb) >= 2
    assert not torch.allclose(la[0], lb[0], atol=1e-5)
    assert ids_a[0] == ids_b[0]  # same first token, so the second step's input is the same
    assert not torch.allclose(la[1], lb[1], atol=1e-5)


def test_greedy_decode_with_cache_matches_full_recompute(backend):
    p, k, n = 2, 4, 5
    ep, _, result = run_episode(backend, tier="medium", p=p, k=k, n=n)
    model = backend.model
    blocks = result.extras["blocks"]
    # Recompute from scratch: prefill + all generated tokens but the last, no cache, causal.
    ep2 = backend.start_episode(sample(), "medium", budget(backend))
    generated = result.extras["generated_ids"]
    with torch.inference_mode():
        ids = torch.tensor([generated[:-1]], dtype=torch.long)
        seq = torch.cat([ep2.hidden, model.embed(ids)], dim=1)
        pos = torch.arange(seq.shape[1])[None]
        cos, sin = model.rope(pos, seq)
        h = seq
        for b in blocks:
            h = model.blocks[b](h, cos, sin, 8 if b < p else k, None)
        predicted = model.logits(h).argmax(-1)[0, ep2.hidden.shape[1] - 1 :].tolist()
    assert predicted == generated


def test_episodes_interleave(backend):
    """The env runs Stage 1 for every group member before finishing any; results must not mix."""
    alone = [run_episode(backend, tier=t, seed=i)[2].answer for i, t in enumerate(("low", "high"))]
    eps = [backend.start_episode(sample(), t, budget(backend, i)) for i, t in enumerate(("low", "high"))]
    for ep in eps:
        backend.run_to(ep, 2)
    assert [backend.finish(ep, 5, 4).answer for ep in eps] == alone


def test_timings_and_result_fields(backend):
    _, _, result = run_episode(backend)
    assert set(result.timings_ms) == {"preprocess", "vision", "prefill", "decode"}
    assert all(v >= 0 for v in result.timings_ms.values())
    assert result.timings_ms["prefill"] > 0 and result.timings_ms["vision"] > 0
    assert 0.0 <= result.accuracy <= 1.0


def test_episode_order_errors(backend):
    ep = backend.start_episode(sample(), "low", budget(backend))
    with pytest.raises(RuntimeError, match="before run_to"):
        backend.finish(ep, 8, 6)
    backend.run_to(ep, 2)
    with pytest.raises(RuntimeError, match="already called"):
        backend.run_to(ep, 2)
    with pytest.raises(ValueError, match="num_blocks"):
        backend.finish(ep, 8, 1)
    backend.finish(ep, 8, 6)
    with pytest.raises(RuntimeError, match="already called"):
        backend.finish(ep, 8, 6)


# ------------------------------------------------------------------------- bad input
def test_bad_sample_inputs(backend):
    # grayscale is converted to RGB, as Molmo does
    assert backend.start_episode(sample(mode="L"), "low", budget(backend)).vision_tokens == backend.model.cfg.tokens_per_crop

    def broken():
        raise OSError("truncated file")

    bad = VQASample("what color?", ["red"], 7, "synthvqa", image_loader=broken)
    with pytest.raises(ImageLoadError, match="question_id=7.*truncated"):
        backend.start_episode(bad, "low", budget(backend))
    with pytest.raises(ValueError, match="question is empty"):
        backend.start_episode(sample(question="  "), "low", budget(backend))
    with pytest.raises(ValueError, match="question is empty"):
        backend.language_feature(sample(question=""))
    with pytest.raises(ValueError, match="tier='ultra'"):
        backend.start_episode(sample(), "ultra", budget(backend))
    with pytest.raises(ValueError, match=r"budget_token has shape \(3,\)"):
        backend.start_episode(sample(), "low", torch.zeros(3))


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_model_file_is_named(model_dir, tmp_path, name):
    d = _copy_dir(model_dir, tmp_path / "m")
    (d / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        VLMBackend(model_path=d)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_corrupt_model_file_is_named(model_dir, tmp_path, name):
    d = _copy_dir(model_dir, tmp_path / "m")
    (d / name).write_bytes(b"\x00garbage{")
    with pytest.raises(ValueError, match=name):
        VLMBackend(model_path=d)


def test_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VLMBackend(model_path=tmp_path / "nope")


def test_weights_not_matching_config(model_dir, tmp_path):
    d = _copy_dir(model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_layers"] = LAYERS + 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model.safetensors.*missing.*layers.6"):
        VLMBackend(model_path=d)


@pytest.mark.parametrize(
    "scores, message",
    [
        ({str(i): 1.0 for i in range(LAYERS - 1)}, r"missing \['5'\]"),
        ({**{str(i): 1.0 for i in range(LAYERS)}, "3": float("nan")}, r"scores\['3'\]=nan"),
        ({**{str(i): 1.0 for i in range(LAYERS)}, "2": "high"}, r"scores\['2'\]='high'"),
    ],
)
def test_bad_importance(model_dir, tmp_path, scores, message):
    d = _copy_dir(model_dir, tmp_path / "m")
    (d / "importance.json").write_text(json.dumps({"method": "test", "scores": scores}))
    with pytest.raises(ValueError, match=message):
        VLMBackend(model_path=d)


def test_results_dir_errors_and_overrides(model_dir, tmp_path):
    with pytest.raises(ValueError, match="importance_method='drop'"):
        VLMBackend(model_path=model_dir, importance_method="drop")
    results = tmp_path / "results"
    results.mkdir()
    with pytest.raises(FileNotFoundError, match="importance.json"):
        VLMBackend(model_path=model_dir, results_dir=results)
    (results / "importance.json").write_text((model_dir / "importance.json").read_text())
    with pytest.raises(FileNotFoundError, match="profile.json"):
        VLMBackend(model_path=model_dir, results_dir=results)
    b = VLMBackend(model_path=model_dir, results_dir=results, budget_range_ms=[1, 2])
    assert b.budget_range_ms == (1.0, 2.0)
    with pytest.raises(ValueError, match="budget_range_ms"):
        VLMBackend(model_path=model_dir, budget_range_ms=[3, 2])
