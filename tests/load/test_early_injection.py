"""peft's injection while a pre-quantized checkpoint is read (fastload.train.early_injection).

The reference is the same load with the injection after the weights (FASTLOAD_EARLY_LORA=0, the path before): the
model must be the same bit for bit — every tensor (the adapters' initial values included), module types, train/eval
flags, trainable parameters and their dtypes, the global generator's state after the load, the logits — and train
the same. Loads it cannot serve (quantized on the fly, a store entry being written, custom LoRA, fused experts) take
the late injection, and a direct load that falls back to transformers' drops the injected skeleton.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fastload import FastModel
from tiny import make_checkpoint

EARLY = "lora_peft_overlapped"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def stored_checkpoint(request, tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp(request.param) / "model", request.param)


def load(path, monkeypatch, early: bool, seed: int = 1, **options):
    """A load with the injection early or late, from the same global generator state; (model, state after)."""
    import torch

    monkeypatch.setenv("FASTLOAD_EARLY_LORA", "1" if early else "0")
    torch.manual_seed(seed)
    model, _ = FastModel.from_pretrained(str(path), **options)
    return model, torch.get_rng_state()


def store_entry(path, monkeypatch, **options) -> None:
    from fastload.load.background_store import wait_for_store_writes

    first, _ = load(path, monkeypatch, early=True, **options)
    assert EARLY not in first.fastload.load_phases  # the first load writes the entry from the model: late
    wait_for_store_writes()


def assert_same_peft_model(late, early, device="cpu") -> None:
    import torch

    assert {n: type(m) for n, m in late.named_modules()} == {n: type(m) for n, m in early.named_modules()}
    assert {n: m.training for n, m in late.named_modules()} == {n: m.training for n, m in early.named_modules()}
    assert [(n, p.requires_grad, p.dtype, p.device) for n, p in late.named_parameters()] == \
        [(n, p.requires_grad, p.dtype, p.device) for n, p in early.named_parameters()]
    expected, got = late.state_dict(), early.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert late.peft_config["default"].to_dict() == early.peft_config["default"].to_dict()
    assert list(late.fastload_engine) == list(early.fastload_engine)
    ids = torch.randint(8, late.config.vocab_size - 8, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        assert torch.equal(late(input_ids=ids).logits, early(input_ids=ids).logits)
    losses = []
    for model in (late, early):
        optimizer = FastModel.get_optimizer(model, lr=1e-2)
        model.train()
        steps = []
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps.append(loss.item())
        losses.append(steps)
    assert losses[0] == losses[1]


NOTEBOOK_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("seed, targets",
                         [(None, None), (7, None), (None, NOTEBOOK_TARGETS), (7, ["q_proj", "v_proj"])])
def test_a_store_load_injects_while_reading_and_builds_the_same_model(stored_checkpoint, monkeypatch, seed, targets):
    """The default LoRA, and target_modules named as Unsloth's notebooks name them (or a few of them)."""
    options = ({} if seed is None else {"random_state": seed}) | ({} if targets is None else
                                                                 {"lora": {"target_modules": targets}})
    store_entry(stored_checkpoint, monkeypatch, **options)
    late, late_state = load(stored_checkpoint, monkeypatch, early=False, **options)
    early, early_state = load(stored_checkpoint, monkeypatch, early=True, **options)
    assert early.fastload.plan.source == "store" == late.fastload.plan.source
    assert EARLY in early.fastload.load_phases and "lora_peft" not in early.fastload.load_phases
    assert EARLY not in late.fastload.load_phases and "lora_peft" in late.fastload.load_phases
    import torch

    assert torch.equal(late_state, early_state)  # the generator ends where the late injection leaves it
    assert_same_peft_model(late, early)


def test_loads_the_early_injection_cannot_serve_inject_after_the_weights(tiny_llama, monkeypatch):
    store_entry(tiny_llama, monkeypatch)
    cases = {"on the fly": dict(store=False),
             "an embedding targeted": dict(lora={"target_modules": ["q_proj", "embed_tokens"]}),
             "custom init": dict(lora={"init_lora_weights": "gaussian"})}
    for what, options in cases.items():
        model, _ = load(tiny_llama, monkeypatch, early=True, **options)
        assert EARLY not in model.fastload.load_phases, what
        assert "lora_peft" in model.fastload.load_phases, what
    monkeypatch.delenv("FASTLOAD_EARLY_LORA")  # unset: a CPU load maps its weights, there is no read to overlap
    model, _ = FastModel.from_pretrained(str(tiny_llama))
    assert model.fastload.plan.source == "store" and EARLY not in model.fastload.load_phases


def test_a_moe_store_load_with_fused_experts_injects_after_the_weights(monkeypatch, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from family_shapes import make_family_checkpoint

    path = make_family_checkpoint(tmp_path / "qwen3_moe", "qwen3_moe")
    store_entry(path, monkeypatch)
    model, _ = load(path, monkeypatch, early=True)
    assert model.fastload.plan.source == "store" and EARLY not in model.fastload.load_phases
    assert model.peft_config["default"].target_parameters  # the experts adapted, as ever


def test_a_direct_load_that_falls_back_drops_the_injected_skeleton(tiny_llama, monkeypatch):
    """finish() refusing the skeleton after the injection: transformers loads the model again, LoRA goes in after
    it, and nothing of the injected skeleton is left in the result."""
    from fastload.load import fast_4bit

    store_entry(tiny_llama, monkeypatch)
    late, late_state = load(tiny_llama, monkeypatch, early=False)
    real_finish, refused = fast_4bit.finish, []

    def refusing_finish(model, *args, **kwargs):
        if kwargs.get("adapters_in") and not refused:
            refused.append(model)
            raise fast_4bit.NotCovered("refused by the test")
        return real_finish(model, *args, **kwargs)

    monkeypatch.setattr(fast_4bit, "finish", refusing_finish)
    early, early_state = load(tiny_llama, monkeypatch, early=True)
    assert refused and early.get_base_model() is not refused[0]
    assert not early.fastload.direct_load and "lora_peft" in early.fastload.load_phases
    import torch

    assert torch.equal(late_state, early_state)
    expected, got = late.state_dict(), early.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.gpu
def test_a_store_load_on_the_gpu_injects_while_reading_and_builds_the_same_model(stored_checkpoint, monkeypatch):
    import torch

    store_entry(stored_checkpoint, monkeypatch, dtype=torch.bfloat16)
    late, late_state = load(stored_checkpoint, monkeypatch, early=False, dtype=torch.bfloat16)
    early, early_state = load(stored_checkpoint, monkeypatch, early=True, dtype=torch.bfloat16)
    assert EARLY in early.fastload.load_phases and next(early.parameters()).device.type == "cuda"
    assert torch.equal(late_state, early_state)
    assert_same_peft_model(late, early, device="cuda")


def entry_files(home: Path) -> dict[str, tuple[int, int]]:
    """Every file of the store's entries: (inode, mtime) — a discarded and rewritten entry changes them."""
    return {str(f.relative_to(home)): (f.stat().st_ino, f.stat().st_mtime_ns)
            for f in (home / "quantized").rglob("*") if f.is_file()}


def test_lora_options_peft_refuses_keep_the_store_entry_and_raise_as_without_the_early_injection(
        tiny_llama, monkeypatch, isolated_env):
    """A LoRA mistake is not a damaged checkpoint: the entry stays as it is, and the error is the late path's."""
    from fastload.errors import AdapterError

    store_entry(tiny_llama, monkeypatch)
    before = entry_files(isolated_env)
    for early in (True, False):
        with pytest.raises(AdapterError) as err:
            load(tiny_llama, monkeypatch, early=early, lora={"layers_pattern": "layers"})
        assert "layers_pattern" in err.value.found
    assert entry_files(isolated_env) == before


def test_an_injection_that_fails_midway_falls_back_without_touching_the_store_entry(tiny_llama, monkeypatch,
                                                                                      isolated_env):
    """peft failing inside the early injection (the skeleton possibly half wrapped): transformers loads the model
    again, LoRA goes in after it, the adapters are the late path's and the entry is untouched."""
    import peft
    import torch

    store_entry(tiny_llama, monkeypatch)
    before = entry_files(isolated_env)
    late, late_state = load(tiny_llama, monkeypatch, early=False)
    real, failed = peft.get_peft_model, []

    def failing_once(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise RuntimeError("peft gave up midway (a test's failure)")
        return real(*args, **kwargs)

    monkeypatch.setattr(peft, "get_peft_model", failing_once)
    early, early_state = load(tiny_llama, monkeypatch, early=True)
    assert failed and not early.fastload.direct_load
    assert EARLY not in early.fastload.load_phases  # the injection did not happen: no phase says it did
    assert entry_files(isolated_env) == before
    assert torch.equal(late_state, early_state)
    expected, got = late.state_dict(), early.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_tied_head_among_the_targets_is_injected_after_the_weights(monkeypatch, isolated_env, tmp_path):
    """Gemma ties lm_head to the embeddings; the load ties them after the weights, which peft's wrapper of lm_head
    would break: such a load injects late, loads from the store (entry untouched) and runs."""
    import torch

    path = make_checkpoint(tmp_path / "gemma", "gemma")
    options = dict(lora={"target_modules": ["q_proj", "lm_head"]})
    store_entry(path, monkeypatch, **options)
    before = entry_files(isolated_env)
    model, _ = load(path, monkeypatch, early=True, **options)
    assert model.fastload.plan.source == "store" and model.fastload.direct_load
    assert EARLY not in model.fastload.load_phases and entry_files(isolated_env) == before
    ids = torch.tensor([[1, 5, 9, 42]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("options", [{"trainable_token_indices": [3, 4]},
                                     {"target_modules": ["q_proj", "lm_head"], "ensure_weight_tying": True}])
def test_lora_options_that_build_other_adapters_get_peft_s_own_init_and_run(monkeypatch, tmp_path, options):
    """Fields that make peft build adapters beyond lora_A/lora_B (trainable tokens, tied adapters) are peft's to
    initialise: nothing is left on the meta device."""
    import torch

    path = make_checkpoint(tmp_path / "gemma", "gemma")
    model, _ = load(path, monkeypatch, early=True, lora=options)
    assert not [n for n, p in model.named_parameters() if p.device.type == "meta"]
    ids = torch.tensor([[1, 5, 9, 42]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
