"""LoRA on MoE families whose MLPs mix Linear layers with fused experts: every projection the log names is adapted,
and stays adapted through a save and a reload.

peft renames target_modules called gate_proj/up_proj/down_proj to the fused experts' parameters on DeepSeek-V3 and
its kin (a transformers 4 compatibility step); on a config written for the model as it is, that dropped the dense
layer's and the shared experts' adapters (fastload.train.peft_conversion). Adapters trained under transformers 4
(per-expert Linear names, no target_parameters) must still be converted as peft does.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from family_shapes import COMMON, FAMILIES, make_family_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> Path:
    return make_family_checkpoint(tmp_path_factory.mktemp("deepseek_v3") / "model", "deepseek_v3")


def adapted_modules(model) -> set[str]:
    """Module paths (below the decoder layers) that carry a LoRA A."""
    return {name.split(".layers.", 1)[1].rsplit(".lora_A", 1)[0] for name, _ in model.named_modules()
            if name.endswith("lora_A")}


def test_dense_layer_and_shared_experts_keep_their_adapters(deepseek, tmp_path, caplog):
    import torch

    from fastload import FastModel

    with caplog.at_level(logging.INFO, logger="fastload"):
        model, tokenizer = FastModel.from_pretrained(str(deepseek))
    adapted = adapted_modules(model)
    for projection in ("gate_proj", "up_proj", "down_proj"):
        assert f"0.mlp.{projection}" in adapted, sorted(adapted)  # the dense first layer
        assert f"1.mlp.shared_experts.{projection}" in adapted, sorted(adapted)
    assert "1.mlp.experts" in adapted and not any("gate" == a.rsplit(".", 1)[-1] for a in adapted)  # never the router
    config = model.peft_config["default"]
    assert not config.rank_pattern, config.rank_pattern  # the experts' rank is the one asked, not doubled
    expert_a = [p for n, p in model.named_parameters() if ".experts." in n and "lora_A" in n]
    experts = model.config.n_routed_experts  # peft's A on a fused stack: r rows per expert
    assert expert_a and all(p.shape[0] == config.r * experts for p in expert_a), [tuple(p.shape) for p in expert_a]
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA r=")]
    assert "gate_proj" in line and "experts'" in line  # and the log names what was adapted

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids = tokenizer(["hello world, how are you today?"], return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tokenizer)
    reloaded, _ = FastModel.from_pretrained(str(tmp_path / "adapter"))
    assert adapted_modules(reloaded) == adapted
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, atol=1e-5, rtol=0)


def test_an_adapter_config_of_transformers_4_is_still_renamed(deepseek):
    """A config naming the experts' old Linear layers and no fused parameters is peft's compatibility case: after
    fastload has wrapped the renaming, plain peft still moves it onto the fused experts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fastload.train.peft_conversion import keep_targets_as_written

    keep_targets_as_written()
    model = AutoModelForCausalLM.from_pretrained(deepseek, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    config = peft_model.peft_config["default"]
    assert {"gate_up_proj", "down_proj"} <= set(config.target_parameters)
    assert "1.mlp.experts" in adapted_modules(peft_model)


def test_linear_subclasses_left_in_16bit_are_said(tmp_path, caplog):
    """Falcon's projections are FalconLinear, which transformers' bitsandbytes swap skips: the model loads and
    trains, and the load says its projections stayed 16-bit instead of implying a 4-bit memory footprint."""
    from fastload import FastModel

    path = make_family_checkpoint(tmp_path / "falcon", "falcon")
    with caplog.at_level(logging.WARNING, logger="fastload"):
        model, _ = FastModel.from_pretrained(str(path))
    [line] = [r.getMessage() for r in caplog.records if "FalconLinear" in r.getMessage()]
    assert line.startswith("8 FalconLinear layers") and "stay in" in line
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastload"):
        FastModel.from_pretrained(str(make_family_checkpoint(tmp_path / "llama", "llama")))
    assert not [r for r in caplog.records if "stay in" in r.getMessage()]  # nothing said where all are 4-bit


def test_projections_as_wide_as_the_expert_count_are_adapted_and_routers_are_not(tmp_path):
    """A small MoE whose hidden size equals its expert count (64 and 64): q_proj and o_proj give 64 outputs like the
    router, and were silently left without adapters; only the router (and routers named as Hunyuan's, JetMoE's or
    LongCat's are) stays unadapted."""
    from fastload import FastModel
    from fastload.structure import is_router, router_widths

    path = make_family_checkpoint(tmp_path / "moe64", "qwen3_moe", config=dict(
        model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=64, num_experts_per_tok=2,
        decoder_sparse_step=1, vocab_size=256, max_position_embeddings=256))
    model, _ = FastModel.from_pretrained(str(path), gradient_checkpointing=False)
    adapted = adapted_modules(model)
    assert {"0.self_attn.q_proj", "0.self_attn.o_proj", "1.self_attn.q_proj", "1.mlp.experts"} <= adapted, adapted
    assert not any(a.endswith(".mlp.gate") for a in adapted), sorted(adapted)

    assert router_widths(model.config) == {64}  # the collision this case is about
    widths = {4}
    router_names = ("mlp.gate", "mlp.gate.wg", "mlp.router.layer", "router.classifier", "mlp.gate.router_mlp.out_proj")
    assert all(is_router(name, torch_linear(64, 4), widths) for name in router_names)
    assert not is_router("self_attn.b_proj", torch_linear(64, 4), widths)  # a linear-attention head gate
    assert not is_router("mlp.gate", torch_linear(64, 8), widths)  # not one logit per expert


def torch_linear(fan_in: int, fan_out: int):
    import torch

    return torch.nn.Linear(fan_in, fan_out, device="meta")


def test_gemma4_moe_variant_adapts_its_experts_and_leaves_its_router(tmp_path):
    """Gemma-4 26B-A4B is the gemma4_text model type with its MoE block on: experts adapted beside every projection,
    the router's proj (a Linear as wide as the expert count, inside `router`) left alone, and training moves."""
    import torch

    from fastload import FastModel
    from tiny import make_tokenizer, train_steps

    vocab = len(make_tokenizer())
    path = make_family_checkpoint(tmp_path / "gemma4_moe", "gemma4_text", config=dict(
        model_type="gemma4_text", **COMMON, **FAMILIES["gemma4_text"], vocab_size=vocab,
        vocab_size_per_layer_input=vocab, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=64))
    model, tokenizer = FastModel.from_pretrained(str(path))
    adapted = adapted_modules(model)
    assert {"0.experts", "1.experts", "0.self_attn.q_proj", "1.mlp.down_proj"} <= adapted, sorted(adapted)
    assert not any(".router" in a for a in adapted), sorted(adapted)
    assert "expert_lora" in model.fastload_engine
    batch = tokenizer(["hello world, how are you today?"] * 2, return_tensors="pt")
    losses = train_steps(model, batch)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("family, targets", [
    ("qwen3_moe", UNSLOTH_TARGETS),                      # Unsloth's notebook list
    ("mixtral", ["q_proj", "v_proj", "w1", "w2", "w3"]),  # Mixtral's names before transformers 5
    ("qwen2_moe", UNSLOTH_TARGETS),                      # a shared expert with Linear gate/up/down as well
])
def test_mlp_names_in_target_modules_adapt_the_fused_experts(family, targets, tmp_path, caplog):
    """target_modules naming the MLP's projections on an MoE model whose experts hold them fused: the experts are
    adapted (what peft itself does with that list, and what the user asked), the log says so, the expert lever
    computes them, and the routers stay frozen; a shared expert's Linear layers of the same names keep theirs."""
    from fastload import FastModel

    checkpoint = make_family_checkpoint(tmp_path / family, family)
    with caplog.at_level(logging.INFO, logger="fastload"):
        model, _ = FastModel.from_pretrained(str(checkpoint), lora={"target_modules": targets}, store=False)
    adapted = adapted_modules(model)
    assert {"0.mlp.experts", "1.mlp.experts"} <= adapted, sorted(adapted)
    assert not any(a.endswith((".gate", ".router")) for a in adapted), sorted(adapted)
    if family == "qwen2_moe":
        assert "0.mlp.shared_expert.gate_proj" in adapted, sorted(adapted)
    config = model.peft_config["default"]
    assert set(config.target_parameters) == {"experts.gate_up_proj", "experts.down_proj"}
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA r=")]
    assert "experts' down_proj/gate_up_proj for" in line, line
    assert "expert_lora" in model.fastload_engine


def test_a_target_parameter_that_names_nothing_is_refused_before_any_layer_is_wrapped(tmp_path):
    """peft matches target_parameters by a name's end and says nothing of one that matches none: a typo
    ("down_projj") trained the other experts' weights only, silently."""
    from fastload import FastModel
    from fastload.errors import AdapterError

    checkpoint = make_family_checkpoint(tmp_path / "mixtral", "mixtral")
    with pytest.raises(AdapterError, match="down_projj") as refused:
        FastModel.from_pretrained(str(checkpoint), store=False, lora={
            "target_modules": ["q_proj"], "target_parameters": ["experts.gate_up_proj", "experts.down_projj"]})
    assert "experts.down_proj" in str(refused.value)  # the names that exist, to fix it with
