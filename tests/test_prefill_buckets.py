"""The padded prefill (what a CUDA prefill graph captures; static mode runs it eagerly): length
buckets, right padding that no real position sees, and the unpadded prefill's hidden states, KV
entries and greedy answers; the eager mode's prefill is run_blocks itself."""

import pytest
import torch

import envs.backends.vlm.executor as executor_module
from envs.backends.vlm import VLMBackend
from envs.backends.vlm.backend import load_image
from envs.backends.vlm.executor import (
    Executor,
    encode_vision,
    first_tokens,
    pad_positions,
    padded_prefill,
    prefill_bucket,
    prefill_sequence,
    run_blocks,
    trim_at_eos,
)
from envs.profiling import StaticConfig, load_samples

from helpers import make_tiny_model_dir

LAYERS = 6
SCORES = {i: float((i * 5) % 3) for i in range(LAYERS)}  # select_blocks skips middle blocks
BUCKET = 16
CONFIGS = (StaticConfig("high", 8, 6), StaticConfig("medium", 5, 4, insertion=2), StaticConfig("low", 4, 3))
CLOSE = dict(rtol=1e-5, atol=1e-5)  # padding changes the matmul shapes, so the last bits may differ


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_vlm"), seed=3, scores=SCORES, budget_range_ms=None)


def make_backend(model_dir, **kwargs):
    return VLMBackend(model_path=model_dir, budget_range_ms=(1.0, 2.0), num_samples={"test": 6}, max_new_tokens=4,
                      **kwargs)


@pytest.fixture(scope="module")
def backend(model_dir):
    return make_backend(model_dir)


@pytest.fixture(scope="module")
def samples(backend):
    return load_samples(backend, "test", 6)[0]


def _sequence(backend, sample, tier):
    vision = encode_vision(backend.model, load_image(sample)[None], tier)
    return prefill_sequence(backend.model, vision, backend.prompt_ids(sample)[None], torch.randn(1, backend.d_model))


def _two_stretches(prefill, sequence, plan, p):
    """The episode's prefill: blocks 0..p-1 (run_to), then the plan's blocks from p on (finish)."""
    hidden, cos, sin = sequence
    cache = {}
    hidden = prefill(hidden, cos, sin, plan[:p], cache)
    return prefill(hidden, cos, sin, plan[p:], cache), cache


def test_prefill_bucket_rounds_up_to_the_multiple_within_max_positions():
    assert [prefill_bucket(n, 32, 512) for n in (1, 31, 32, 33, 190, 481, 512)] == [32, 32, 32, 64, 192, 512, 512]
    assert prefill_bucket(97, 32, 100) == 100  # the last bucket stops at max_positions
    with pytest.raises(ValueError, match=r"prefill of 513 positions: expected 1\.\.512 \(the model's max_positions\)"):
        prefill_bucket(513, 32, 512)


def test_bad_prefill_arguments(backend):
    model = backend.model
    with pytest.raises(ValueError, match="prefill_bucket=0"):
        Executor(model, 1, prefill_bucket=0)
    with pytest.raises(ValueError, match="max_prefill_graphs=0"):
        Executor(model, 1, prefill_bucket=16, max_prefill_graphs=0)
    limit = model.cfg.max_positions
    too_long = torch.zeros(1, limit + 1, model.cfg.d_model)
    cos, sin = model.rope(torch.arange(limit + 1)[None], too_long)
    with pytest.raises(ValueError, match=f"prefill of {limit + 1} positions: expected 1..{limit}"):
        Executor(model, 1, mode="static", prefill_bucket=BUCKET).prefill(too_long, cos, sin, ((0, 8),), {})


@torch.inference_mode()
def test_padding_never_reaches_a_real_position(backend, samples):
    """Whatever fills the padded positions, the real ones compute the same (causal attention; the
    MoE routes each position alone)."""
    model = backend.model
    plan = CONFIGS[0].plan(backend.importance, backend.knob_space, backend.cfg.top_k)
    hidden, cos, sin = _sequence(backend, samples[0], "high")
    length = hidden.shape[1]
    padded = pad_positions(length + 21, hidden, cos, sin)
    assert torch.equal(padded[0][:, :length], hidden) and not padded[0][:, length:].any()
    garbage = [t.clone() for t in padded]
    for t in garbage:
        t[:, length:] = 100 * torch.randn_like(t[:, length:])
    a, b = padded_prefill(model, plan, *padded), padded_prefill(model, plan, *garbage)
    for x, y in zip(a, b):
        torch.testing.assert_close(x[..., :length, :], y[..., :length, :], **CLOSE)
    assert not torch.allclose(a[0][:, length:], b[0][:, length:])  # the padding itself did change


@torch.inference_mode()
def test_padded_prefill_equals_the_unpadded_one(backend, samples):
    """Static mode's padded prefill against run_blocks: the real positions' outputs, every block's KV
    entries (exactly the real positions), the first token and the greedy answer."""
    model, eos = backend.model, backend.tokenizer.eos_id
    static = Executor(model, eos, mode="static", prefill_bucket=BUCKET)

    def unpadded(hidden, cos, sin, steps, cache):
        return run_blocks(model, hidden, cos, sin, steps, cache)

    padded_lengths = 0
    for config in CONFIGS:
        plan = config.plan(backend.importance, backend.knob_space, backend.cfg.top_k)
        for sample in samples:
            sequence = _sequence(backend, sample, config.tier)
            length = sequence[0].shape[1]
            padded_lengths += prefill_bucket(length, BUCKET, model.cfg.max_positions) > length
            a, a_cache = _two_stretches(unpadded, sequence, plan, config.insertion)
            b, b_cache = _two_stretches(static.prefill, sequence, plan, config.insertion)
            assert b.shape == a.shape == sequence[0].shape
            torch.testing.assert_close(b, a, **CLOSE)
            assert sorted(b_cache) == sorted(a_cache) == sorted(blk for blk, _ in plan)
            for block in a_cache:
                for x, y in zip(a_cache[block], b_cache[block]):
                    assert y.shape == x.shape == (1, model.cfg.num_heads, length, x.shape[-1])
                    torch.testing.assert_close(y, x, **CLOSE)
            first = first_tokens(model, a)
            assert torch.equal(first_tokens(model, b), first)  # read at position length - 1
            ids_a = static.decode(first, a_cache, plan, length, 4)
            ids_b = static.decode(first, b_cache, plan, length, 4)
            assert trim_at_eos(ids_b, eos) == trim_at_eos(ids_a, eos)
    assert padded_lengths > len(CONFIGS) * len(samples) // 2  # most prefills were really padded


@torch.inference_mode()
def test_eager_prefill_is_run_blocks(backend, samples, monkeypatch):
    """Eager mode (and an executor without a prefill_bucket) runs run_blocks itself: same tensors, no padding."""
    def no_padding(*args):
        raise AssertionError("the eager prefill padded")

    monkeypatch.setattr(executor_module, "padded_prefill", no_padding)
    model = backend.model
    plan = CONFIGS[1].plan(backend.importance, backend.knob_space, backend.cfg.top_k)
    sequence = _sequence(backend, samples[1], "medium")

    def unpadded(hidden, cos, sin, steps, cache):
        return run_blocks(model, hidden, cos, sin, steps, cache)

    a, a_cache = _two_stretches(unpadded, sequence, plan, 2)
    for executor in (Executor(model, 1, mode="eager", prefill_bucket=BUCKET), Executor(model, 1, mode="static")):
        b, b_cache = _two_stretches(executor.prefill, sequence, plan, 2)
        assert torch.equal(a, b) and a_cache.keys() == b_cache.keys()
        assert all(torch.equal(x, y) for blk in a_cache for x, y in zip(a_cache[blk], b_cache[blk]))


@torch.inference_mode()
def test_static_prefill_reads_nothing_on_the_host(backend, samples, monkeypatch):
    """No .tolist()/.item()/bool()/int() and no bincount in the padded prefill: on CUDA it is captured."""
    plan = CONFIGS[0].plan(backend.importance, backend.knob_space, backend.cfg.top_k)
    hidden, cos, sin = _sequence(backend, samples[2], "high")
    executor = Executor(backend.model, 1, mode="static", prefill_bucket=BUCKET)

    def host_read(*args, **kwargs):
        raise AssertionError("host read inside the prefill")

    for name in ("tolist", "item", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    monkeypatch.setattr(torch, "bincount", host_read)
    cache = {}
    out = executor.prefill(hidden, cos, sin, plan, cache)
    monkeypatch.undo()
    assert out.shape == hidden.shape and len(cache) == len(plan)


def test_static_backend_episodes_answer_what_eager_ones_answer(model_dir, backend, samples, monkeypatch):
    """VLMBackend's run_to and finish through the padded prefill (static mode, as a CUDA graph runs
    it): the same latency token and answer as the eager episode, every stretch padded to a bucket."""
    static = make_backend(model_dir, decode_mode="static")
    bucket, limit = VLMBackend.PREFILL_BUCKET, backend.cfg.max_positions
    ks = static.knob_space
    # one bucket per 32 positions of 128; per bucket one graph per p and one per (p, k, N)
    assert static.executor.max_prefill_graphs == 4 * (len(ks.insertion_positions) + 2 * 5 * 5)
    ran = []
    real = executor_module.padded_prefill

    def recorded(model, steps, hidden, cos, sin):
        ran.append(hidden.shape[1])
        return real(model, steps, hidden, cos, sin)

    monkeypatch.setattr(executor_module, "padded_prefill", recorded)
    budget = torch.randn(backend.d_model)
    lengths = []
    with torch.inference_mode():
        for config in CONFIGS:
            for sample in samples:
                token, result = {}, {}
                for name, b in (("eager", backend), ("static", static)):
                    episode = b.start_episode(sample, config.tier, budget)
                    token[name] = b.run_to(episode, config.insertion)
                    result[name] = b.finish(episode, config.top_k, config.num_blocks)
                torch.testing.assert_close(token["static"], token["eager"], **CLOSE)
                assert result["static"].extras["generated_ids"] == result["eager"].extras["generated_ids"]
                assert result["static"].extras["prefill_tokens"] == result["eager"].extras["prefill_tokens"]
                lengths.append(result["eager"].extras["prefill_tokens"])
    assert ran == [prefill_bucket(n, bucket, limit) for n in lengths for _ in range(2)]  # run_to's, then finish's
    assert any(n % bucket for n in lengths)  # real padding happened
