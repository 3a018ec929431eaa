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


def test_single_row_kernel_on_cpu_is_the_expert_kernel(mlp):
    """The Triton row kernels are CUDA-only; a CPU decode row takes (and records) the CPU kernel."""
    assert elastic.single_row_kernel("cpu", torch.float32, mlp.experts) == "grouped_mm"
    assert not elastic.row_kernels.available(torch.zeros(1, 4), mlp.experts)


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


def _attention_params(block):
    attn = block.layer.self_attn
    return (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.q_norm.weight, attn.k_norm.weight)


def test_shared_storage_keeps_the_parameters_and_follows_their_updates():
    model = tiny_model(["what", "color", "red"])[0]
    block = model.blocks[1]
    params = _attention_params(block)
    values = [p.detach().clone() for p in params]
    keys = list(model.state_dict())
    fused = elastic.shared_storage(params, None)
    assert fused.numel() == sum(p.numel() for p in params)
    assert list(model.state_dict()) == keys and params == _attention_params(block)
    for p, v in zip(params, values):
        torch.testing.assert_close(p.detach(), v)
    assert elastic.shared_storage(params, fused) is fused  # still living in it: no copy
    with torch.no_grad():
        params[1].add_(1.0)  # an optimizer step, in place
    offset = params[0].numel()
    torch.testing.assert_close(fused[offset : offset + params[1].numel()], params[1].detach().reshape(-1))
    x = torch.randn(3, params[0].shape[1])
    (x @ params[0].t()).sum().backward()  # gradients still reach the parameter itself
    assert params[0].grad is not None and params[0].grad.shape == params[0].shape
    model.to(torch.float64)  # .to gives every parameter its own storage again: fused anew
    refused = elastic.shared_storage(params, fused)
    assert refused is not fused and refused.dtype == torch.float64
    assert params[2].data_ptr() == refused.data_ptr() + (params[0].numel() + params[1].numel()) * 8


def test_fused_qk_equals_the_separate_projections_and_norms():
    """The CUDA inference path's math (one q/k/v product, one norm over q and k), checked on CPU."""
    block = tiny_model(["what", "color", "red"])[0].blocks[2]
    attn = block.layer.self_attn
    x = torch.randn(2, 5, attn.q_proj.in_features, generator=torch.Generator().manual_seed(3))
    shape = (2, 5, -1, attn.head_dim)
    with torch.no_grad():
        q = attn.q_norm(attn.q_proj(x)).view(shape).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x)).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        qk, fused_v = block._fused_qk(x, shape)
    torch.testing.assert_close(qk, torch.cat((q, k), dim=1))
    torch.testing.assert_close(fused_v, v)


def test_rope_tables_give_the_rotate_half_rotation():
    model = tiny_model(["what", "color", "red"])[0]
    x = torch.randn(1, 2, 7, model.decoder.model.rotary_emb.inv_freq.numel() * 2)
    positions = torch.arange(7)[None]
    cos, sin = model.decoder.model.rotary_emb(x, positions)
    half = x.shape[-1] // 2
    reference = x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]
    cos, signed_sin = model.rope(positions, x)
    torch.testing.assert_close(elastic.apply_rope(x, cos[:, None], signed_sin[:, None]), reference)
