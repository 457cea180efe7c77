"""MoE experts stored 4-bit (NF4ExpertStack) train, infer, save and merge as the same experts held in 16/32-bit with the
values dequantized from the same NF4 bytes.

The reference is each model's twin whose expert stacks are plain parameters of those dequantized values: every
difference is then fastload's arithmetic, not quantization. On the CPU everything computes in fp32, so the
tolerances are round-off: loss 1e-6 relative, gradients 1e-5 relative in norm, logits 1e-5 absolute (1e-4 after a
merge into dequantized weights, as tests/train/test_families.py). The GPU test runs bf16 with grouped_mm.
"""

from __future__ import annotations

import copy
import gc
import logging
import sys
from pathlib import Path

import pytest
import torch
from autograd_checks import loss_and_grads, relative, saved_for_backward_bytes

from fastload.engine.expert_lora import install_expert_lora
from fastload.load.experts import expert_slots
from fastload.load.nf4_experts import NF4ExpertStack, is_stack, quantize_stack
from fastload.structure import decoder_layers
from tiny import nonzero_lora_b

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from family_shapes import COMMON, FAMILIES, make_family_checkpoint  # noqa: E402

VOCAB = 128
EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FOUR_BIT_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")  # gpt-oss: transposed stacks with biases


def slots(model) -> list[tuple]:
    return expert_slots(decoder_layers(model) or [], model.config)


def stack_experts(model):
    """The model's expert weights as NF4 stacks (NF4, double quant, as fastload's default load)."""
    for module, name in slots(model):
        module._parameters[name] = torch.nn.Parameter(quantize_stack(module._parameters[name].data),
                                                      requires_grad=False)
    return model


def dense_twin(model):
    """A copy whose expert stacks are plain parameters holding the stacks' dequantized values."""
    twin = copy.deepcopy(model)
    for module, name in slots(twin):
        stack = module._parameters[name]
        if is_stack(stack):
            module._parameters[name] = torch.nn.Parameter(stack.dequantize(), requires_grad=stack.requires_grad)
    assert not any(is_stack(p) for p in twin.parameters())
    return twin


def tiny_moe(family: str, dtype=torch.float32, config: dict | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {**COMMON, **FAMILIES[family], **(config or {})}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, vocab_size=VOCAB, **shape), dtype=dtype)


def with_lora(model, r: int = 8):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=ATTENTION,
                                             target_parameters=EXPERT_TARGETS))
    nonzero_lora_b(model)
    return model


def four_bit_and_dense(family: str, dtype=torch.float32, config: dict | None = None):
    four = stack_experts(tiny_moe(family, dtype, config))
    dense = dense_twin(four)  # before LoRA: get_peft_model changes the model it wraps
    return with_lora(four), with_lora(dense)


def tokens(length: int = 24, device="cpu"):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length)).to(device)


def assert_same_training(ours, reference, ids, grad_rtol=1e-5):
    our_loss, our_grads = loss_and_grads(ours, ids)
    ref_loss, ref_grads = loss_and_grads(reference, ids)
    assert our_loss == pytest.approx(ref_loss, rel=1e-6)
    assert set(our_grads) == set(ref_grads) and any(".experts." in n and "lora_" in n for n in ref_grads)
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, name
        assert relative(our_grads[name], grad) < grad_rtol, name


@pytest.mark.parametrize("family", FOUR_BIT_FAMILIES)
def test_lever_on_4bit_experts_trains_as_the_dequantized_experts(family):
    four, dense = four_bit_and_dense(family)
    assert install_expert_lora(four) == {} and install_expert_lora(dense) == {}
    assert any(isinstance(p, NF4ExpertStack) for p in four.parameters())
    assert_same_training(four, dense, tokens())


@pytest.mark.parametrize("family", FOUR_BIT_FAMILIES)
def test_peft_own_path_on_4bit_experts_trains_as_the_dequantized_experts(family):
    """Without the lever, peft's parametrization (W + s B A) and transformers' experts forward read the stacks."""
    four, dense = four_bit_and_dense(family)
    assert_same_training(four, dense, tokens())


def test_base_experts_get_no_gradient_and_stay_packed():
    four, _ = four_bit_and_dense("qwen3_moe")
    install_expert_lora(four)
    loss_and_grads(four, tokens())
    stacks = [p for p in four.parameters() if is_stack(p)]
    assert stacks and all(p.grad is None and not p.requires_grad for p in stacks)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_inference_without_lora_equals_the_dequantized_experts(family):
    four = stack_experts(tiny_moe(family))
    dense = dense_twin(four)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(four(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_disabled_adapters_read_the_4bit_base_as_the_dequantized_one():
    """DPO's reference is the model with its adapter off: peft's path then runs the experts' own forward on the
    stacks, and it equals the dequantized twin's; with the adapter on again the lever computes as before."""
    four, dense = four_bit_and_dense("qwen3_moe")
    for model in (four, dense):
        install_expert_lora(model)
    ids = tokens()
    with torch.no_grad():
        with four.disable_adapter(), dense.disable_adapter():
            torch.testing.assert_close(four(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(four(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_backward_keeps_no_dequantized_stack():
    """32 experts of width 256 on hidden 256, 2 x 64 tokens: each layer's dequantized stack is 24 MiB in fp32; the
    lever on 4-bit experts keeps as little for backward as on 16-bit ones (per-token tensors only)."""
    four, dense = four_bit_and_dense("qwen3_moe", config=dict(hidden_size=256, num_experts=32,
                                                              moe_intermediate_size=256))
    for model in (four, dense):
        install_expert_lora(model)
    stack = max(p.numel() * 4 for p in dense.parameters() if p.ndim == 3)
    ids = tokens(64)
    four_kept, dense_kept = saved_for_backward_bytes(four, ids), saved_for_backward_bytes(dense, ids)
    assert four_kept <= dense_kept + 0.05 * stack


def test_a_recomputed_layer_dequantizes_its_last_projection_once(monkeypatch):
    """Under checkpointing a layer's recomputation is followed at once by its backward: down_proj's 16-bit stack from
    that forward serves its backward (four dequantizations a layer here, without checkpointing, become three; in
    training one of six, a ninth of their bytes). The gradients stay the dequantized twin's; outside a single-use
    graph backward dequantizes again (test_backward_keeps_no_dequantized_stack)."""
    from fastload.engine import expert_lora
    from fastload.train.single_use import single_use_graph

    four, dense = four_bit_and_dense("qwen3_moe")
    for model in (four, dense):
        install_expert_lora(model)
    calls = []
    real = expert_lora.dequantize_stack
    monkeypatch.setattr(expert_lora, "dequantize_stack", lambda stack: calls.append(stack) or real(stack))
    ids = tokens()
    loss_and_grads(four, ids)
    plain = len(calls)
    calls.clear()
    with single_use_graph():
        assert_same_training(four, dense, ids)
    layers = len(slots(four)) // 2
    assert plain == 4 * layers and len(calls) == 3 * layers


# -- through FastModel: the default load stores the experts 4-bit ------------------------------------------------------

def fast_moe(path, **options):
    from fastload import FastModel

    model, tokenizer = FastModel.from_pretrained(str(path), store=False, **options)
    nonzero_lora_b(model)
    return model, tokenizer


def expert_params(model) -> list:
    return [p for n, p in model.named_parameters() if ".experts." in n and p.ndim == 3]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fastmodel_stores_experts_4bit_and_trains_as_dequantized_16bit(family, tmp_path, caplog):
    """Default load: every expert stack is 4-bit, about a quarter of its bf16 bytes (NF4 plus double-quantized
    statistics), and the load says so. quantize_experts=False keeps them dense and warns; given the same NF4
    values dequantized, three AdamW8bit steps give the same losses (fp32 round-off) and the LoRA gradients agree."""
    from fastload import FastModel

    path = make_family_checkpoint(tmp_path / family, family)
    with caplog.at_level(logging.INFO, logger="fastload"):
        four, _ = fast_moe(path)
    stacks = expert_params(four)
    assert stacks and all(is_stack(p) for p in stacks)
    bf16_bytes = sum(p.numel() * 2 for p in stacks)
    packed = sum(p.packed_bytes() for p in stacks)
    values = sum(p.numel() for p in stacks)
    # a quarter of bf16 (4 bits a value), one 8-bit absmax per 64 values, and per stack the 16-entry NF4 and
    # 256-entry nested code tables in fp32 plus one fp32 nested absmax per 256 blocks (a few bytes at these sizes)
    assert 0.25 * bf16_bytes < packed <= 0.25 * bf16_bytes + values / 64 + len(stacks) * (16 * 4 + 256 * 4 + 64)
    assert any("stored 4-bit too" in r.message for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastload"):
        dense, _ = fast_moe(path, quantize_experts=False)
    assert not any(is_stack(p) for p in dense.parameters())
    assert any("quantize_experts=False" in r.message for r in caplog.records)
    with torch.no_grad():
        for ours, theirs in zip(stacks, expert_params(dense), strict=True):
            theirs.copy_(ours.dequantize())

    ids = tokens()
    losses = {}
    for key, model in (("four", four), ("dense", dense)):
        optimizer = FastModel.get_optimizer(model, lr=1e-3)
        losses[key] = []
        for _ in range(3):
            losses[key].append(loss_and_grads(model, ids)[0])
            optimizer.step()
    assert losses["four"] == pytest.approx(losses["dense"], rel=1e-5)
    assert losses["four"][-1] < losses["four"][0]
    _, four_grads = loss_and_grads(four, ids)
    _, dense_grads = loss_and_grads(dense, ids)
    for name, grad in dense_grads.items():
        assert relative(four_grads[name], grad) < 1e-4, name


def test_fastmodel_adapter_round_trip_and_merge_with_4bit_experts(tmp_path):
    """The adapter saved from 4-bit experts holds the adapter only and reloads to the same logits; the merged 16-bit
    model (the experts dequantized, the deltas added) gives the adapted model's logits."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from fastload import FastModel

    path = make_family_checkpoint(tmp_path / "qwen3_moe", "qwen3_moe")
    model, tokenizer = fast_moe(path)
    ids = tokens()
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tokenizer)
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names) and any(".experts." in n for n in names)
    reloaded, _ = FastModel.from_pretrained(str(tmp_path / "adapter"), store=False)
    assert any(is_stack(p) for p in reloaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
    del reloaded

    FastModel.save_merged(model, tmp_path / "merged", tokenizer=tokenizer, source="dequantized", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-4, rtol=0)


def test_peft_merge_and_unload_on_4bit_experts_keeps_them_4bit():
    """peft's own merge writes W + delta into each stack, quantized back to 4-bit (as it does for a bitsandbytes
    Linear4bit): with LoRA on the experts alone, the merged logits sit much closer to the adapted ones than the base's
    do (NF4 rounding of W + delta remains; a lost delta would leave the base's distance)."""
    from peft import LoraConfig, get_peft_model

    four = get_peft_model(stack_experts(tiny_moe("mixtral")),
                          LoraConfig(r=8, lora_alpha=16, target_modules=[], target_parameters=EXPERT_TARGETS))
    nonzero_lora_b(four)
    ids = tokens()
    with torch.no_grad():
        adapted = four(input_ids=ids).logits
        with four.disable_adapter():
            base = four(input_ids=ids).logits
        merged = four.merge_and_unload()
        assert any(is_stack(p) for p in merged.parameters())
        out = merged(input_ids=ids).logits
    assert relative(out, adapted) < 0.5 * relative(base, adapted)


# -- GPU: bf16 on CUDA, grouped_mm -----------------------------------------------------------------------------------

MID_QWEN3_MOE = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                     num_experts=64, num_experts_per_tok=8, moe_intermediate_size=512)


@pytest.mark.gpu
def test_gpu_bf16_4bit_experts_train_as_dequantized_bf16_in_less_memory(caplog):
    """Qwen3-MoE with 64 experts of width 512 in bf16 on CUDA, the lever's grouped_mm path, 2 x 1024 tokens: the loss
    within 1e-2 relative and LoRA gradients with cosine > 0.99 of the dequantized-bf16 twin's; the model's memory
    (4-bit stacks) about a quarter of the twin's experts, and the step's peak no higher than the twin's."""
    ids = tokens(1024, "cuda")
    caplog.set_level(logging.INFO, logger="fastload")
    results = []
    for four in (True, False):
        model = stack_experts(tiny_moe("qwen3_moe", torch.bfloat16, MID_QWEN3_MOE)).cuda()
        model = with_lora(model if four else dense_twin(model), r=16)
        assert install_expert_lora(model) == {}
        stacks = [p for p in model.parameters() if p.ndim == 3]
        assert all(is_stack(p) == four for p in stacks) and all(p.is_cuda for p in stacks)
        assert all(p.packed.is_cuda and p.absmax.is_cuda for p in stacks if is_stack(p))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss, grads = loss_and_grads(model, ids)
        results.append((loss, grads, start, torch.cuda.max_memory_allocated()))
        del model, stacks
        torch.cuda.empty_cache()
    (loss, grads, start, peak), (dense_loss, dense_grads, dense_start, dense_peak) = results
    assert loss == pytest.approx(dense_loss, rel=1e-2)
    for name, grad in dense_grads.items():
        cos = torch.nn.functional.cosine_similarity(grads[name].flatten(), grad.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())
    experts_bf16 = 2 * 2 * 64 * 3 * 1024 * 512  # layers x bytes x experts x (gate, up, down) x hidden x width
    print(f"model {start / 2**20:.0f} vs {dense_start / 2**20:.0f} MiB, peak {peak / 2**20:.0f} vs "
          f"{dense_peak / 2**20:.0f} MiB")
    assert dense_start - start > 0.7 * experts_bf16
    assert peak <= dense_peak
    assert not [r for r in caplog.records if "one matmul per expert" in r.message]  # grouped_mm, not the loop


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_the_lever_dequantizes_a_stack_to_bitsandbytes_values(transposed):
    """The lever's Triton dequantization of an expert stack (one launch) gives bitsandbytes' values bit for bit,
    in the view's axis order."""
    from fastload.engine.expert_lora import dequantize_stack

    dense = torch.randn(8, 256, 192, dtype=torch.bfloat16, device="cuda")
    stack = quantize_stack(dense, "nf4", True, 64)
    view = stack.transpose(-2, -1) if transposed else stack
    expected = view.dequantize()
    got = dequantize_stack(view)
    assert got.shape == expected.shape and got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.gpu
def test_gpu_load_peak_holds_one_16bit_expert_weight_not_all(tmp_path):
    """Qwen3-MoE, 16 layers of 16 experts of width 512 on hidden 1024 (768 MiB of bf16 experts, 48 MiB a layer),
    loaded on CUDA without the store: the experts are quantized as they are read, so the load's peak stays below the
    same load with quantize_experts=False by at least 40% of the experts' bf16 bytes (the rest: their 4-bit form,
    about a quarter, and one layer's weights in flight)."""
    from family_shapes import family_config

    from fastload import FastModel
    from tiny import make_tokenizer

    shape = dict(MID_QWEN3_MOE, num_hidden_layers=16, num_experts=16, num_experts_per_tok=4)
    path = make_family_checkpoint(tmp_path / "mid", "qwen3_moe",
                                  config={**family_config("qwen3_moe", make_tokenizer()).to_dict(), **shape})
    peaks = {}
    for quantize in (True, False):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model, _ = FastModel.from_pretrained(str(path), store=False, lora=None, quantize_experts=quantize)
        peaks[quantize] = torch.cuda.max_memory_allocated() - start
        assert all(is_stack(p) == quantize for p in expert_params(model)) and expert_params(model)
        if not quantize:  # counted, not computed from the shape: transformers versions name the expert count apart
            experts_bf16 = sum(p.numel() * p.element_size() for p in expert_params(model))
        del model
    print(f"load peak: 4-bit experts {peaks[True] / 2**20:.0f} MiB, bf16 experts {peaks[False] / 2**20:.0f} MiB")
    assert peaks[False] - peaks[True] > 0.4 * experts_bf16


@pytest.mark.gpu
def test_gpu_fastmodel_loads_experts_4bit_on_cuda(tmp_path):
    """FastModel on CUDA: the experts are 4-bit stacks on the GPU, and a training step through them runs."""
    path = make_family_checkpoint(tmp_path / "qwen3_moe", "qwen3_moe")
    model, _ = fast_moe(path)
    stacks = expert_params(model)
    assert stacks and all(is_stack(p) and p.packed.is_cuda for p in stacks)
    loss, grads = loss_and_grads(model, tokens(64, "cuda"))
    assert loss == loss and any(".experts." in n and g.abs().sum() > 0 for n, g in grads.items())
