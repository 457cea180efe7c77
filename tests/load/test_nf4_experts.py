"""NF4ExpertStack: a 4-bit expert stack that computes as bitsandbytes' dequantized values, stays packed where it
only moves or is viewed, and quantizes back what is written into it.

The reference is bitsandbytes itself: quantize_4bit then dequantize_4bit of the same weight. Results computed on the
stack must equal the same operation on those dequantized values exactly (the same kernel produces them).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from fastload.load.nf4_experts import NF4ExpertStack, quantize_stack


def weight(shape=(4, 96, 64), dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bnb_round_trip(w, quant_type="nf4", double_quant=True):
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=double_quant,
                                    quant_type=quant_type)
    return F.dequantize_4bit(packed, state)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stack_reads_as_bitsandbytes_dequantized_values(quant_type, double_quant, dtype):
    w = weight(dtype=dtype)
    stack = quantize_stack(w, quant_type, double_quant)
    expected = bnb_round_trip(w, quant_type, double_quant)
    assert isinstance(stack, NF4ExpertStack) and stack.shape == w.shape and stack.dtype == dtype
    assert torch.equal(stack.dequantize(), expected)
    assert stack.packed.dtype == torch.uint8 and stack.packed.numel() == w.numel() // 2
    x = torch.randn(5, 64).to(dtype)
    assert torch.equal(x @ stack[1].t(), x @ expected[1].t())  # any op: on the dequantized values
    assert torch.equal(stack * 2, expected * 2)
    for e in (0, 3, -1):  # one expert, as transformers' eager experts forward reads it: only its blocks dequantized
        assert torch.equal(stack[e], expected[e]) and torch.equal(stack.transpose(1, 2)[e], expected[e].t())


def test_views_and_moves_stay_packed():
    w = weight()
    stack = quantize_stack(w)
    dense = stack.dequantize()
    t = stack.transpose(-2, -1)
    assert isinstance(t, NF4ExpertStack) and t.packed is stack.packed and t.shape == (4, 64, 96)
    assert torch.equal(t.dequantize(), dense.transpose(-2, -1))
    assert torch.equal(torch.bmm(torch.ones(4, 3, 64), t), torch.bmm(torch.ones(4, 3, 64), dense.transpose(-2, -1)))
    assert isinstance(stack.detach(), NF4ExpertStack)
    wide = stack.to(torch.float64)
    assert isinstance(wide, NF4ExpertStack) and wide.dtype == torch.float64
    assert torch.equal(wide.dequantize(), dense.double())


def test_a_module_holding_it_moves_copies_and_pickles_with_it():
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(quantize_stack(weight()), requires_grad=False)
    dense = module.w.dequantize()
    module.double()
    assert isinstance(module.w, NF4ExpertStack) and isinstance(module.w, torch.nn.Parameter)
    assert module.w.dtype == torch.float64 and torch.equal(module.w.dequantize(), dense.double())
    module.float()
    twin = copy.deepcopy(module)
    assert isinstance(twin.w, torch.nn.Parameter) and twin.w.packed.data_ptr() != module.w.packed.data_ptr()
    twin.w.packed.zero_()
    assert torch.equal(module.w.dequantize(), dense)  # the copy owns its bytes
    back = pickle.loads(pickle.dumps(module))
    assert isinstance(back.w, torch.nn.Parameter) and torch.equal(back.w.dequantize(), dense)
    module.to("meta")  # another device: the packed bytes and every statistic go along (as .cuda() moves them)
    assert isinstance(module.w, NF4ExpertStack) and module.w.device.type == "meta"
    assert all(t.device.type == "meta" for t in (module.w.packed, *module.w.stats.values()))


def test_writes_are_quantized_back_into_every_view():
    """peft merges with `param.data += delta`: the stack then holds the 4-bit form of W + delta, as peft's merge into a
    bitsandbytes Linear4bit does; load_state_dict's copy_ from a dense tensor quantizes it."""
    param = torch.nn.Parameter(quantize_stack(weight()), requires_grad=False)
    view = param.transpose(-2, -1)
    delta = weight(seed=1) * 0.1
    expected = bnb_round_trip(param.dequantize() + delta)
    with torch.no_grad():
        param.data += delta
    assert isinstance(param, NF4ExpertStack) and torch.equal(param.dequantize(), expected)
    assert torch.equal(view.dequantize(), expected.transpose(-2, -1))
    other = weight(seed=2)
    with torch.no_grad():
        param.copy_(other)
    assert torch.equal(param.dequantize(), bnb_round_trip(other))


def test_autograd_keeps_the_packed_stack_for_backward():
    """transformers' grouped_mm experts forward multiplies by the transposed stack: the tensor saved for the input's
    gradient is the packed view, and the gradient equals the one through the dequantized weight."""
    stack = quantize_stack(weight((4, 64, 32)))
    dense = stack.dequantize()
    x = torch.randn(12, 32, requires_grad=True)
    offsets = torch.tensor([3, 6, 9, 12], dtype=torch.int32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = torch.nn.functional.grouped_mm(x, stack.transpose(-2, -1), offs=offsets)
    y.pow(2).sum().backward()
    assert not [t for t in saved if t.numel() >= dense.numel() and not isinstance(t, NF4ExpertStack)]
    x_ref = x.detach().clone().requires_grad_()
    torch.nn.functional.grouped_mm(x_ref, dense.transpose(-2, -1), offs=offsets).pow(2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
