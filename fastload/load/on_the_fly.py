"""A 16-bit weight quantized to bitsandbytes 4-bit on its device without waiting for the device.

bitsandbytes' quantize_4bit builds its 16-value code table with `torch.tensor(values, device=...)` for every weight:
a blocking host-to-device copy, so on a GPU each of an 8B model's 224 weights waited for every copy and kernel queued
before it, and the loading thread could never run ahead of the device. Here the table is made once per quant type
and device and copied on the device for each weight; the quantization is bitsandbytes' own operator and the state
its own, field for field (tests/load/test_on_the_fly.py compares both for every quantization option).
"""

from __future__ import annotations

import functools

import torch


def quantized_params4bit(value: torch.Tensor, template, device):
    """`bnb.nn.Params4bit(value, requires_grad=False, **template.__dict__).to(device)` for a `value` already on
    `device`: the same parameter and quantization state, with no host-device sync. `template` is the layer's
    unquantized Params4bit (its settings and module)."""
    import bitsandbytes as bnb

    param = bnb.nn.Params4bit(value, requires_grad=False, **template.__dict__)
    if value.device != torch.device(device) or not hasattr(torch.ops.bitsandbytes, "quantize_4bit"):
        return param.to(device)  # bitsandbytes' own path: moved there, or an operator this does not know
    packed, state = quantize_4bit(param.data.contiguous(), param.blocksize, param.compress_statistics,
                                  param.quant_type, param.quant_storage)
    param.data = packed
    param.quant_state = state
    if param.module is not None:
        param.module.quant_state = state
    param.bnb_quantized = True
    return param


def quantize_4bit(weight: torch.Tensor, blocksize: int | None, nested: bool, quant_type: str, storage: torch.dtype):
    """bitsandbytes.functional.quantize_4bit(weight, blocksize=..., compress_statistics=nested, quant_type=...,
    quant_storage=storage): (packed weight, QuantState), the code table copied on the device."""
    from bitsandbytes.functional import QuantState, quantize_blockwise

    blocksize = 64 if blocksize is None else blocksize
    packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(weight, blocksize, quant_type, storage)
    code = _code(quant_type, weight.device).clone()
    if not nested:
        return packed, QuantState(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                                  code=code, quant_type=quant_type)
    offset = absmax.mean()
    nested_absmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
    return packed, QuantState(absmax=nested_absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                              code=code, quant_type=quant_type, offset=offset, state2=state2)


@functools.cache
def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' code table of `quant_type` on `device`, made (with its one blocking copy) once."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(quant_type, device=device)
