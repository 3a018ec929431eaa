"""The sparse expert kernels compute the same thing; the kernel in use is a recorded choice, and the
per-expert loop that replaces torch._grouped_mm where it is missing is logged, never silent."""
import logging

import pytest
import torch

from envs.backends.vlm import elastic

from helpers import tiny_model


@pytest.fixture(scope="module")
def mlp():
    return tiny_model(["what", "color", "red"])[0].blocks[2].layer.mlp


@pytest.mark.parametrize("rows, top_k", [(1, 8), (13, 4)])
def test_sparse_kernels_agree(mlp, rows, top_k):
    x = torch.randn(rows * top_k, mlp.gate.weight.shape[1], generator=torch.Generator().manual_seed(rows))
    experts = torch.randint(0, mlp.gate.weight.shape[0], (x.shape[0],), generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(experts, minlength=mlp.gate.weight.shape[0])
    routed = x[torch.argsort(experts, stable=True)]
    with torch.no_grad():
        reference = elastic.looped_experts(mlp.experts, routed, counts)
        torch.testing.assert_close(elastic.grouped_experts(mlp.experts, routed, counts), reference)
        torch.testing.assert_close(elastic.gathered_experts(mlp.experts, routed, counts), reference)


def test_gathered_kernel_chunks_long_inputs(mlp, monkeypatch):
    monkeypatch.setattr(elastic, "_GATHER_CHUNK_BYTES", 1)  # one row per chunk
    x = torch.randn(7, mlp.gate.weight.shape[1])
    counts = torch.zeros(mlp.gate.weight.shape[0], dtype=torch.long)
    counts[[0, 3, 5]] = torch.tensor([2, 4, 1])
    with torch.no_grad():
        torch.testing.assert_close(elastic.gathered_experts(mlp.experts, x, counts),
                                   elastic.looped_experts(mlp.experts, x, counts))


def test_kernel_choice_per_device_dtype_and_grad():
    assert elastic.expert_kernel("cpu", torch.float32, training=False) == "grouped_mm"
    assert elastic.expert_kernel("cpu", torch.float32, training=True) == "loop"
    assert elastic.expert_kernel("cuda", torch.bfloat16, training=False) == "grouped_mm"
    assert elastic.expert_kernel("cuda", torch.float32, training=False) == "gathered"
    assert elastic.expert_kernel("cuda", torch.bfloat16, training=True) == "dense"


def test_missing_grouped_mm_is_logged_and_recorded(mlp, monkeypatch, caplog):
    monkeypatch.setattr(elastic, "_HAS_GROUPED_MM", False)
    monkeypatch.setattr(elastic, "_warned_loop", False)
    assert elastic.expert_kernel("cpu", torch.float32, training=False) == "loop"
    assert elastic.expert_kernel("cuda", torch.bfloat16, training=False) == "gathered"
    x = torch.randn(5, mlp.gate.weight.shape[1])
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=elastic.__name__):
        out = elastic.moe_forward(mlp, x, 4, True)
        elastic.moe_forward(mlp, x, 4, True)
    warnings = [r for r in caplog.records if "no torch._grouped_mm" in r.getMessage()]
    assert len(warnings) == 1 and "expert_kernel='loop'" in warnings[0].getMessage()  # once per process
    monkeypatch.setattr(elastic, "_HAS_GROUPED_MM", True)
    with torch.no_grad():
        torch.testing.assert_close(out, elastic.moe_forward(mlp, x, 4, True))


@pytest.mark.parametrize("kernel", ["grouped_mm", "gathered", "loop"])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_single_row_path_matches_the_batched_rows(mlp, monkeypatch, kernel, norm_topk_prob):
    """Batch-1 decode routes its one row without sorting or scattering rows; each row of a batched
    call must get exactly what that row gets alone, with every kernel."""
    monkeypatch.setattr(elastic, "expert_kernel", lambda device, dtype, training: kernel)
    x = torch.randn(6, mlp.gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = elastic.moe_forward(mlp, x, 5, norm_topk_prob)
        alone = torch.cat([elastic.moe_forward(mlp, x[i : i + 1], 5, norm_topk_prob) for i in range(6)])
    torch.testing.assert_close(alone, batched)
