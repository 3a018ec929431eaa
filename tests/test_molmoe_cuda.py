"""MolmoEBackend on CUDA (gpu marker: skipped without CUDA, run on the GPU machine before
runners/bench_molmoe.py): graph-decoded CUDA episodes answer what the CPU episodes answer, one decode
graph per configuration, and bfloat16 runs through grouped_mm."""
import pytest
import torch

from molmoe_fixture import FIXTURE, requires_fixture, write_results

pytestmark = [pytest.mark.gpu, requires_fixture]
IMAGE_SIZE = (640, 480)
CONFIGS = ("low", 1, 3, 1), ("medium", 2, 4, 2), ("high", 2, 2, 1)  # tier, top-k, blocks, insertion


def make_backend(results, device, **kwargs):
    from envs.backends.molmoe import MolmoEBackend

    return MolmoEBackend(model_path=FIXTURE, results_dir=results, num_samples={"val": 3}, max_new_tokens=4,
                         image_size=IMAGE_SIZE, device=device, **kwargs)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return write_results(tmp_path_factory.mktemp("molmoe_results"))


def test_cuda_episodes_answer_what_cpu_episodes_answer(results):
    from envs.profiling import StaticConfig, load_samples, run_episode

    cpu, cuda = make_backend(results, "cpu"), make_backend(results, "cuda")
    samples, _ = load_samples(cpu, "val", 3)
    configs = [StaticConfig(t, k, n, insertion=p) for t, k, n, p in CONFIGS]
    for config in configs:
        for sample in samples:
            on_cpu = run_episode(cpu, sample, config, torch.zeros(cpu.d_model))
            on_cuda = run_episode(cuda, sample, config, torch.zeros(cpu.d_model))
            assert on_cuda.extras["generated_ids"] == on_cpu.extras["generated_ids"], config
            assert on_cuda.extras["crops"] == on_cpu.extras["crops"]
            assert on_cuda.extras["decode_steps"] == cuda.max_new_tokens - 1  # fixed decode length
            assert all(on_cuda.timings_ms[p] > 0 for p in ("preprocess", "vision", "prefill", "decode"))
    executor = cuda.describe()["executor"]
    assert executor["decode"] == "graphs" and executor["decode_graphs"] == len(configs)
    assert executor["prefill_graphs"] == 0  # MolmoE's prefill stays eager (MolmoEBackend.PREFILL_BUCKET)


def test_bf16_backend_uses_grouped_mm_and_answers(results):
    from envs.profiling import StaticConfig, run_episode

    backend = make_backend(results, "cuda", dtype="bfloat16")
    assert backend.describe()["expert_kernel"] == "grouped_mm"
    result = run_episode(backend, backend.dataset("val")[0], StaticConfig("high", 2, 4), torch.zeros(backend.d_model))
    assert 1 <= result.extras["generated_tokens"] <= backend.max_new_tokens
