"""The default optimizer is bitsandbytes' AdamW8bit with less host work per step (no synchronization per parameter,
one update launch for the LoRA matrices): the same updates as bitsandbytes' own step, bit for bit."""

from __future__ import annotations

import pytest
import torch

from fastload import FastModel

# LoRA-like matrices (sizes multiples of 256, 8-bit state), one 8-bit-sized but not a multiple of 256, one small
# (bitsandbytes keeps 32-bit state below 4096 values), one that never gets a gradient
SHAPES = [(16, 576), (1536, 16), (16, 1536), (576, 16), (4100, 1), (16, 64), (8, 8)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _steps(optimizer, params, steps=3, seed=1, skip=()):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if i == len(params) - 1 or (step, i) in skip else torch.randn(p.shape, generator=g)
        optimizer.step()
    return [p.detach().clone() for p in params]


def _pair(**kwargs):
    import bitsandbytes as bnb

    from fastload.train.adamw8bit import AdamW8bitNoSync

    ours, theirs = _params(), _params()
    kwargs = {"lr": 1e-2, "weight_decay": 0.01, "betas": (0.9, 0.99), **kwargs}
    return ours, AdamW8bitNoSync(ours, **kwargs), theirs, bnb.optim.AdamW8bit(theirs, **kwargs)


def test_default_optimizer_updates_exactly_as_bitsandbytes_adamw8bit():
    ours, ours_opt, theirs, theirs_opt = _pair()
    after_ours, after_theirs = _steps(ours_opt, ours), _steps(theirs_opt, theirs)
    start = _params()
    assert all(torch.equal(a, b) for a, b in zip(after_ours, after_theirs))
    assert not torch.equal(after_ours[0], start[0]) and torch.equal(after_ours[-1], start[-1])
    packs = ours_opt._pack_cache[0][1]
    assert len(packs) == 1 and len(packs[0].members) == 4  # the four LoRA-like matrices share one update
    for p, q in zip(ours, theirs):  # and the state each parameter shows is bitsandbytes' state
        for name in ("state1", "state2", "absmax1", "absmax2"):
            if name in theirs_opt.state[q]:
                assert torch.equal(ours_opt.state[p][name], theirs_opt.state[q][name]), name


def test_a_missing_gradient_gets_bitsandbytes_per_parameter_semantics():
    """bitsandbytes skips a parameter without a gradient (no momentum step): the flat update must not move it."""
    ours, ours_opt, theirs, theirs_opt = _pair()
    skip = {(1, 0), (2, 2)}
    after_ours, after_theirs = _steps(ours_opt, ours, skip=skip), _steps(theirs_opt, theirs, skip=skip)
    assert all(torch.equal(a, b) for a, b in zip(after_ours, after_theirs))
    assert ours_opt.state[ours[0]]["step"] == 2 and ours_opt.state[ours[1]]["step"] == 3


@pytest.mark.parametrize("resume_with", ["ours", "bitsandbytes"])
@pytest.mark.parametrize("alone", [False, True], ids=["packed", "large-alone"])
def test_state_dict_resumes_the_same_training_with_either_optimizer(tmp_path, resume_with, alone, monkeypatch):
    """A checkpoint's optimizer state (Trainer's optimizer.pt) resumes bit for bit, into fastload's or bitsandbytes'
    optimizer, and fastload's loads one saved by bitsandbytes'; with matrices updated alone too."""
    import bitsandbytes as bnb

    from fastload.train import adamw8bit
    from fastload.train.adamw8bit import AdamW8bitNoSync

    if alone:
        monkeypatch.setattr(adamw8bit, "ALONE_VALUES", 20000)

    ours, ours_opt, theirs, theirs_opt = _pair()
    _steps(ours_opt, ours, steps=2)
    _steps(theirs_opt, theirs, steps=2)
    torch.save(ours_opt.state_dict(), tmp_path / "ours.pt")
    torch.save(theirs_opt.state_dict(), tmp_path / "theirs.pt")
    reference = _steps(theirs_opt, theirs, steps=2, seed=7)

    cls = AdamW8bitNoSync if resume_with == "ours" else bnb.optim.AdamW8bit
    for saved in ("ours.pt", "theirs.pt"):
        params = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        resumed = cls(params, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99))
        resumed.load_state_dict(torch.load(tmp_path / saved, weights_only=False))
        after = _steps(resumed, params, steps=2, seed=7)
        assert all(torch.equal(a, b) for a, b in zip(after, reference)), saved


def test_get_optimizer_gives_the_lean_adamw8bit_with_8bit_state(tiny_llama):
    import bitsandbytes as bnb

    model, _ = FastModel.from_pretrained(tiny_llama, max_seq_length=32)
    opt = FastModel.get_optimizer(model)
    assert isinstance(opt, bnb.optim.AdamW8bit) and type(opt).__name__ == "AdamW8bitNoSync"
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)
    ids = torch.randint(0, 300, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    states = [opt.state[p] for p in opt.state if p.numel() >= 4096]  # bitsandbytes' 8-bit threshold
    assert states and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)


def test_large_models_pack_in_bounded_chunks(monkeypatch):
    """The gathered values and gradients of a pack are temporary memory: a pack stays under PACK_VALUES."""
    from fastload.train import adamw8bit

    monkeypatch.setattr(adamw8bit, "PACK_VALUES", 24576 + 9216)
    ours, ours_opt, theirs, theirs_opt = _pair()
    after_ours, after_theirs = _steps(ours_opt, ours), _steps(theirs_opt, theirs)
    assert all(torch.equal(a, b) for a, b in zip(after_ours, after_theirs))
    assert [len(p.members) for p in ours_opt._pack_cache[0][1]] == [2, 2]


def test_large_matrices_are_updated_in_place_without_a_pack(monkeypatch):
    """Stacked expert adapters (millions of values each) are updated where they are: gathering them into a pack and
    back costs more GPU time than the launches it saves. The others still share one update; the results are
    bitsandbytes'."""
    from fastload.train import adamw8bit

    monkeypatch.setattr(adamw8bit, "ALONE_VALUES", 20000)  # (1536, 16) and (16, 1536) count as large here
    ours, ours_opt, theirs, theirs_opt = _pair()
    after_ours, after_theirs = _steps(ours_opt, ours), _steps(theirs_opt, theirs)
    assert all(torch.equal(a, b) for a, b in zip(after_ours, after_theirs))
    packs = ours_opt._pack_cache[0][1]
    assert [[tuple(p.shape) for p in pack.members] for pack in packs] == [[(16, 576), (576, 16)], [(1536, 16)],
                                                                           [(16, 1536)]]
    for p in ours[1:3]:  # the large ones' state is their own tensor, not a view of a pack's
        assert ours_opt.state[p]["state1"]._base is None and ours_opt.state[p]["state1"].numel() == p.numel()


def test_a_large_matrix_whose_state_was_made_strided_steps_as_bitsandbytes(monkeypatch):
    """bitsandbytes makes a parameter's state like the parameter: one transposed then (its update makes the parameter
    contiguous, not the state) has strided state, which an in-place update over flat state cannot take."""
    import bitsandbytes as bnb

    from fastload.train import adamw8bit

    monkeypatch.setattr(adamw8bit, "ALONE_VALUES", 4096)

    def run(cls):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(64, 128).t())  # strided when its state is made
        b = torch.nn.Parameter(torch.randn(128, 64))
        opt = cls([a, b], lr=1e-3)
        g = torch.Generator().manual_seed(1)
        a.grad = torch.randn(a.shape, generator=g)
        opt.step()  # b has no gradient yet
        for _ in range(2):
            a.grad, b.grad = torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)
            opt.step()
        return a.detach().clone(), b.detach().clone()

    ours, theirs = run(adamw8bit.AdamW8bitNoSync), run(bnb.optim.AdamW8bit)
    assert all(torch.equal(x, y) for x, y in zip(ours, theirs))


def test_steps_after_a_missing_gradient_match_and_the_pack_comes_back():
    """A member that missed a gradient has a lower step count (Adam's bias correction differs): it must not be
    stepped with the others' count, and once counts are regrouped the LoRA matrices share launches again."""
    ours, ours_opt, theirs, theirs_opt = _pair()
    skip = {(1, 0)}
    after_ours = _steps(ours_opt, ours, steps=5, skip=skip)
    after_theirs = _steps(theirs_opt, theirs, steps=5, skip=skip)
    assert all(torch.equal(a, b) for a, b in zip(after_ours, after_theirs))
    assert [ours_opt.state[p]["step"] for p in ours[:4]] == [4, 5, 5, 5]
    packs = ours_opt._pack_cache[0][1]
    assert [len(p.members) for p in packs] == [3]  # the three matrices in step; the fourth alone


def test_loading_a_checkpoint_into_a_stepped_optimizer_resumes_from_the_checkpoint(tmp_path):
    import bitsandbytes as bnb

    ours, ours_opt, _, _ = _pair()
    _steps(ours_opt, ours, steps=2)
    saved_values = [p.detach().clone() for p in ours]
    torch.save(ours_opt.state_dict(), tmp_path / "state.pt")
    _steps(ours_opt, ours, steps=2, seed=3)  # training goes on, then is rolled back to the checkpoint
    with torch.no_grad():
        for p, v in zip(ours, saved_values):
            p.copy_(v)
    ours_opt.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    after = _steps(ours_opt, ours, steps=2, seed=7)

    params = [torch.nn.Parameter(v.clone()) for v in saved_values]
    reference = bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99))
    reference.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(after, _steps(reference, params, steps=2, seed=7)))


def test_each_param_group_keeps_its_own_hyperparameters():
    import bitsandbytes as bnb

    from fastload.train.adamw8bit import AdamW8bitNoSync

    def build(cls):
        params = _params() + _params(seed=5)[:4]
        opt = cls(params[:7], lr=1e-2, weight_decay=0.0, betas=(0.9, 0.99))
        opt.add_param_group({"params": params[7:], "lr": 3e-2, "weight_decay": 0.1, "betas": (0.8, 0.9)})
        return params, opt

    (ours, ours_opt), (theirs, theirs_opt) = build(AdamW8bitNoSync), build(bnb.optim.AdamW8bit)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = None if p is ours[6] else torch.randn(p.shape, generator=g)
            q.grad = None if p.grad is None else p.grad.clone()
        ours_opt.step()
        theirs_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert [len(p.members) for p in ours_opt._pack_cache[1][1]] == [4]


def test_a_per_parameter_override_set_during_training_is_honoured():
    """bitsandbytes reads GlobalOptimManager overrides at every step, for whichever member of a pack they name."""
    from bitsandbytes.optim import GlobalOptimManager

    manager = GlobalOptimManager.get_instance()
    ours, ours_opt, theirs, theirs_opt = _pair()
    try:
        _steps(ours_opt, ours, steps=1)
        _steps(theirs_opt, theirs, steps=1)
        manager.override_config(ours[1], "lr", 0.0)
        manager.override_config(theirs[1], "lr", 0.0)
        frozen = ours[1].detach().clone()
        after_ours, after_theirs = _steps(ours_opt, ours, steps=2, seed=4), _steps(theirs_opt, theirs, steps=2, seed=4)
    finally:
        for p in ours + theirs:
            manager.pid2config.pop(id(p), None)
    assert all(torch.equal(a, b) for a, b in zip(after_ours, after_theirs))
    assert torch.equal(after_ours[1], frozen) and not torch.equal(after_ours[0], _params()[0])


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(betas=(0.9, 1.5)), dict(momentum=0.9)])
def test_bad_optimizer_settings_are_fastload_errors_naming_them(tiny_llama, bad):
    from fastload.errors import InvalidOption

    model, _ = FastModel.from_pretrained(tiny_llama, max_seq_length=32)
    with pytest.raises(InvalidOption) as err:
        FastModel.get_optimizer(model, **bad)
    name = next(iter(bad))
    assert f"{name}=" in str(err.value) and "what to do" in str(err.value)


def test_weight_decay_spares_biases_and_norms_as_transformers_does(tiny_llama):
    """FastModel.get_optimizer groups like transformers' adamw_8bit: with weight decay and no gradient, a trained
    norm weight (and a bias) stays put while a LoRA matrix shrinks."""
    model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    norm = model.get_base_model().model.layers[0].input_layernorm.weight
    norm.requires_grad_(True)
    lora = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    optimizer = FastModel.get_optimizer(model, lr=0.1, weight_decay=0.5)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    assert any(p is norm for p in optimizer.param_groups[1]["params"])
    norm_before, lora_before = norm.detach().clone(), lora.detach().clone()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(norm, norm_before)
    assert torch.allclose(lora, lora_before * (1 - 0.1 * 0.5))
    without = FastModel.get_optimizer(model, lr=0.1)  # no decay asked: transformers' two groups, both without
    assert [g["weight_decay"] for g in without.param_groups] == [0.0, 0.0]


def test_optimizer_state_of_one_group_loads_into_transformers_two_groups(tiny_llama):
    """A checkpoint's optimizer state from fastload's earlier single group (or transformers' groups with an empty
    one) resumes into today's grouping: same moments, same next update."""
    from fastload.train.adamw8bit import AdamW8bitNoSync

    model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    old = AdamW8bitNoSync(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    old.step()
    new = FastModel.get_optimizer(model, lr=1e-2)
    assert len(new.param_groups) == 2 and not new.param_groups[1]["params"]
    new.load_state_dict(old.state_dict())
    for p in params:
        assert torch.equal(new.state[p]["state1"], old.state[p]["state1"]) and new.state[p]["step"] == 1
    before = [p.detach().clone() for p in params]
    new.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


def test_a_trained_embeddings_32bit_state_stays_with_its_own_optimizer(tiny_llama):
    """bitsandbytes' global override manager would give the next optimizer's first parameter 32-bit state too;
    fastload's setting lives on the optimizer that asked for it."""
    model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(True)
    first = FastModel.get_optimizer(model)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    first.step()
    assert first.state[embedding]["state1"].dtype == torch.float32
    other, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    second = FastModel.get_optimizer(other)
    trained = [p for p in other.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.randn_like(p)
    second.step()
    big = [p for p in trained if p.numel() >= 4096]  # bitsandbytes keeps smaller ones in 32 bits anyway
    assert big and all(second.state[p]["state1"].dtype == torch.uint8 for p in big)
