"""The Triton top-k router: which routers it takes (by running their own forward at install), and on the GPU that
the kernel routes each token to the same experts with the same weights and gradients as transformers' router.

The install check runs on the CPU against the real transformers router classes of the MoE families; the kernel
itself only on a CUDA GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from autograd_checks import relative

from fastload.engine.router import install_topk_router, matching_variant
from fastload.engine.triton.router import reference_routing

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from family_shapes import COMMON, FAMILIES  # noqa: E402

VOCAB = 128


def tiny(family: str, dtype=torch.float32, device="cpu", **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    built = AutoConfig.for_model(family, vocab_size=VOCAB, **{**COMMON, **FAMILIES[family], **config})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(built, dtype=dtype).to(device)


def routers(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


@pytest.mark.parametrize("family, config, expected", [
    ("qwen3_moe", {"norm_topk_prob": True}, (True, True)),
    ("qwen3_moe", {"norm_topk_prob": False}, (False, True)),
    ("qwen2_moe", {"norm_topk_prob": False}, (False, True)),
    ("olmoe", {}, (False, True)),
    ("mixtral", {}, (True, False)),  # Mixtral's weights stay fp32
])
def test_the_install_check_reads_each_routers_own_variant(family, config, expected):
    """Each family's router is recognised as the softmax-top-k variant it computes (renormalised or not, weights cast
    back to the logits' dtype or left fp32): a wrong guess would change every routing weight."""
    model = tiny(family, dtype=torch.bfloat16, **config)  # in fp32 a cast back would change nothing
    found = routers(model)
    assert found, f"{family} has no *TopKRouter module"
    if family == "olmoe":
        expected = (bool(model.config.norm_topk_prob), True)
    assert {matching_variant(router) for router in found} == {expected}


def test_a_router_scoring_otherwise_is_left_to_its_own_forward():
    """A router named like the others whose scores are sigmoid, not softmax (DeepSeek-style): the check runs its
    forward, finds neither variant, and it keeps its own; one with a bias is not even tried."""

    class SigmoidTopKRouter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.top_k, self.weight = 2, torch.nn.Parameter(torch.randn(8, 16))

        def forward(self, hidden):
            logits = torch.nn.functional.linear(hidden.reshape(-1, 16), self.weight)
            scores, experts = torch.topk(logits.sigmoid(), self.top_k, dim=-1)
            return logits, scores, experts

    class BiasedTopKRouter(SigmoidTopKRouter):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(8))

    holder = torch.nn.Sequential(SigmoidTopKRouter(), BiasedTopKRouter())
    assert matching_variant(holder[0]) is None
    assert install_topk_router(holder) is False
    assert holder[0].forward.__func__ is SigmoidTopKRouter.forward and holder[1].forward.__func__ is \
        BiasedTopKRouter.forward


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_routing_is_transformers_router(normalize):
    """The torch formula the kernel is held to computes what Qwen3-MoE's router computes, after its linear layer."""
    model = tiny("qwen3_moe", norm_topk_prob=normalize)
    router = routers(model)[0]
    rows = torch.randn(64, router.weight.shape[1])
    logits, weights, experts = router(rows)
    expected, chosen = reference_routing(logits, router.top_k, normalize, logits.dtype)
    assert torch.equal(chosen, experts) and torch.equal(expected, weights)


def _distinct_logits(tokens: int, experts: int, dtype) -> torch.Tensor:
    """Logits without ties in `dtype` (each row a permutation of distinct values): which of two equal experts
    topk picks is left unspecified by torch, and the kernel picks the lower index."""
    values = torch.linspace(-3, 3, experts).to(dtype)
    assert values.unique().numel() == experts
    generator = torch.Generator().manual_seed(tokens)
    return torch.stack([values[torch.randperm(experts, generator=generator)] for _ in range(tokens)])


@pytest.mark.gpu
@pytest.mark.parametrize("experts, k", [(128, 8), (60, 4), (8, 2), (256, 8)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("logits_dtype, dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
def test_gpu_kernel_routes_as_transformers(experts, k, normalize, logits_dtype, dtype):
    """Same experts, weights within one rounding of the output dtype, and the logits' gradient within one rounding
    of the gradient computed in fp32 by autograd through transformers' ops."""
    from fastload.engine.triton.router import topk_routing

    logits = _distinct_logits(301, experts, logits_dtype).cuda().requires_grad_()
    weights, chosen = topk_routing(logits, k, normalize, dtype)
    grad = torch.randn(weights.shape, device="cuda")
    (weights.float() * grad).sum().backward()
    exact = logits.detach().float().requires_grad_()
    expected, expected_chosen = reference_routing(exact, k, normalize, torch.float32)
    (expected.to(dtype).float() * grad).sum().backward()
    assert torch.equal(chosen, expected_chosen)
    ulp = 1e-6 if dtype == torch.float32 else 8e-3
    assert (weights.float() - expected).abs().max().item() <= ulp
    assert relative(logits.grad.float(), exact.grad.to(logits_dtype).float()) < (1e-5 if logits_dtype ==
                                                                                 torch.float32 else 5e-3)


@pytest.mark.gpu
def test_gpu_ties_go_to_the_same_logits_as_torch():
    """bf16 logits tie often (128 experts, 8 bits of mantissa): the kernel may pick another of two equal experts,
    but always experts of the same logits, so the same weights."""
    from fastload.engine.triton.router import topk_routing

    logits = torch.randn(4096, 128, device="cuda").to(torch.bfloat16)
    weights, chosen = topk_routing(logits, 8, True, torch.bfloat16)
    expected, expected_chosen = reference_routing(logits, 8, True, torch.bfloat16)
    assert torch.equal(logits.gather(1, chosen).sort(-1).values, logits.gather(1, expected_chosen).sort(-1).values)
    assert (weights.float().sort(-1).values - expected.float().sort(-1).values).abs().max().item() <= 8e-3


@pytest.mark.gpu
def test_gpu_patched_model_trains_as_transformers_router(monkeypatch):
    """A Qwen3-MoE on the GPU with the router patched: the kernel computes every router call (not the fallback),
    and the loss and the gradients through the routing weights match the unpatched model's."""
    from fastload.engine.triton import router as triton_router

    calls = []
    real = triton_router.topk_routing
    monkeypatch.setattr(triton_router, "topk_routing", lambda *a: (calls.append(a[0].shape[0]), real(*a))[1])
    plain = tiny("qwen3_moe", dtype=torch.float32, device="cuda")
    ours = tiny("qwen3_moe", dtype=torch.float32, device="cuda")
    assert install_topk_router(ours)
    assert all(r.forward.__func__ is not type(r).forward for r in routers(ours))
    ids = torch.randint(0, VOCAB, (2, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    losses, grads = [], []
    for model in (plain, ours):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(model.model.embed_tokens.weight.grad.clone())
    # one kernel call per router in the patched model's forward (the 2-row probe of a new variant aside)
    assert calls.count(ids.numel()) == len(routers(ours))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert relative(grads[1], grads[0]) < 1e-4


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "phimoe", "granitemoehybrid", "lfm2_moe"])
def test_real_routers_computing_otherwise_keep_their_forward(family):
    """gpt-oss's router has a bias, DeepSeek-V3's a score-correction buffer and grouped sigmoid scoring, PhiMoE's
    sparsemixer, Granite's and LFM2's their own scoring: none is patched, every router forward stays the class's."""
    model = tiny(family, dtype=torch.bfloat16)
    candidates = [m for m in model.modules() if "router" in type(m).__name__.lower()]
    assert candidates, f"{family} has no router module"
    assert install_topk_router(model) is False
    assert all(getattr(m.forward, "__func__", None) is type(m).forward for m in candidates)
