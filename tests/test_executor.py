"""The executor on a tiny random-weight model: one plan builder, one greedy decoder in three modes,
batched and batch-1 paths giving the same answers, and no host read inside a static decode."""

import pytest
import torch

from envs.backends.vlm import VLMBackend
from envs.backends.vlm.executor import (
    CapturedCall,
    Executor,
    block_plan,
    encode_vision,
    first_tokens,
    full_plan,
    prefill_sequence,
    run_blocks,
    trim_at_eos,
)
from envs.knobs import select_blocks
from envs.profiling import StaticConfig, load_samples, run_episode

from helpers import load_runner, make_tiny_model_dir

LAYERS = 6
SCORES = {i: float((i * 5) % 3) for i in range(LAYERS)}  # select_blocks skips middle blocks


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny_vlm"), seed=1, scores=SCORES, budget_range_ms=None)
    return VLMBackend(model_path=path, budget_range_ms=(1.0, 2.0), num_samples={"test": 12}, max_new_tokens=4)


@pytest.fixture(scope="module")
def samples(backend):
    return load_samples(backend, "test", 12)[0]


def test_block_plan_follows_select_blocks_and_the_topk_rules():
    for p, k, n in ((1, 4, 6), (2, 5, 4), (3, 7, 3)):
        plan = block_plan(SCORES, p, k, n, LAYERS, prefix_top_k=8, first_block_top_k=6)
        assert [b for b, _ in plan] == select_blocks(SCORES, p, n, LAYERS)
        assert dict(plan)[0] == 6  # block 0 at first_block_top_k
        assert all(top_k == (8 if b < p else k) for b, top_k in plan if b > 0)
    assert full_plan(LAYERS, 8) == tuple((b, 8) for b in range(LAYERS))
    with pytest.raises(ValueError, match="insertion"):
        block_plan(SCORES, 4, 8, 3, LAYERS, 8)


def test_the_backend_runs_the_plan_the_builder_gives(backend, samples):
    config = StaticConfig("medium", 5, 4, insertion=2)
    result = run_episode(backend, samples[0], config, torch.zeros(backend.d_model))
    plan = config.plan(backend.importance, backend.knob_space, backend.cfg.top_k)
    assert result.extras["blocks"] == [b for b, _ in plan] and len(plan) == 4


def _batch_inputs(backend, rows, tier):
    model = backend.model
    images = torch.stack([backend_image(s) for s in rows])
    ids = torch.stack([backend.prompt_ids(s) for s in rows])
    return encode_vision(model, images, tier), ids


def backend_image(sample):
    from envs.backends.vlm.backend import load_image

    return load_image(sample)


def same_length_groups(backend, samples):
    """Samples of equal prompt length and image size (one tiling): batchable."""
    groups = {}
    for s in samples:
        groups.setdefault((len(backend.prompt_ids(s)), s.image.size), []).append(s)
    return [g for g in groups.values() if len(g) > 1]


@pytest.mark.parametrize("config", [StaticConfig("high", 8, 6), StaticConfig("low", 4, 3, insertion=2)])
def test_batched_generation_equals_batch1_episodes(backend, samples, config):
    executor = Executor(backend.model, backend.tokenizer.eos_id, mode="eager")
    plan = config.plan(backend.importance, backend.knob_space, backend.cfg.top_k)
    groups = same_length_groups(backend, samples)
    assert groups, "the fixture needs prompts of equal length to batch"
    with torch.inference_mode():
        for rows in groups:
            vision, ids = _batch_inputs(backend, rows, config.tier)
            batched = executor.generate(vision, ids, torch.zeros(len(rows), backend.d_model), plan, 4)
            for sample, ids_batched in zip(rows, batched):
                alone = run_episode(backend, sample, config, torch.zeros(backend.d_model))
                assert alone.extras["generated_ids"] == ids_batched


def test_pretraining_evaluation_equals_batch1_episodes(backend, samples):
    """runners/pretrain_vlm.py's greedy answers (rows of mixed prompt lengths) are the backend's."""
    pretrain = load_runner("pretrain_vlm")
    data = backend.dataset("test")
    by_size = {}
    for i in range(len(data)):  # a batch shares one image size (one tiling), as pretraining's batches do
        by_size.setdefault(data[i].image.size, []).append(i)
    rows = max(by_size.values(), key=len)[:8]
    items = [pretrain.EncodedSynthVQA(data, backend.tokenizer)[i] for i in rows]
    assert len({len(it[1]) for it in items}) > 1  # mixed prompt lengths
    batch = pretrain.collate(items, backend.tokenizer.pad_id)
    config = StaticConfig("medium", 6, 5)
    plan = config.plan(backend.importance, backend.knob_space, backend.cfg.top_k)
    executor = Executor(backend.model, backend.tokenizer.eos_id, mode="eager")
    answers = pretrain.greedy_answers(executor, backend.tokenizer, batch, "medium", plan, torch.device("cpu"), 4)
    for i, answer in zip(rows, answers):
        alone = run_episode(backend, data[i], config, torch.zeros(backend.d_model))
        assert answer == backend.tokenizer.decode(alone.extras["generated_ids"])


def _prefilled(backend, samples, plan, tier="high"):
    model = backend.model
    rows = same_length_groups(backend, samples)[0][:3]
    vision, ids = _batch_inputs(backend, rows, tier)
    hidden, cos, sin = prefill_sequence(model, vision, ids, torch.zeros(len(rows), backend.d_model))
    cache = {}
    hidden = run_blocks(model, hidden, cos, sin, plan, cache)
    return first_tokens(model, hidden), cache, hidden.shape[1]


@torch.inference_mode()
def test_static_cache_decode_equals_eager_decode(backend, samples):
    """The static decode step (what a CUDA graph captures) computes the eager decoder's tokens."""
    eos = backend.tokenizer.eos_id
    eager = Executor(backend.model, eos, mode="eager")
    static = Executor(backend.model, eos, mode="static")
    for config in (StaticConfig("high", 8, 6), StaticConfig("high", 4, 4, insertion=2)):
        plan = config.plan(backend.importance, backend.knob_space, backend.cfg.top_k)
        first, cache, length = _prefilled(backend, samples, plan)
        a = eager.decode(first, dict(cache), plan, length, 6)
        b = static.decode(first, dict(cache), plan, length, 6)
        assert b.shape[1] == 6  # the static decoder always runs the plan's decode length
        assert trim_at_eos(a, eos) == trim_at_eos(b, eos)
        # the static steps attend to what the eager ones attend to: compare the tokens before any
        # row stops (the eager decoder stops once every row has <eos>)
        assert torch.equal(a, b[:, : a.shape[1]])


@torch.inference_mode()
def test_static_decode_reads_nothing_on_the_host(backend, samples, monkeypatch):
    """No .tolist()/.item()/bool()/int() and no bincount in a static decode: on CUDA nothing in the
    phase waits for the host (the same code runs there, captured)."""
    plan = StaticConfig("high", 5, 5).plan(backend.importance, backend.knob_space, backend.cfg.top_k)
    first, cache, length = _prefilled(backend, samples, plan)
    executor = Executor(backend.model, backend.tokenizer.eos_id, mode="static")

    def host_read(*args, **kwargs):
        raise AssertionError("host read inside the decode phase")

    for name in ("tolist", "item", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    monkeypatch.setattr(torch, "bincount", host_read)
    ids = executor.decode(first, cache, plan, length, 4)
    monkeypatch.undo()
    assert ids.shape == (first.shape[0], 4)


def test_bad_decode_arguments(backend):
    with pytest.raises(ValueError, match="mode='fast'"):
        Executor(backend.model, 1, mode="fast")
    with pytest.raises(ValueError, match="'graphs' needs a model on a CUDA device"):
        Executor(backend.model, 1, mode="graphs")
    with pytest.raises(ValueError, match="CapturedCall needs CUDA inputs; got cpu"):
        CapturedCall(torch.neg, torch.zeros(2))
    with pytest.raises(ValueError, match="max_graphs=0"):
        Executor(backend.model, 1, max_graphs=0)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        Executor(backend.model, 1).decode(torch.zeros(1, 1, dtype=torch.long), {}, (), 3, 0)
    limit = backend.cfg.max_positions
    with pytest.raises(ValueError, match=f"exceed the model's max_positions={limit}"):
        Executor(backend.model, 1, mode="static").decode(torch.zeros(1, 1, dtype=torch.long), {}, (), limit - 1, 3)
