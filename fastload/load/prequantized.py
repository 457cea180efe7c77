"""A stored 4-bit weight and its quantization state put on the device without waiting for the device.

bitsandbytes' Params4bit.from_prequantized reads the packed state (a JSON string stored as a uint8 tensor) back with
`.cpu()` and makes the nested offset with `torch.tensor(x).to(device)`: each is a blocking copy, so every one of an 8B
model's 224 weights waited for all the copies the reader threads had queued before it. Here the packed state arrives
on the host (the readers read it there) and the offset is filled on the device, so nothing waits; the state built is
bnb's own, field for field (tests/load/test_prequantized.py compares both on every load option).
"""

from __future__ import annotations

import json

import torch

PACKED_STATE_SUFFIXES = ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")


def is_packed_state(name: str) -> bool:
    """Whether this checkpoint tensor is a weight's packed quantization state (read on the host)."""
    return name.endswith(PACKED_STATE_SUFFIXES)


def params4bit(data: torch.Tensor, stats: dict[str, torch.Tensor], device, module):
    """Params4bit.from_prequantized(data, stats, requires_grad=False, device=device, module=module), the same
    parameter, built without a host-device sync; bnb's own call where the stats are not in the usual layout."""
    import bitsandbytes as bnb

    state = quant_state(stats, device)
    if state is None:
        return bnb.nn.Params4bit.from_prequantized(data=data, quantized_stats=stats, requires_grad=False,
                                                   device=device, module=module)
    param = torch.Tensor._make_subclass(bnb.nn.Params4bit, data.to(device))
    param.requires_grad = False
    param.quant_state = state
    param.blocksize = state.blocksize
    param.compress_statistics = state.nested
    param.quant_type = state.quant_type
    param.bnb_quantized = True
    param.quant_storage = data.dtype
    param.module = module
    module.quant_state = state
    return param


def quant_state(stats: dict[str, torch.Tensor], device):
    """bnb's QuantState.from_dict for one packed state on the host, or None for any other layout."""
    from bitsandbytes.functional import QuantState

    packed = [k for k in stats if is_packed_state(k)]
    if len(packed) != 1 or stats[packed[0]].device.type != "cpu" or any("." in k for k in stats if k != packed[0]):
        return None
    fields = {k: v for k, v in stats.items() if k != packed[0]}
    fields.update(json.loads(bytes(stats[packed[0]].numpy()).decode("utf-8")))
    if not set(fields) <= set(QuantState.valid_qs_keys):
        return None
    offset = state2 = None
    if "nested_absmax" in fields:
        offset = torch.full((), float(fields["nested_offset"]), dtype=torch.get_default_dtype(), device=device)
        state2 = QuantState(absmax=fields["nested_absmax"].to(device), blocksize=fields["nested_blocksize"],
                            code=fields["nested_quant_map"].to(device), dtype=getattr(torch, fields["nested_dtype"]))
    return QuantState(quant_type=fields["quant_type"], absmax=fields["absmax"].to(device),
                      blocksize=fields["blocksize"], code=fields["quant_map"].to(device),
                      dtype=getattr(torch, fields["dtype"]),
                      shape=torch.Size(fields["shape"]) if fields["shape"] is not None else None,
                      offset=offset, state2=state2)
