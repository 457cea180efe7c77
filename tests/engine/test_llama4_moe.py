"""Llama-4's MoE layer on the routed path: each token through its chosen experts only, against transformers' layer,
which sends every token through every expert (scaled by a router score of zero for the experts not chosen).

Tiny random Llama-4 text models with peft LoRA on attention and on the experts' fused weights, B made non-zero so
every adapter matters; the reference is the same model on transformers' and peft's own path. fp32 tolerances are
round-off (the routed sum adds the chosen experts only: loss 1e-6 relative, gradients 1e-5 relative in norm); in
bf16 the routed loss must be as close to the fp32 loss as the plain bf16 loss is (within 2x, or 2e-3 relative).
"""

from __future__ import annotations

import copy

import pytest
import torch
from autograd_checks import loss_and_grads, relative

from fastload.engine.expert_lora import LEVER, install_expert_lora
from fastload.engine.llama4_moe import MOE_CLASS, install_llama4_moe
from fastload.load.nf4_experts import quantize_stack
from fastload.model_state import state_of
from tiny import nonzero_lora_b

VOCAB = 128
EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama4(dtype=torch.float32, top_k: int = 1, experts: int = 4, lora: bool = True):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama4_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
                                  intermediate_size_mlp=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, num_local_experts=experts,
                                  num_experts_per_tok=top_k, interleave_moe_layer_step=1, no_rope_layers=[1, 1],
                                  attention_chunk_size=64, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # transformers initialises gate_up_proj to zeros: every expert would output zero
        for module in model.modules():
            if type(module).__name__ == "Llama4TextExperts":
                module.gate_up_proj.normal_(0, 0.05)
    if not lora:
        return model
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION,
                                             target_parameters=EXPERT_TARGETS))
    nonzero_lora_b(model)
    return model


def routed(model):
    ours = copy.deepcopy(model)
    assert install_llama4_moe(ours) == 2  # as the engine installs them: Llama-4's layers, then the other experts
    assert install_expert_lora(ours) == {}
    moes = [m for m in ours.modules() if type(m).__name__ == MOE_CLASS]
    assert moes and all(LEVER in state_of(ours).levers_of(m) for m in moes)
    return ours


def tokens(length: int = 20):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))


@pytest.fixture
def dense_expert_calls(monkeypatch):
    """How many times transformers' all-experts forward ran."""
    from transformers.models.llama4 import modeling_llama4

    calls = []
    original = modeling_llama4.Llama4TextExperts.forward

    def counted(self, hidden_states):
        calls.append(hidden_states.shape[0])
        return original(self, hidden_states)

    monkeypatch.setattr(modeling_llama4.Llama4TextExperts, "forward", counted)
    return calls


@pytest.mark.parametrize("top_k", [1, 2])
def test_fp32_loss_and_gradients_equal_every_expert_path(top_k, dense_expert_calls):
    plain = tiny_llama4(top_k=top_k)
    ours = routed(plain)
    ids = tokens()
    loss_p, grads_p = loss_and_grads(plain, ids)
    assert dense_expert_calls  # the reference did run every expert
    dense_expert_calls.clear()
    loss_o, grads_o = loss_and_grads(ours, ids)
    assert not dense_expert_calls  # and the routed model never did
    assert abs(loss_o - loss_p) <= 1e-6 * loss_p
    experts = [n for n in grads_p if ".experts." in n]
    assert experts and grads_o.keys() == grads_p.keys()
    for name, g in grads_p.items():
        assert g.norm() > 0, name
        assert relative(grads_o[name], g) < 1e-5, name


def test_bf16_is_as_close_to_fp32_as_the_plain_path():
    truth, _ = loss_and_grads(tiny_llama4(), tokens())
    plain = tiny_llama4(torch.bfloat16)
    loss_p, grads_p = loss_and_grads(plain, tokens())
    loss_o, grads_o = loss_and_grads(routed(plain), tokens())
    assert abs(loss_o - truth) <= max(2 * abs(loss_p - truth), 2e-3 * truth)
    for name, g in grads_p.items():
        assert relative(grads_o[name], g) < 3e-2, name


def test_four_bit_experts_compute_as_their_dequantized_values():
    """Experts stored as NF4 stacks (fastload's 4-bit load) give the routed path the same result as transformers'
    path on the same stacks (both dequantize the same bytes)."""
    plain = tiny_llama4(lora=False)
    for module in plain.modules():
        if type(module).__name__ == "Llama4TextExperts":
            for name in ("gate_up_proj", "down_proj"):
                module._parameters[name] = torch.nn.Parameter(quantize_stack(module._parameters[name].data),
                                                              requires_grad=False)
    from peft import LoraConfig, get_peft_model

    plain = get_peft_model(plain, LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION,
                                             target_parameters=EXPERT_TARGETS))
    nonzero_lora_b(plain)
    ours = routed(plain)
    loss_p, grads_p = loss_and_grads(plain, tokens())
    loss_o, grads_o = loss_and_grads(ours, tokens())
    assert abs(loss_o - loss_p) <= 1e-6 * loss_p
    for name, g in grads_p.items():
        assert relative(grads_o[name], g) < 1e-5, name


def test_experts_without_adapters_are_routed_too(dense_expert_calls):
    """LoRA on attention only: the experts are frozen weights, still computed for the chosen experts only."""
    from peft import LoraConfig, get_peft_model

    plain = get_peft_model(tiny_llama4(lora=False), LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION))
    nonzero_lora_b(plain)
    ours = routed(plain)
    loss_p, grads_p = loss_and_grads(plain, tokens())
    dense_expert_calls.clear()
    loss_o, grads_o = loss_and_grads(ours, tokens())
    assert not dense_expert_calls and abs(loss_o - loss_p) <= 1e-6 * loss_p
    for name, g in grads_p.items():
        assert relative(grads_o[name], g) < 1e-5, name


def test_disabled_adapters_and_a_deep_copy(dense_expert_calls):
    """With adapters disabled the layer is transformers' (every expert, no adapter); a deep copy of the routed model
    computes with the copy's own adapters."""
    plain = tiny_llama4()
    ours = routed(plain)
    ids = tokens()
    with torch.no_grad():
        with plain.disable_adapter():
            base = plain(input_ids=ids).logits
        dense_expert_calls.clear()
        with ours.disable_adapter():
            assert torch.allclose(ours(input_ids=ids).logits, base, atol=1e-5)
        assert dense_expert_calls  # transformers' forward took the call
        twin = copy.deepcopy(ours)
        for name, p in twin.named_parameters():
            if "experts" in name and "lora_B" in name:
                p.mul_(3)
        assert (twin(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() > 1e-4


@pytest.mark.gpu
def test_gpu_bf16_routed_layer_is_as_close_to_fp32_as_the_plain_path():
    """On CUDA the routed path runs torch's grouped_mm in bf16 (and the Triton spread and gate kernels): its loss and
    gradients as close to the fp32 truth as transformers' bf16 layer's (which adds the adapters into bf16 weights:
    its expert gradients sat 7.5% from the routed path's on an H100, so each is held to the truth, not to the other)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ids = tokens(256).cuda()
    truth, grads_t = loss_and_grads(tiny_llama4(top_k=2, experts=8).cuda(), ids)
    plain = tiny_llama4(torch.bfloat16, top_k=2, experts=8).cuda()
    loss_p, grads_p = loss_and_grads(plain, ids)
    loss_o, grads_o = loss_and_grads(routed(plain), ids)
    assert abs(loss_o - truth) <= max(2 * abs(loss_p - truth), 2e-3 * truth)
    for name, g in grads_t.items():
        assert relative(grads_o[name], g) <= max(1.5 * relative(grads_p[name], g), 1e-2), name


def test_every_adapter_takes_the_grouped_matmul(monkeypatch):
    """Llama-4's factors, read in peft's swapped layout, reach grouped_mm in a layout it takes: the per-expert loop
    (a host sync per call) must not run (it ran for every adapted projection before the factors were made
    contiguous)."""
    from fastload.engine import expert_lora

    looped, original = [], expert_lora._looped

    def counted(x, w, offsets):
        looped.append(w.stride())
        return original(x, w, offsets)

    monkeypatch.setattr(expert_lora, "_looped", counted)
    if not expert_lora.grouped_mm_runs(torch.randn(4, 32), torch.randn(2, 32, 8)):
        pytest.skip("this torch has no grouped_mm for CPU tensors")
    model = routed(tiny_llama4(top_k=2))
    loss_and_grads(model, tokens())
    assert not looped


def test_adapters_added_after_the_first_install_are_counted_as_routed():
    """Loaded without LoRA (the engine installs the routed layer then), adapted later with get_peft_model: the
    engine's report must not say the experts run peft's path."""
    from peft import LoraConfig, get_peft_model

    from fastload.engine.report import experts_left_to_peft

    model = tiny_llama4(lora=False)
    assert install_llama4_moe(model) == 2
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION,
                                             target_parameters=EXPERT_TARGETS))
    assert experts_left_to_peft(model)  # the new wrappers, not yet marked
    assert install_llama4_moe(model) == 0  # the layers were routed already
    assert install_expert_lora(model) == {} and experts_left_to_peft(model) == []
