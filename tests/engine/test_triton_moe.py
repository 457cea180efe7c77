"""The fused MoE kernels (fastload.engine.triton.moe) against transformers' unfused arithmetic, forward and backward.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py; small shapes): fp32
must match to round-off (1e-5 relative), which any wrong index or formula breaks. The interpreter truncates when it
casts to bf16 where a GPU rounds to nearest (a bias the routing weight's gradient sums over a row), so bf16 there is
held to 5e-2 relative; on a GPU (the gpu-marked tests, qwen3-moe-small's shapes) nearly every bf16 value must be
identical, the gradients within 1e-2 relative.
"""

from __future__ import annotations

import pytest
import torch
from interpreted_kernels import count_moe_launches, needs_interpreter

from fastload.engine.triton import moe


@pytest.fixture
def interpreted(monkeypatch):
    """The kernels launch on the CPU tensors these tests build (in Triton's interpreter)."""
    count_moe_launches(monkeypatch, on_cpu=True)


def reference_gate(gate_up, delta, routing):
    """transformers' _default_apply_gate on the projection plus its LoRA product, then the routing weight."""
    gate, up = (gate_up + delta if delta is not None else gate_up).chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    return h * routing if routing is not None else h


def reference_combine(y, delta, inverse, k):
    """expert_lora's PermuteRows and transformers' sum over each token's k rows."""
    y = y + delta if delta is not None else y
    return y[inverse].view(-1, k, y.shape[-1]).sum(dim=1)


def relative(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gate_inputs(rows, inter, dtype, device="cpu", seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    gate_up = torch.randn(rows, 2 * inter, generator=gen, device=device).to(dtype).requires_grad_()
    delta = (0.3 * torch.randn(rows, 2 * inter, generator=gen, device=device)).to(dtype).requires_grad_()
    routing = torch.rand(rows, 1, generator=gen, device=device).to(dtype).requires_grad_()
    dh = torch.randn(rows, inter, generator=gen, device=device).to(dtype)
    return gate_up, delta, routing, dh


def routed(tokens, k, width, dtype, device="cpu", seed=0):
    """Rows of k experts' outputs per token in expert order, with the permutation expert_lora builds."""
    gen = torch.Generator(device).manual_seed(seed)
    experts = torch.randint(0, 5, (tokens * k,), generator=gen, device=device)
    _, perm = torch.sort(experts)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=device)
    y = torch.randn(tokens * k, width, generator=gen, device=device).to(dtype).requires_grad_()
    delta = (0.3 * torch.randn(tokens * k, width, generator=gen, device=device)).to(dtype).requires_grad_()
    grad = torch.randn(tokens, width, generator=gen, device=device).to(dtype)
    return y, delta, inverse, perm // k, grad


def check_gate(rows, inter, dtype, with_delta, with_routing, tol, device="cpu"):
    """Both outputs used, as the lever uses them: their gradients are added inside the backward kernel."""
    gate_up, delta, routing, dh = gate_inputs(rows, inter, dtype, device)
    dh2 = gate_inputs(rows, inter, dtype, device, seed=1)[3]
    delta, routing = (delta if with_delta else None), (routing if with_routing else None)
    inputs = [t for t in (gate_up, delta, routing) if t is not None]
    ref = reference_gate(gate_up, delta, routing)
    ours, again = moe.gated_activation(gate_up, delta, routing)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape and again.data_ptr() == ours.data_ptr()
    assert relative(ours, ref) < tol
    mine_all = torch.autograd.grad((ours, again), inputs, (dh, dh2))
    for mine, theirs in zip(mine_all, torch.autograd.grad(ref, inputs, dh + dh2)):
        assert mine.shape == theirs.shape
        assert relative(mine, theirs) < tol
    return ours, ref


@needs_interpreter
@pytest.mark.parametrize("with_delta,with_routing", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_gated_activation_matches_transformers_gate(interpreted, with_delta, with_routing, dtype, tol):
    """37 rows (not a multiple of the 16-row tile), 300 columns (two column tiles, the second partial)."""
    check_gate(37, 300, dtype, with_delta, with_routing, tol)


@needs_interpreter
def test_gated_activation_skips_the_routing_gradient_nobody_asks_for(interpreted):
    gate_up, delta, routing, dh = gate_inputs(20, 64, torch.float32)
    routing.requires_grad_(False)
    out, _ = moe.gated_activation(gate_up, delta, routing)  # the second output unused: no gradient reaches it
    d_gate_up, d_delta = torch.autograd.grad(out, (gate_up, delta), dh)
    (expected,) = torch.autograd.grad(reference_gate(gate_up, delta, routing), gate_up, dh)
    assert relative(d_gate_up, expected) < 1e-5 and torch.equal(d_gate_up, d_delta)


@needs_interpreter
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_combine_matches_permute_and_sum(interpreted, with_delta, dtype, tol):
    """13 tokens, k = 3, 1100 columns (two column tiles of 1024, the second partial)."""
    y, delta, inverse, token, grad = routed(13, 3, 1100, dtype)
    delta = delta if with_delta else None
    inputs = [t for t in (y, delta) if t is not None]
    ref = reference_combine(y, delta, inverse, 3)
    ours = moe.combine(y, delta, inverse, token, 3)
    assert ours.shape == ref.shape and relative(ours, ref) < tol
    for mine, theirs in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        assert torch.equal(mine, theirs)  # a gather either way: exact


@needs_interpreter
def test_gather_sum_is_spread_rows_gradient(interpreted):
    """SpreadRows' backward: each token's k rows (found through inverse) summed."""
    _, _, inverse, _, _ = routed(9, 4, 40, torch.float32)
    grad = torch.randn(36, 40)
    assert relative(moe.gather_sum(grad, inverse, 4), grad[inverse].view(9, 4, 40).sum(dim=1)) < 1e-6


def test_kernels_run_only_on_contiguous_cuda_tensors_of_one_dtype():
    assert not moe.runs(torch.zeros(4, 8), None)  # the CPU: transformers' arithmetic


# -- GPU: qwen3-moe-small's shapes (4,096 tokens x 8 experts, expert width 768, hidden 2048), bf16 ----------------

@pytest.mark.gpu
def test_gpu_gated_activation_is_transformers_gate_in_bf16():
    gate_up, delta, routing, dh = gate_inputs(32768, 768, torch.bfloat16, "cuda")
    assert moe.runs(gate_up, delta, routing)
    ours, ref = check_gate(32768, 768, torch.bfloat16, True, True, 1e-2, "cuda")
    assert (ours != ref).float().mean() < 0.01  # the same rounding steps: nearly every value identical


@pytest.mark.gpu
def test_gpu_combine_is_permute_and_sum_in_bf16():
    y, delta, inverse, token, grad = routed(4096, 8, 2048, torch.bfloat16, "cuda")
    assert moe.runs(y, delta)
    ref = reference_combine(y, delta, inverse, 8)
    ours = moe.combine(y, delta, inverse, token, 8)
    assert (ours != ref).float().mean() < 0.01 and relative(ours, ref) < 1e-2
    for mine, theirs in zip(torch.autograd.grad(ours, (y, delta), grad), torch.autograd.grad(ref, (y, delta), grad)):
        assert torch.equal(mine, theirs)
    assert relative(moe.gather_sum(y.detach(), inverse, 8), y.detach()[inverse].view(4096, 8, -1).sum(1)) < 1e-2
