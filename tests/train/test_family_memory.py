"""Memory estimates of mixture-of-experts models: bitsandbytes quantizes Linear layers only, so fastload quantizes
the fused 3-D expert weights to 4-bit itself, each as it is read, except in a load that writes a store entry, which
reads them all 16-bit (32-bit on a CPU without bf16) first. The estimate (fastload.load.memory) must count them so,
or `check_fits` lets through a load that runs out of memory (or refuses one that fits).

Tolerances: the loaded weights' bytes within 1% of the estimate (the estimate ignores the few bytes of each 4-bit
layer's quantization constants beyond absmax); the default LoRA's parameters exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from family_shapes import family_config, make_family_checkpoint

WEIGHTS_RTOL = 0.01
GIB = 1024 ** 3


def loaded_weight_bytes(model) -> int:
    """Bytes the model's weights occupy: each tensor once, with the 4-bit layers' quantization constants."""
    seen, total = set(), 0
    from fastload.load.nf4_experts import is_stack

    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if is_stack(p):  # 4-bit MoE experts, counted as the 4-bit layers are: packed values and absmax
            parts = (p.packed, p.absmax, *([p.nested_absmax] if "nested_absmax" in p.stat_names else []))
            total += sum(t.numel() * t.element_size() for t in parts)
            continue
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def big_experts(family: str) -> dict:
    """A tiny MoE whose experts outweigh everything else ~10x, so a 4-bit guess for them is far off."""
    from tiny import make_tokenizer

    config = family_config(family, make_tokenizer()).to_dict()
    key = "num_local_experts" if "num_local_experts" in config else "num_experts"
    config[key] = 16
    return config


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_estimate_matches_the_loaded_model(family, tmp_path):
    """Weights (experts and projections NF4) and the default LoRA (experts adapted) as estimated."""
    from fastload import FastModel
    from fastload.load import memory
    from fastload.sources.checkpoint_files import read_config

    path = make_family_checkpoint(tmp_path / family, family)
    counts = memory.count_params(read_config(path))
    model, _ = FastModel.from_pretrained(str(path))
    dtype_bytes = model.get_input_embeddings().weight.element_size()
    expert_elements = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 3 and "lora" not in n)
    assert counts.experts == expert_elements > 0
    real = loaded_weight_bytes(model.get_base_model()) - 4 * sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert memory.weight_bytes(counts, 4, True, dtype_bytes) == pytest.approx(real, rel=WEIGHTS_RTOL)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.lora_params(counts, model.peft_config["default"].r) == trainable


def test_moe_that_fits_only_with_4bit_experts(tmp_path, monkeypatch):
    """A limit between the weights' size with 4-bit experts and their size with 16/32-bit experts: a default load,
    which quantizes each expert weight as it is read, goes through and holds them 4-bit; quantize_experts=False is
    refused before loading, the experts named, and so is a load that writes a store entry (it reads them 16-bit
    first, so that the store keeps them so)."""
    from fastload import FastModel
    from fastload.errors import NotEnoughMemory
    from fastload.load import memory

    config = big_experts("mixtral")
    path = tmp_path / "mixtral"
    make_family_checkpoint(path, "mixtral", config=config)
    counts = memory.count_params(config)
    real = memory.weight_bytes(counts, 4, True, 4, experts_4bit=False)  # fp32 on every CPU in this test
    loaded = memory.weight_bytes(counts, 4, True, 4)
    assert loaded < real / 4
    monkeypatch.setenv("FASTLOAD_MEMORY_LIMIT_BYTES", str(int(real * 0.9)))
    for options in ({"store": False, "quantize_experts": False}, {}):
        with pytest.raises(NotEnoughMemory) as err:
            FastModel.from_pretrained(str(path), dtype="float32", **options)
        assert "MoE experts, which are read 16-bit" in err.value.found
    model, _ = FastModel.from_pretrained(str(path), dtype="float32", store=False, lora=None)
    assert loaded_weight_bytes(model) == pytest.approx(loaded, rel=WEIGHTS_RTOL)


def test_registry_moe_without_config_is_estimated_as_an_moe(capsys):
    """Offline, no config cached: Mixtral 8x7B's published shape puts 45.1B of its 46.7B parameters in experts,
    ~21.7 GiB in NF4 and ~84 GiB in bf16 (as read while loading, or kept with quantize_experts=False); the
    approximation (90% experts) lands within 10% of both."""
    from fastload.cli import main
    from fastload.load import memory

    assert main(["estimate", "mixtral-8x7b", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert "mixture of experts" in est["basis"]
    experts = 32 * 8 * 3 * 4096 * 14336
    nf4_bytes = 0.5 + (1 + 4 / memory.DOUBLE_QUANT_BLOCK) / memory.NF4_BLOCK  # per value, absmax double-quantized
    assert est["weights_4bit"] / GIB == pytest.approx(experts * nf4_bytes / GIB, rel=0.10)
    counts = memory.approximate_counts(est["params"], "mixtral")
    assert memory.weight_bytes(counts, 4, experts_4bit=False) / GIB == pytest.approx(experts * 2 / GIB, rel=0.10)


def test_sizes_given_per_layer_count_as_their_widest():
    """transformers' heterogeneous configs (Gemma-4) give head_dim per layer and refuse to read it globally: the
    estimate takes the widest layer's (its full-attention layers' 32 here, not the sliding ones' 16), as it does for
    sizes given as lists."""
    from fastload.load.memory import count_params, widest_size
    from tiny import make_tokenizer

    config = family_config("gemma4_text", make_tokenizer())
    assert config.per_layer_attributes == {"head_dim"}
    assert widest_size(config, "head_dim") == 32 and widest_size(config, "no_such_size") is None
    counts = count_params(config)
    assert counts.kv_dim == config.num_key_value_heads * 32
