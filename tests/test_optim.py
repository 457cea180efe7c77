"""The default optimizer is bitsandbytes' AdamW8bit, stepping without a device synchronization per parameter: the
same updates as bitsandbytes' own step, bit for bit."""

from __future__ import annotations

import pytest
import torch

from fastload import FastModel


def _params(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    # 8-bit state (>= 4096 elements), a 32-bit one (small), a frozen one without a gradient
    shapes = [(16, 576), (1536, 16), (16, 64), (8, 8)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    return params


def _steps(optimizer, params, steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params[:-1]:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        params[-1].grad = None
        optimizer.step()
    return [p.detach().clone() for p in params]


def test_default_optimizer_updates_exactly_as_bitsandbytes_adamw8bit():
    import bitsandbytes as bnb

    from fastload.adamw8bit import AdamW8bitNoSync

    ours, theirs = _params(), _params()
    kwargs = dict(lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99))
    after_ours = _steps(AdamW8bitNoSync(ours, **kwargs), ours)
    after_theirs = _steps(bnb.optim.AdamW8bit(theirs, **kwargs), theirs)
    start = _params()
    for mine, reference, before in zip(after_ours, after_theirs, start):
        assert torch.equal(mine, reference)
    assert not torch.equal(after_ours[0], start[0]) and torch.equal(after_ours[-1], start[-1])


def test_get_optimizer_gives_the_no_sync_adamw8bit_with_8bit_state(tiny_llama):
    import bitsandbytes as bnb

    model, _ = FastModel.from_pretrained(tiny_llama, max_seq_length=32)
    opt = FastModel.get_optimizer(model)
    assert isinstance(opt, bnb.optim.AdamW8bit) and type(opt).__name__ == "AdamW8bitNoSync"
    assert opt.state_dict()["param_groups"][0]["lr"] == pytest.approx(2e-4)
