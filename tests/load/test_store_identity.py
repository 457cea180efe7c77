"""A model loaded from the store is the model quantized on the fly, bit for bit (issue 18): the store exists to
skip quantization, so nothing a user can observe may differ — module types, packed 4-bit weights, quantization
states, the other weights, logits, and with LoRA the first loss and its gradients. Both loads take the direct 4-bit
load (fastload.load.fast_4bit), the default."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastload import FastModel
from fastload.load.background_store import wait_for_store_writes
from fastload.sources.store import Store
from tiny import make_checkpoint


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_checkpoint(request, tmp_path_factory) -> Path:
    """Llama (no biases) and Qwen2 (q/k/v biases), bf16 on disk as published checkpoints are."""
    return make_checkpoint(tmp_path_factory.mktemp(request.param) / "model", request.param)


def load(path, store, **options):
    options = {"lora": None, "engine": False, "gradient_checkpointing": False, **options}
    model, _ = FastModel.from_pretrained(path, store=store, **options)
    return model


def assert_bit_identical(on_the_fly, stored) -> None:
    import bitsandbytes as bnb
    import torch

    assert {n: type(m) for n, m in on_the_fly.named_modules()} == {n: type(m) for n, m in stored.named_modules()}
    expected, got = on_the_fly.state_dict(), stored.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert (tensor.dtype, tensor.shape) == (got[name].dtype, got[name].shape), name
        assert torch.equal(tensor, got[name]), name
    layers = 0
    for name, module in on_the_fly.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            mine = stored.get_submodule(name)
            assert module.weight.quant_state == mine.weight.quant_state, name
            assert (module.compute_dtype, module.quant_storage) == (mine.compute_dtype, mine.quant_storage), name
            layers += 1
    assert layers == 7 * on_the_fly.config.num_hidden_layers
    ids = torch.randint(0, on_the_fly.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(on_the_fly(input_ids=ids).logits, stored(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("write", ["wait", "background"])
def test_the_store_gives_back_the_model_quantized_on_the_fly(family_checkpoint, tmp_path, monkeypatch, dtype, write):
    import torch

    monkeypatch.setenv("FASTLOAD_STORE_WRITE", write)
    store = Store(tmp_path / "home")
    first = load(family_checkpoint, store, dtype=getattr(torch, dtype))  # quantizes and writes the entry
    wait_for_store_writes()
    assert first.fastload.quantized_now and first.fastload.direct_load
    on_the_fly = load(family_checkpoint, False, dtype=getattr(torch, dtype))
    stored = load(family_checkpoint, store, dtype=getattr(torch, dtype))
    assert stored.fastload.plan.source == "store" and not stored.fastload.quantized_now
    assert stored.fastload.direct_load and on_the_fly.fastload.direct_load
    assert_bit_identical(first, stored)
    assert_bit_identical(on_the_fly, stored)


def test_training_from_the_store_starts_where_training_on_the_fly_does(tiny_llama, tmp_path):
    """The whole facade (LoRA with the same seed, checkpointing, engine): the same first loss and gradients."""
    import torch

    store = Store(tmp_path / "home")
    load(tiny_llama, store)
    wait_for_store_writes()
    results = []
    for source in (False, store):
        model = load(tiny_llama, source, lora={}, gradient_checkpointing=True, engine=True, dtype=torch.float32)
        model.train()
        ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert model.fastload.plan.source == "store"
    (loss_fly, grads_fly), (loss_store, grads_store) = results
    assert loss_fly == loss_store
    assert grads_fly.keys() == grads_store.keys() and grads_fly
    assert all(torch.equal(grads_fly[n], grads_store[n]) for n in grads_fly)


def test_modules_a_model_keeps_fp32_stay_fp32_from_the_store(tmp_path):
    """HY-V4 keeps its lm_head fp32 under a bf16 decoder (`_keep_in_fp32_modules_strict`), as transformers loads it.
    From the store it came back bf16 (every unquantized weight was cast to the compute dtype), unlike on the fly:
    both now give transformers' dtypes and the same logits, and the layers listed there stay unquantized."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from family_shapes import make_family_checkpoint

    path = make_family_checkpoint(tmp_path / "hy_v4", "hy_v4")
    store = Store(tmp_path / "home")
    load(path, store, dtype=torch.bfloat16)
    wait_for_store_writes()
    on_the_fly = load(path, False, dtype=torch.bfloat16)
    stored = load(path, store, dtype=torch.bfloat16)
    assert stored.fastload.plan.source == "store"
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert plain.lm_head.weight.dtype == torch.float32
    for model in (on_the_fly, stored):
        assert model.lm_head.weight.dtype == torch.float32
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        # its indexer's weights_proj is listed fp32 too: kept unquantized (a 4-bit one did not load back from the
        # store under transformers 5.17: its quantization state was dropped as unexpected keys)
        weights_proj = model.model.layers[0].self_attn.indexer.weights_proj
        assert type(weights_proj) is torch.nn.Linear and weights_proj.weight.dtype == torch.float32
    ids = torch.randint(8, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(on_the_fly(input_ids=ids).logits, stored(input_ids=ids).logits)


def test_a_4bit_layer_whose_quantization_state_was_not_read_is_refused(tiny_llama, tmp_path):
    """A pre-quantized checkpoint whose absmax and quant map transformers does not read for a layer (transformers 5.17
    with HY-V4's weights_proj) must not load as if whole: that layer's packed bytes cannot be multiplied by."""
    from safetensors.torch import load_file, save_file

    from fastload import FastModel
    from fastload.errors import CheckpointIncomplete

    model, tok = FastModel.from_pretrained(tiny_llama, lora=None, store=False)
    out = tmp_path / "q4"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (weights,) = out.glob("*.safetensors")
    tensors = load_file(weights)
    layer = "model.layers.1.mlp.down_proj.weight."
    renamed = {(k.replace(layer, "model.layers.1.mlp.down_proj.stats.") if k.startswith(layer) else k): v
               for k, v in tensors.items()}
    assert renamed != tensors
    save_file(renamed, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointIncomplete, match="down_proj") as raised:
        FastModel.from_pretrained(out, lora=None)
    assert "quantization state" in str(raised.value) and "16-bit checkpoint" in str(raised.value)
