"""The stored 4-bit weight rebuilt without host-device syncs (fastload.load.prequantized) is bitsandbytes' own
Params4bit.from_prequantized, attribute for attribute, for every quantization option a store entry can hold."""

from __future__ import annotations

import pytest
import torch

from fastload.load.prequantized import params4bit, quant_state


def stored(quant_type: str, nested: bool, dtype=torch.bfloat16):
    """A Linear4bit quantized on the CPU and its saved tensors, as a store entry holds them (prefix stripped)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=dtype, compress_statistics=nested,
                              quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 64, dtype=dtype), requires_grad=False,
                                     compress_statistics=nested, quant_type=quant_type)
    layer = layer.to("cpu")
    saved = layer.state_dict()
    return saved["weight"], {k[len("weight."):]: v for k, v in saved.items() if k.startswith("weight.")}


def assert_same_state(mine, theirs) -> None:
    for field in ("absmax", "code", "offset"):
        a, b = getattr(mine, field), getattr(theirs, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device) and torch.equal(a, b), field
    for field in ("shape", "dtype", "blocksize", "quant_type", "nested"):
        assert getattr(mine, field) == getattr(theirs, field), field
    assert (mine.state2 is None) == (theirs.state2 is None)
    if theirs.state2 is not None:
        assert_same_state(mine.state2, theirs.state2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_a_stored_weight_becomes_the_parameter_bitsandbytes_builds(quant_type, nested):
    import bitsandbytes as bnb

    data, stats = stored(quant_type, nested)
    theirs_module, mine_module = bnb.nn.Linear4bit(64, 48, bias=False), bnb.nn.Linear4bit(64, 48, bias=False)
    theirs = bnb.nn.Params4bit.from_prequantized(data=data, quantized_stats=dict(stats), requires_grad=False,
                                                 device=torch.device("cpu"), module=theirs_module)
    mine = params4bit(data, dict(stats), torch.device("cpu"), mine_module)
    assert type(mine) is type(theirs) and torch.equal(mine, theirs) and not mine.requires_grad
    assert mine.__dict__.keys() == theirs.__dict__.keys()
    for name, value in theirs.__dict__.items():
        if name == "quant_state":
            assert_same_state(mine.quant_state, value)
        elif name == "module":
            assert mine.module is mine_module
        else:
            assert getattr(mine, name) == value, name
    assert mine_module.quant_state is mine.quant_state
    assert torch.equal(bnb.functional.dequantize_4bit(mine, mine.quant_state),
                       bnb.functional.dequantize_4bit(theirs, theirs.quant_state))


def test_stats_in_another_layout_go_to_bitsandbytes_own_call():
    """A packed state left on a device other than the host, or unpacked fields, are bnb's to read: None here."""
    data, stats = stored("nf4", True)
    unpacked = {k: v for k, v in stats.items() if not k.startswith("quant_state.")}
    assert quant_state(unpacked, torch.device("cpu")) is None
    assert quant_state({**stats, "extra.field": torch.zeros(1)}, torch.device("cpu")) is None
