"""The CUDA fast path (gpu marker: skipped without CUDA, run on the GPU machine): graph decode and the
graph prefill (padded to length buckets) equal the eager ones, graphs are cached and bounded, no host
synchronisation inside a phase, and the backend's CUDA episodes answer what its CPU episodes and its
eager CUDA episodes answer."""
import subprocess
import sys

import pytest
import torch

from envs.backends.vlm import VLMBackend
from envs.backends.vlm.executor import (
    Executor,
    first_tokens,
    prefill_bucket,
    prefill_sequence,
    run_blocks,
    trim_at_eos,
)
from envs.backends.vlm.preprocess import tiling
from envs.profiling import StaticConfig, load_samples, run_episode

from helpers import ROOT, make_tiny_model_dir

pytestmark = pytest.mark.gpu
LAYERS = 6
CONFIGS = (StaticConfig("high", 8, 6), StaticConfig("medium", 5, 4, insertion=2), StaticConfig("low", 4, 3))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    scores = {b: float((b * 5) % 3) for b in range(LAYERS)}
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_vlm"), seed=2, scores=scores, budget_range_ms=None)


def make_backend(model_dir, device, **kwargs):
    return VLMBackend(model_path=model_dir, budget_range_ms=(1.0, 2.0), num_samples={"test": 6}, max_new_tokens=4,
                      device=device, **kwargs)


@pytest.fixture(scope="module")
def cuda_backend(model_dir):
    return make_backend(model_dir, "cuda")


def _sequence(backend, sample, tier="high"):
    """The prefill sequence of `sample` at `tier` (preprocessing copies to the device)."""
    from envs.backends.vlm.backend import load_image
    from envs.backends.vlm.executor import encode_vision

    model = backend.model
    with torch.inference_mode():
        vision = encode_vision(model, load_image(sample)[None].cuda(), tier)
        return prefill_sequence(model, vision, backend.prompt_ids(sample)[None],
                                torch.zeros(1, backend.d_model, device="cuda"))


def _prefilled(backend, plan, sequence):
    hidden, cos, sin = sequence
    cache = {}
    with torch.inference_mode():
        hidden = run_blocks(backend.model, hidden, cos, sin, plan, cache)
        return first_tokens(backend.model, hidden), cache, hidden.shape[1]


def test_graph_decode_equals_eager_decode_and_graphs_are_bounded(cuda_backend):
    eos = cuda_backend.tokenizer.eos_id
    eager = Executor(cuda_backend.model, eos, mode="eager")
    graphed = Executor(cuda_backend.model, eos, mode="graphs", max_graphs=2)
    sequence = _sequence(cuda_backend, cuda_backend.dataset("test")[0])
    ks, top = cuda_backend.knob_space, cuda_backend.cfg.top_k
    with torch.inference_mode():
        for _ in range(2):  # the second pass replays (plans evicted by the bound are captured again)
            for config in CONFIGS:
                plan = config.plan(cuda_backend.importance, ks, top)
                first, cache, length = _prefilled(cuda_backend, plan, sequence)
                a = eager.decode(first, dict(cache), plan, length, 5)
                b = graphed.decode(first, dict(cache), plan, length, 5)
                assert trim_at_eos(a, eos) == trim_at_eos(b, eos), config
        assert graphed.describe()["decode_graphs"] == 2  # bounded by max_graphs
        assert graphed.captures == 6  # 3 plans, LRU of 2: every plan is evicted before its reuse
        plan = CONFIGS[-1].plan(cuda_backend.importance, ks, top)
        first, cache, length = _prefilled(cuda_backend, plan, sequence)
        graphed.decode(first, cache, plan, length, 5)
        assert graphed.captures == 6  # the most recent plan is replayed, not captured again


def test_no_host_sync_inside_prefill_or_decode(cuda_backend):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call."""
    plan = CONFIGS[0].plan(cuda_backend.importance, cuda_backend.knob_space, cuda_backend.cfg.top_k)
    sequence = _sequence(cuda_backend, cuda_backend.dataset("test")[1])
    executor = cuda_backend.executor
    first, cache, length = _prefilled(cuda_backend, plan, sequence)
    with torch.inference_mode():
        executor.decode(first, dict(cache), plan, length, 4)  # captures (capture itself synchronises)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            first, cache, length = _prefilled(cuda_backend, plan, sequence)  # routing without host reads
            ids = executor.decode(first, cache, plan, length, 4)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert ids.shape == (1, 4)


def test_graph_prefill_equals_the_eager_prefill_and_replays_per_bucket(cuda_backend):
    """Executor.prefill as graphs (buckets of 16 positions) against run_blocks, in the episode's two
    stretches: the same outputs and KV entries at the real positions and the same first token; one
    capture per (bucket, stretch), a length in a seen bucket replays."""
    model = cuda_backend.model
    graphed = Executor(model, cuda_backend.tokenizer.eos_id, mode="graphs", prefill_bucket=16)
    config = CONFIGS[1]  # p = 2
    plan, p = config.plan(cuda_backend.importance, cuda_backend.knob_space, cuda_backend.cfg.top_k), config.insertion
    samples, _ = load_samples(cuda_backend, "test", 6)
    buckets, prefills = set(), 0
    with torch.inference_mode():
        for tier in ("low", "high"):
            for sample in samples:
                hidden, cos, sin = _sequence(cuda_backend, sample, tier)
                eager_cache, graph_cache = {}, {}
                a = run_blocks(model, hidden, cos, sin, plan[:p], eager_cache)
                a = run_blocks(model, a, cos, sin, plan[p:], eager_cache)
                b = graphed.prefill(hidden, cos, sin, plan[:p], graph_cache)
                b = graphed.prefill(b, cos, sin, plan[p:], graph_cache)
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
                assert graph_cache.keys() == eager_cache.keys()
                for block in eager_cache:
                    for x, y in zip(eager_cache[block], graph_cache[block]):
                        assert y.shape == x.shape  # exactly the real positions
                        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
                assert torch.equal(first_tokens(model, b), first_tokens(model, a))
                buckets.add(prefill_bucket(hidden.shape[1], 16, model.cfg.max_positions))
                prefills += 1
                assert graphed.captures == 2 * len(buckets)  # a new bucket captures both stretches
    assert 2 <= len(buckets) < prefills  # several buckets, and seen ones replayed
    assert graphed.describe()["prefill_graphs"] == 2 * len(buckets)


def test_no_host_sync_inside_a_graph_prefill(cuda_backend):
    plan = CONFIGS[0].plan(cuda_backend.importance, cuda_backend.knob_space, cuda_backend.cfg.top_k)
    hidden, cos, sin = _sequence(cuda_backend, cuda_backend.dataset("test")[1])
    graphed = Executor(cuda_backend.model, cuda_backend.tokenizer.eos_id, mode="graphs", prefill_bucket=32)
    with torch.inference_mode():
        graphed.prepare_prefill(plan, hidden, cos, sin)  # captures (capture itself synchronises)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cache = {}
            out = graphed.prefill(hidden, cos, sin, plan, cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.shape == hidden.shape and len(cache) == len(plan) and graphed.captures == 1


def test_cuda_episodes_answer_what_cpu_episodes_answer(model_dir, cuda_backend, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch conv in full fp32, as on CPU
    cpu = make_backend(model_dir, "cpu")
    samples, _ = load_samples(cpu, "test", 4)
    prefill_keys = set()  # (length bucket, stretch): run_to's first p blocks, finish's rest
    for config in CONFIGS:
        plan, insertion = config.plan(cpu.importance, cpu.knob_space, cpu.cfg.top_k), config.insertion
        for sample in samples:
            on_cpu = run_episode(cpu, sample, config, torch.zeros(cpu.d_model))
            on_cuda = run_episode(cuda_backend, sample, config, torch.zeros(cpu.d_model))
            assert on_cuda.extras["generated_ids"] == on_cpu.extras["generated_ids"], config
            assert on_cuda.extras["decode_steps"] == cuda_backend.max_new_tokens - 1  # fixed decode length
            assert all(on_cuda.timings_ms[p] > 0 for p in ("preprocess", "vision", "prefill", "decode"))
            bucket = prefill_bucket(on_cuda.extras["prefill_tokens"], VLMBackend.PREFILL_BUCKET, cpu.cfg.max_positions)
            prefill_keys |= {(bucket, plan[:insertion]), (bucket, plan[insertion:])}
    executor = cuda_backend.describe()["executor"]
    assert executor["decode"] == "graphs"
    # one decode graph per configuration, one vision graph per crop count (tier and image size) and
    # one prefill graph per (bucket, stretch), replayed after
    crop_counts = {tiling(h, w, c.tier, cpu.model.cfg).num_crops
                   for c in CONFIGS for w, h in (s.image_loader().size for s in samples)}
    assert executor["decode_graphs"] == len(CONFIGS) and executor["vision_graphs"] == len(crop_counts)
    assert executor["prefill_graphs"] == len(prefill_keys)
    assert executor["captures"] == len(CONFIGS) + len(crop_counts) + len(prefill_keys)
    assert cuda_backend.executor.max_graphs == 2 * 5 * 5  # every (p, k, N) of the knob space fits
    assert cuda_backend.describe()["expert_kernel"] == "gathered"  # fp32 on CUDA
    assert cuda_backend.describe()["single_row_expert_kernel"] == "row"


def test_graph_episodes_answer_what_eager_cuda_episodes_answer(model_dir):
    """A graphs-mode backend (vision, prefill and decode graphs) against an eager one on the GPU: the
    same answers; a second pass captures nothing; two episodes open at once keep their own prefill
    (each replay's outputs are copied out before the next replay of that graph)."""
    graphed, eager = make_backend(model_dir, "cuda"), make_backend(model_dir, "cuda", decode_mode="eager")
    samples, _ = load_samples(eager, "test", 4)
    budget = torch.zeros(eager.d_model)
    answers = {}
    for config in CONFIGS:
        for i, sample in enumerate(samples):
            answers[config, i] = run_episode(eager, sample, config, budget).extras["generated_ids"]
            assert run_episode(graphed, sample, config, budget).extras["generated_ids"] == answers[config, i], config
    captures = graphed.executor.captures
    assert graphed.describe()["executor"]["prefill_graphs"] > 0
    for config in CONFIGS:  # run_to of two episodes, then finish of both
        for pair in ((0, 1), (2, 3)):
            episodes = [graphed.start_episode(samples[i], config.tier, budget) for i in pair]
            for episode in episodes:
                graphed.run_to(episode, config.insertion)
            for i, episode in zip(pair, episodes):
                result = graphed.finish(episode, config.top_k, config.num_blocks)
                assert result.extras["generated_ids"] == answers[config, i], config
    assert graphed.executor.captures == captures  # every shape was seen in the first pass


def test_bf16_backend_uses_grouped_mm_and_answers(model_dir):
    backend = make_backend(model_dir, "cuda", dtype="bfloat16")
    assert backend.describe()["expert_kernel"] == "grouped_mm"
    sample = backend.dataset("test")[0]
    result = run_episode(backend, sample, CONFIGS[0], torch.zeros(backend.d_model))
    assert 1 <= result.extras["generated_tokens"] <= backend.max_new_tokens


def test_train_runs_on_cuda(tmp_path):
    """runners/train.py --device cuda on the dummy backend finishes (group_advantages on the device)."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "runners" / "train.py"), "--config", str(ROOT / "configs" / "smoke.yaml"),
         "--output_dir", str(out), "--device", "cuda", "--num_epochs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "final_eval.json").is_file()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_row_path_matches_the_batched_rows(model_dir, dtype):
    """On CUDA a batch-1 row skips the sort and the counts (Triton row kernels on the unsorted
    experts, recorded as such); each row must still get what the batched call gives it."""
    from envs.backends.vlm import elastic
    from envs.backends.vlm.model import load_model

    model, _ = load_model(model_dir, "cuda", dtype)
    mlp = model.blocks[1].layer.mlp
    assert elastic.single_row_kernel("cuda", dtype, mlp.experts) == "row"
    x = torch.randn(5, mlp.gate.weight.shape[1], device="cuda", dtype=dtype)
    with torch.inference_mode():
        batched = elastic.moe_forward(mlp, x, 4, False)
        alone = torch.cat([elastic.moe_forward(mlp, x[i : i + 1], 4, False) for i in range(5)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(alone, batched, rtol=tol, atol=tol)


class _Experts(torch.nn.Module):
    def __init__(self, num_experts, d, inner, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.gate_up_proj = torch.nn.Parameter((torch.randn(num_experts, 2 * inner, d, generator=gen) * d ** -0.5).to("cuda", dtype))
        self.down_proj = torch.nn.Parameter((torch.randn(num_experts, d, inner, generator=gen) * inner ** -0.5).to("cuda", dtype))
        self.act_fn = torch.nn.SiLU()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("d, inner", [(200, 72), (2048, 1024)])  # odd sizes (masked lanes) and MolmoE-1B's
def test_row_kernels_equal_the_gathered_kernel(dtype, tol, d, inner):
    """Each row times its own expert, for distinct rows with repeated experts and for a stride-0
    expansion of one row (the decode step's k copies, read in place)."""
    from envs.backends.vlm import elastic, row_kernels

    experts = _Experts(6, d, inner, dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([3, 0, 3, 5, 1], device="cuda")
    rows = torch.randn(5, d, generator=gen).to("cuda", dtype)
    one = torch.randn(1, d, generator=gen).to("cuda", dtype).expand(5, -1)
    with torch.inference_mode():
        for x in (rows, one):
            reference = elastic.gathered_experts(experts, x.contiguous(), None, ids)
            torch.testing.assert_close(row_kernels.row_experts(experts, x, ids), reference, rtol=tol, atol=tol)
        with pytest.raises(ValueError, match="contiguous in their last dimension"):
            row_kernels.row_experts(experts, rows.t().contiguous().t(), ids)


def test_row_kernels_serve_silu_inference_only():
    from envs.backends.vlm import row_kernels

    experts = _Experts(2, 16, 8, torch.float32)
    x = torch.zeros(1, 16, device="cuda")
    with torch.inference_mode():
        assert row_kernels.available(x, experts)
        experts.act_fn = torch.nn.GELU()
        assert not row_kernels.available(x, experts)  # the kernels hard-code SiLU
    experts.act_fn = torch.nn.SiLU()
    assert not row_kernels.available(x, experts)  # grad mode: training takes the dense kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_block_equals_the_separate_projections(model_dir, dtype, monkeypatch):
    """CUDA inference computes q/k/v as one product over the weights' shared storage; a block must
    give what the separate projections give, and an in-place weight update must show in it."""
    from envs.backends.vlm import elastic
    from envs.backends.vlm.model import load_model

    model, _ = load_model(model_dir, "cuda", dtype)
    block = model.blocks[1]
    x = torch.randn(1, 3, model.cfg.d_model, device="cuda", dtype=dtype)
    cos, sin = model.rope(torch.arange(3, device="cuda")[None], x)

    def both():
        with torch.inference_mode():
            fused = block(x, cos, sin, 4)
            with monkeypatch.context() as m:
                m.setattr(type(block), "_fused_qk", lambda self, x, shape: None)
                separate = block(x, cos, sin, 4)
        return fused, separate

    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(*both(), rtol=tol, atol=tol)
    assert block._qkv is not None
    with torch.no_grad():
        block.layer.self_attn.k_proj.weight.mul_(2.0)
    fused, separate = both()
    torch.testing.assert_close(fused, separate, rtol=tol, atol=tol)
