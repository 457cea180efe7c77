"""The fused-RoPE lever's attention forward: for every class it takes, with transformers' own rotation swapped in,
the same loss and gradients as transformers' forward (so the Triton kernel, held to that rotation on the GPU,
changes nothing else); the kernel's result itself against transformers' rotation on a GPU."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from fastload.engine.rotary import CLASSES, install_rotary_attention

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from family_shapes import COMMON, FAMILIES  # noqa: E402

VOCAB = 96
# model_type of each class the lever takes; sliding windows shorter than the sequence (the masks then differ)
FAMILY_OF = {"LlamaAttention": "llama", "GraniteAttention": "granite", "Qwen2MoeAttention": "qwen2_moe",
             "MistralAttention": "mistral", "MixtralAttention": "mixtral", "Qwen2Attention": "qwen2",
             "Qwen3Attention": "qwen3", "Qwen3MoeAttention": "qwen3_moe"}
WINDOWS = {"mistral": dict(sliding_window=5), "mixtral": dict(sliding_window=5),
           "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=0),
           "qwen3": dict(use_sliding_window=True, sliding_window=5, max_window_layers=0)}


def tiny(family: str, implementation: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {**COMMON, **FAMILIES[family], **WINDOWS.get(family, {})}
    config = AutoConfig.for_model(family, vocab_size=VOCAB, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=implementation)
    return model.train()


def loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # as in training: a cache goes to transformers
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_every_class_is_tested():
    assert set(FAMILY_OF) == set(CLASSES)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("attention", sorted(CLASSES))
def test_forward_with_transformers_rotation_is_transformers_forward(attention, implementation):
    family = FAMILY_OF[attention]
    plain = tiny(family, implementation)
    swapped, fallback = copy.deepcopy(plain), copy.deepcopy(plain)
    module = sys.modules[type(next(m for m in plain.modules() if type(m).__name__ == attention)).__module__]
    calls = []

    def rotate(q, k, cos, sin):
        calls.append(q.shape)
        return module.apply_rotary_pos_emb(q, k, cos, sin)

    layers = plain.config.num_hidden_layers
    assert install_rotary_attention(swapped, rotate) == layers
    assert install_rotary_attention(fallback, lambda *a: calls.append(1)) == layers  # None: the module's rotation
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    loss_p, grads_p = loss_and_grads(plain, ids)
    assert len(grads_p) > 5
    for other in (swapped, fallback):
        loss_o, grads_o = loss_and_grads(other, ids)
        assert abs(loss_p - loss_o) <= 1e-6 * loss_p
        assert grads_o.keys() == grads_p.keys()
        for name, g in grads_p.items():
            assert torch.allclose(g, grads_o[name], rtol=1e-5, atol=1e-7), name
    assert len(calls) == 2 * layers  # each patched forward rotated through `rotate`, once per layer


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cos_batch", [1, 2])
def test_gpu_kernel_matches_transformers_rotation(dtype, cos_batch):
    """Values and gradients of q and k against transformers' rotation computed in fp64; in bf16 the kernel (fp32
    inside, rounded once) must be at least as close to that as transformers' own bf16 rotation."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from fastload.engine.triton.rope import rotate

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    batch, seq, heads, kv_heads, dim = 2, 300, 12, 4, 128
    q = torch.randn(batch, seq, heads, dim, device="cuda", generator=g).to(dtype).transpose(1, 2)  # the model's
    k = torch.randn(batch, seq, kv_heads, dim, device="cuda", generator=g).to(dtype).transpose(1, 2)  # layout
    angles = torch.randn(cos_batch, seq, dim // 2, device="cuda", generator=g) * 20
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    grad_q, grad_k = torch.randn_like(q), torch.randn_like(k)

    def run(fn, cast):
        qq, kk = q.detach().to(cast).requires_grad_(), k.detach().to(cast).requires_grad_()
        out_q, out_k = fn(qq, kk, cos.to(cast), sin.to(cast))
        ((out_q * grad_q.to(cast)).sum() + (out_k * grad_k.to(cast)).sum()).backward()
        return [t.double() for t in (out_q, out_k, qq.grad, kk.grad)], out_q

    truth, _ = run(apply_rotary_pos_emb, torch.float64)
    theirs, _ = run(apply_rotary_pos_emb, dtype)
    ours, out_q = run(rotate, dtype)
    assert out_q.stride() == q.stride()  # the inputs' layout: what attention gets from transformers too
    for name, t, a, b in zip(["q", "k", "dq", "dk"], truth, theirs, ours):
        err_theirs, err_ours = (a - t).abs().max().item(), (b - t).abs().max().item()
        limit = 1e-5 if dtype == torch.float32 else max(err_theirs, 1e-3)
        assert err_ours <= limit, (name, err_ours, err_theirs)


def test_a_class_whose_forward_changed_keeps_it():
    """A transformers release whose attention forward no longer reads as CLASSES expects (here: Llama's class with
    q/k norms applied in another place, and one that no longer rotates through apply_rotary_pos_emb) is left to its
    own forward: the lever does not install a copy of the old steps."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    from fastload.engine.rotary import layout_of

    class NormedElsewhere(LlamaAttention):
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            query_states = self.q_norm(self.q_proj(hidden_states))
            key_states = self.k_norm(self.k_proj(hidden_states))
            cos, sin = position_embeddings
            return apply_rotary_pos_emb(query_states, key_states, cos, sin)  # noqa: F821 - read, never run

    class RotatedOtherwise(LlamaAttention):
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            return rotate_queries_and_keys(self, hidden_states, position_embeddings)  # noqa: F821

    assert layout_of(LlamaAttention) == (False, None)
    assert layout_of(NormedElsewhere) is None and layout_of(RotatedOtherwise) is None
    model = tiny("llama", "sdpa")
    for module in model.modules():
        if type(module) is LlamaAttention:
            module.__class__ = type("LlamaAttention", (NormedElsewhere,), {})  # the name the lever looks for
    assert install_rotary_attention(model, lambda *a: None) == 0
