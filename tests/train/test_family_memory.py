"""Memory estimates of mixture-of-experts models: the fused 3-D expert weights stay 16-bit (32-bit on a CPU without
bf16) in a "4-bit" load, because bitsandbytes quantizes Linear layers only. The estimate (fastload.load.memory) must
count them so, or `check_fits` lets through a load that runs out of memory.

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
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
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
    """Weights (experts kept 16/32-bit, projections NF4) and the default LoRA (experts adapted) as estimated."""
    from fastload import FastModel
    from fastload.load import memory
    from fastload.sources.checkpoint_files import read_config

    path = make_family_checkpoint(tmp_path / family, family)
    counts = memory.count_params(read_config(path))
    model, _ = FastModel.from_pretrained(str(path))
    dtype_bytes = next(p for p in model.parameters() if p.ndim == 3).element_size()
    expert_elements = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 3 and "lora" not in n)
    assert counts.experts == expert_elements > 0
    real = loaded_weight_bytes(model.get_base_model()) - 4 * sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert memory.weight_bytes(counts, 4, True, dtype_bytes) == pytest.approx(real, rel=WEIGHTS_RTOL)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.lora_params(counts, model.peft_config["default"].r) == trainable


def test_moe_that_would_not_fit_is_refused_before_loading(tmp_path, monkeypatch):
    """A limit between the weights' size with 4-bit experts and their real size: refused, the experts named; just
    above the real size the same load goes through."""
    from fastload import FastModel
    from fastload.errors import NotEnoughMemory
    from fastload.load import memory

    config = big_experts("mixtral")
    path = tmp_path / "mixtral"
    make_family_checkpoint(path, "mixtral", config=config)
    counts = memory.count_params(config)
    real = memory.weight_bytes(counts, 4, True, 4)  # fp32 on every CPU in this test
    if_experts_were_4bit = memory.weight_bytes(
        memory.ParamCounts(**{**counts.__dict__, "projections": counts.projections + counts.experts, "experts": 0}),
        4, True, 4)
    assert if_experts_were_4bit < real / 4
    monkeypatch.setenv("FASTLOAD_MEMORY_LIMIT_BYTES", str(int(real * 0.9)))
    with pytest.raises(NotEnoughMemory) as err:
        FastModel.from_pretrained(str(path), dtype="float32", store=False)
    assert "MoE experts, which bitsandbytes does not quantize" in err.value.found
    monkeypatch.setenv("FASTLOAD_MEMORY_LIMIT_BYTES", str(int(real * 1.1)))
    model, _ = FastModel.from_pretrained(str(path), dtype="float32", store=False, lora=None)
    assert loaded_weight_bytes(model) == pytest.approx(real, rel=WEIGHTS_RTOL)


def test_registry_moe_without_config_is_estimated_with_16bit_experts(capsys):
    """Offline, no config cached: Mixtral 8x7B's published shape puts 45.1B of its 46.7B parameters in experts,
    ~84 GiB in bf16; the approximation (90% experts) lands within 10%, and far above a 4-bit-everything guess."""
    from fastload.cli import main
    from fastload.load import memory

    assert main(["estimate", "mixtral-8x7b", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert "mixture of experts" in est["basis"]
    experts_gib = 32 * 8 * 3 * 4096 * 14336 * 2 / GIB
    assert est["weights_4bit"] / GIB == pytest.approx(experts_gib, rel=0.10)
    dense = memory.approximate_counts(est["params"])  # the same count read as a dense model: 4x less
    assert memory.weight_bytes(dense, 4) < est["weights_4bit"] / 3
