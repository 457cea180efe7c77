"""A weight quantized by fastload.load.on_the_fly is the parameter bitsandbytes' own Params4bit(...).to(device)
makes, for every quantization option: packed bytes, quantization state (nested included), settings and module."""

from __future__ import annotations

import pytest
import torch

from fastload.load.on_the_fly import quantized_params4bit

OPTIONS = [("nf4", True, 64, torch.bfloat16, torch.uint8), ("nf4", False, 64, torch.float32, torch.uint8),
           ("fp4", True, 128, torch.float16, torch.uint8), ("fp4", False, 64, torch.bfloat16, torch.uint8),
           ("nf4", True, 64, torch.bfloat16, torch.bfloat16), ("nf4", True, 256, torch.float32, torch.uint8)]


def _layer(quant_type, nested, blocksize, storage):
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit(96, 160, bias=False, compute_dtype=torch.bfloat16, compress_statistics=nested,
                             quant_type=quant_type, quant_storage=storage, device="meta")


def _states_equal(a, b) -> None:
    assert a == b  # bitsandbytes' own comparison (values, shapes, types)
    for field in ("absmax", "code", "offset"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y), field
    assert (a.state2 is None) == (b.state2 is None)
    if a.state2 is not None:
        for field in ("absmax", "code"):
            assert torch.equal(getattr(a.state2, field), getattr(b.state2, field)), field
        assert (a.state2.blocksize, a.state2.dtype) == (b.state2.blocksize, b.state2.dtype)
    assert (a.blocksize, a.dtype, a.shape, a.quant_type) == (b.blocksize, b.dtype, b.shape, b.quant_type)


def assert_like_bnb(device: str, quant_type, nested, blocksize, dtype, storage) -> None:
    import bitsandbytes as bnb

    weight = torch.randn(160, 96, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
    ref_layer, our_layer = (_layer(quant_type, nested, blocksize, storage) for _ in range(2))
    for layer in (ref_layer, our_layer):
        layer.weight.blocksize = blocksize
    expected = bnb.nn.Params4bit(weight.clone(), requires_grad=False, **ref_layer.weight.__dict__).to(device)
    got = quantized_params4bit(weight.clone(), our_layer.weight, torch.device(device))
    assert type(got) is type(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got.data.view(torch.uint8), expected.data.view(torch.uint8))  # bytes: packed bf16 holds NaNs
    for attr in ("blocksize", "compress_statistics", "quant_type", "quant_storage", "bnb_quantized", "requires_grad"):
        assert getattr(got, attr) == getattr(expected, attr), attr
    assert got.module is our_layer and our_layer.quant_state is got.quant_state
    _states_equal(expected.quant_state, got.quant_state)


@pytest.mark.parametrize("quant_type, nested, blocksize, dtype, storage", OPTIONS)
def test_quantized_on_the_fly_is_bitsandbytes_own_parameter(quant_type, nested, blocksize, dtype, storage):
    assert_like_bnb("cpu", quant_type, nested, blocksize, dtype, storage)


def test_each_weight_gets_its_own_code_table(monkeypatch):
    """The table is made once and copied per weight: a change to one weight's state leaves the others' alone."""
    layers = [_layer("nf4", True, 64, torch.uint8) for _ in range(2)]
    weights = [torch.randn(160, 96) for _ in range(2)]
    first, second = (quantized_params4bit(w, layer.weight, torch.device("cpu")) for w, layer in zip(weights, layers))
    assert first.quant_state.code is not second.quant_state.code
    first.quant_state.code.zero_()
    assert second.quant_state.code.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine: pytest -m gpu)")
@pytest.mark.parametrize("quant_type, nested, blocksize, dtype, storage", OPTIONS)
def test_quantized_on_the_fly_on_the_gpu_is_bitsandbytes_own_parameter(quant_type, nested, blocksize, dtype, storage):
    assert_like_bnb("cuda", quant_type, nested, blocksize, dtype, storage)
