"""The expert_lora lever: LoRA on fused MoE experts computed per routed token equals peft's W + s B A path.

Tiny random MoE families (tests/train/family_shapes.py) with peft LoRA on attention and on the experts' fused
weights, B made non-zero so every adapter matters. The reference is the same model on peft's own path. Tolerances:
fp32 is round-off (loss 1e-6 relative, gradients 1e-5 relative in norm); in bf16 both paths round differently, so
the lever's loss and gradients must sit as close to fp32's as peft's bf16 ones do (within 2x, or 2e-3 relative for the
loss and 2e-2 for gradients) in two of three token draws (a routing tie flipped by round-off spoils one draw;
granitemoehybrid's bf16 Mamba mixer excluded from bf16: its bf16 gradients differ from fp32 by more than the
experts' arithmetic does).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from autograd_checks import loss_and_grads, relative, saved_for_backward_bytes

from fastload.engine.expert_lora import (
    LEVER,
    _grouped,
    _looped,
    _offsets,
    grouped_mm_runs,
    install_expert_lora,
    routing_order,
)
from tiny import nonzero_lora_b

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from family_shapes import COMMON, FAMILIES, MOE, PEFT_EXPERTS, make_family_checkpoint  # noqa: E402

# experts in transformers' layout: the lever computes them (Llama-4's own layout: tests/engine/test_llama4_moe.py)
LEVER_MOE = [f for f in MOE if f not in PEFT_EXPERTS and f != "llama4"]

VOCAB = 128
EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_moe(family: str, dtype=torch.float32, config: dict | None = None):
    """A tiny random `family` model (the same weights for the same arguments)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {**COMMON, **FAMILIES[family], **(config or {})}
    built = AutoConfig.for_model(family, vocab_size=VOCAB, **shape)
    if (getattr(built, "pad_token_id", None) or 0) >= VOCAB:  # a default made for the real vocabulary (HY-V4's)
        built.pad_token_id = 0
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(built, dtype=dtype)


def peft_moe(family: str, dtype=torch.float32, r: int = 8, config: dict | None = None, alpha: int | None = None):
    """A tiny random `family` model with peft LoRA on attention and on the experts, B non-zero (alpha 2r unless
    given: a scaling that is not one)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_moe(family, dtype, config)
    lora = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=ATTENTION, target_parameters=EXPERT_TARGETS)
    model = get_peft_model(model, lora)
    nonzero_lora_b(model)
    return model


def with_lever(model):
    ours = copy.deepcopy(model)
    assert install_expert_lora(ours) == {}  # every experts module covered
    return ours


def tokens(length: int = 24):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))


def experts_modules(model) -> list:
    from peft.tuners.lora.layer import ParamWrapper

    return [m for m in model.modules() if type(m).__name__.endswith("Experts") and not isinstance(m, ParamWrapper)]


@pytest.mark.parametrize("alpha", [None, 8], ids=["scaling-2", "scaling-1"])
@pytest.mark.parametrize("family", LEVER_MOE)
def test_fp32_loss_and_gradients_equal_peft(family, alpha):
    plain = peft_moe(family, alpha=alpha)
    ours = with_lever(plain)
    ids = tokens()
    plain_loss, plain_grads = loss_and_grads(plain, ids)
    our_loss, our_grads = loss_and_grads(ours, ids)
    assert our_loss == pytest.approx(plain_loss, rel=1e-6)
    assert {n for n in plain_grads if ".experts." in n and "lora_" in n}  # the experts' A and B are compared
    assert set(our_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        assert relative(our_grads[name], grad) < 1e-5, name


def test_experts_of_an_older_transformers_without_post_norm_flag_take_the_lever():
    """transformers 5.17 (the GPU machine's) sets no has_post_expert_norm on its experts modules: absent means no
    post norm, and the lever still covers them with the same loss and gradients."""
    plain = peft_moe("qwen3_moe")
    older = copy.deepcopy(plain)
    for experts in experts_modules(older):
        vars(experts).pop("has_post_expert_norm", None)
    assert experts_modules(older) and not any(hasattr(e, "has_post_expert_norm") for e in experts_modules(older))
    ours = with_lever(older)  # only the lever runs these modules (5.24's own forward reads the flag)
    ids = tokens()
    plain_loss, plain_grads = loss_and_grads(plain, ids)
    our_loss, our_grads = loss_and_grads(ours, ids)
    assert our_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        assert relative(our_grads[name], grad) < 1e-5, name


def bf16_misses(truth_model, plain, ours, ids) -> list[str]:
    """What in one token draw puts the lever's bf16 result further from fp32 than twice peft's bf16 distance."""
    truth_loss, truth_grads = loss_and_grads(truth_model, ids)
    plain_loss, plain_grads = loss_and_grads(plain, ids)
    our_loss, our_grads = loss_and_grads(ours, ids)
    misses = []
    if abs(our_loss - truth_loss) > max(2 * abs(plain_loss - truth_loss), 2e-3 * truth_loss):
        misses.append(f"loss {our_loss} (peft bf16 {plain_loss}, fp32 {truth_loss})")
    for name, truth in truth_grads.items():
        ours_off, peft_off = relative(our_grads[name], truth), relative(plain_grads[name], truth)
        if ours_off > max(2 * peft_off, 2e-2):
            misses.append(f"{name}: {ours_off:.3g} off (peft bf16 {peft_off:.3g})")
    return misses


@pytest.mark.parametrize("family", [f for f in LEVER_MOE if f != "granitemoehybrid"])
def test_bf16_is_as_close_to_fp32_as_peft(family):
    """Over three token draws, at least two within bounds: a tiny random router's logits are near-ties, and bf16
    round-off in the layers before can flip one token's experts in either path (then that draw's gradients differ by
    ~10%, seen once in ~70 draws), while an arithmetic error in the lever misses in every draw."""
    truth_model, plain = peft_moe(family), peft_moe(family, torch.bfloat16)
    ours = with_lever(plain)
    misses = {length: bf16_misses(truth_model, plain, ours, tokens(length)) for length in (24, 25, 26)}
    assert sum(not m for m in misses.values()) >= 2, misses


def test_the_lever_replaces_peft_materialising_the_experts_weight():
    """With the lever the experts module's own forward (which reads peft's parametrized W + s B A) never runs; the
    output still follows the experts' adapters: changing their B changes it."""
    plain = peft_moe("qwen3_moe")
    ours = with_lever(plain)
    calls = []
    for model in (plain, ours):
        for experts in experts_modules(model):
            experts.register_forward_hook(lambda module, args, out, model=model: calls.append(model))
    ids = tokens()
    with torch.no_grad():
        plain(input_ids=ids)
        before = ours(input_ids=ids).logits
        assert calls and all(model is plain for model in calls)
        for name, p in ours.named_parameters():
            if ".experts." in name and "lora_B" in name:
                p.mul_(3.0)
        after = ours(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3
    assert LEVER in repr(ours)  # print(model) says which modules the lever patched


def test_a_deep_copy_computes_with_its_own_adapters():
    """trl's reference models are deep copies: the copy's patched forward must read the copy's weights."""
    ours = with_lever(peft_moe("qwen3_moe"))
    twin = copy.deepcopy(ours)
    ids = tokens()
    with torch.no_grad():
        before = ours(input_ids=ids).logits
        assert torch.equal(twin(input_ids=ids).logits, before)
        for name, p in twin.named_parameters():
            if ".experts." in name and "lora_B" in name:
                p.mul_(3.0)
        assert (twin(input_ids=ids).logits - before).abs().max() > 1e-3
        assert torch.equal(ours(input_ids=ids).logits, before)


def test_disabled_adapters_merge_and_save_stay_with_peft(tmp_path):
    from peft import PeftModel

    plain = peft_moe("mixtral")
    ours = with_lever(plain)
    ids = tokens()
    with torch.no_grad():
        adapted = ours(input_ids=ids).logits
        with ours.disable_adapter():
            base = ours(input_ids=ids).logits
        with plain.disable_adapter():
            assert torch.allclose(base, plain(input_ids=ids).logits, atol=1e-6)
        assert (adapted - base).abs().max() > 1e-3
        ours.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(tiny_moe("mixtral"), tmp_path / "adapter")
        assert torch.allclose(reloaded(input_ids=ids).logits, adapted, atol=1e-5)
        merged = ours.merge_and_unload()
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)


def test_several_active_adapters_go_to_peft():
    """peft sums several active adapters into one delta; the lever computes one adapter and leaves such calls."""
    from peft import LoraConfig

    plain = peft_moe("qwen3_moe")
    plain.add_adapter("second", LoraConfig(r=4, target_modules=ATTENTION, target_parameters=EXPERT_TARGETS))
    nonzero_lora_b(plain, seed=1)
    ours = with_lever(plain)
    for model in (plain, ours):
        model.base_model.set_adapter(["default", "second"])
    ids = tokens()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)


def test_backward_keeps_no_weight_sized_tensor():
    """peft keeps each layer's W + s B A (as large as the expert stack) for backward; the lever keeps per-token
    tensors only. 32 experts of width 256 on hidden 256, 2 x 64 tokens: the stack is 48 MiB in fp32."""
    plain = peft_moe("qwen3_moe", config=dict(hidden_size=256, num_experts=32, moe_intermediate_size=256))
    ours = with_lever(plain)
    stack = sum(p.numel() * p.element_size() for p in plain.parameters() if p.ndim == 3)
    ids = tokens(64)
    plain_kept, our_kept = saved_for_backward_bytes(plain, ids), saved_for_backward_bytes(ours, ids)
    assert plain_kept > stack  # the reference really materializes it
    assert our_kept < plain_kept - 0.9 * stack


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matmul_equals_the_per_expert_loop(dtype):
    """Empty experts included; the gradients too (the loop is the path where grouped_mm cannot run)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 32, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(5, 16, 32, generator=gen).to(dtype).requires_grad_()
    offsets = torch.tensor([4, 4, 11, 11, 20], dtype=torch.int32)
    grouped = _grouped(x, w.transpose(-2, -1), offsets)
    looped = _looped(x, w.transpose(-2, -1), offsets)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert torch.allclose(grouped.float(), looped.float(), **tol)
    grads = [torch.autograd.grad(out.sum(), (x, w)) for out in (grouped, looped)]  # sum: a broadcast gradient
    for ours, loop in zip(*grads):
        assert torch.allclose(ours.float(), loop.float(), **tol)
    assert grads[0][1][1].abs().sum() == 0  # the expert with no tokens gets no gradient


@pytest.mark.parametrize("experts", [8, 256, 257, 40_000])
def test_routing_sorts_narrow_ids_into_the_order_of_the_wide_ones(experts):
    """The sort by expert runs on the narrowest integers that hold the ids (uint8 up to 256 experts, int16, int32):
    the rows each expert gets, and their order within it, are those of a stable sort of the int64 ids."""
    gen = torch.Generator().manual_seed(experts)
    ids = torch.randint(0, experts, (4096, 8), generator=gen)
    ids[0, 0], ids[-1, -1] = 0, experts - 1  # both ends of the range
    order, perm = routing_order(ids.reshape(-1), experts)
    wide_order, wide_perm = torch.sort(ids.reshape(-1), stable=True)
    assert order.element_size() <= (1 if experts <= 256 else 2 if experts <= 32768 else 4)
    assert torch.equal(perm, wide_perm)
    assert torch.equal(order.long(), wide_order)


@pytest.mark.parametrize("experts", [8, 256, 300])
def test_each_experts_rows_end_where_its_count_says(experts):
    """grouped_mm reads expert e's rows as offsets[e-1]:offsets[e]: the running count of each expert's rows, experts
    with no rows (here every third, and the last) included."""
    gen = torch.Generator().manual_seed(experts)
    ids = torch.randint(0, experts - 1, (512, 4), generator=gen)
    ids[ids % 3 == 1] = 0
    order, _ = routing_order(ids.reshape(-1), experts)
    offsets = _offsets(order, experts)
    counts = torch.bincount(ids.reshape(-1), minlength=experts)
    assert offsets.dtype == torch.int32 and offsets.shape == (experts,)
    assert torch.equal(offsets.long(), torch.cumsum(counts, 0))
    assert counts[-1] == 0 and (counts == 0).sum() > experts // 4


def test_rank_misaligned_for_grouped_mm_falls_back_and_matches():
    """fp32 rank 2: the (tokens, r) product has 8-byte rows, which grouped_mm refuses as an operand and its backward
    as a gradient; the loop takes over."""
    assert not grouped_mm_runs(torch.zeros(6, 2), torch.zeros(4, 2, 64))
    assert not grouped_mm_runs(torch.zeros(6, 64), torch.zeros(4, 64, 2))
    plain = peft_moe("qwen3_moe", r=2)
    ours = with_lever(plain)
    plain_loss, plain_grads = loss_and_grads(plain, tokens())
    our_loss, our_grads = loss_and_grads(ours, tokens())
    assert our_loss == pytest.approx(plain_loss, rel=1e-6)
    assert all(relative(our_grads[n], g) < 1e-5 for n, g in plain_grads.items())


# -- GPU: a mid-size MoE in bf16, lever on against off -----------------------------------------------------------------

MID_QWEN3_MOE = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                     num_experts=64, num_experts_per_tok=8, moe_intermediate_size=512)


@pytest.mark.gpu
def test_gpu_bf16_mid_size_moe_matches_peft_with_less_memory():
    """Qwen3-MoE, 64 experts of width 512, 2 x 2048 tokens, bf16 on CUDA: loss within 1e-2 relative, LoRA gradients
    with cosine > 0.99 (a bf16 near-tie may send a token to another expert in the second layer), and the peak memory
    of one forward + backward below peft's, which builds each layer's W + s B A for all 64 experts."""
    ids = tokens(2048).cuda()
    results = []
    for lever in (False, True):
        model = peft_moe("qwen3_moe", torch.bfloat16, r=16, config=MID_QWEN3_MOE).cuda()
        if lever:
            assert install_expert_lora(model) == {}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        loss, grads = loss_and_grads(model, ids)
        results.append((loss, grads, torch.cuda.max_memory_allocated() - start))
        del model
        torch.cuda.empty_cache()
    (plain_loss, plain_grads, plain_peak), (our_loss, our_grads, our_peak) = results
    assert our_loss == pytest.approx(plain_loss, rel=1e-2)
    for name, grad in plain_grads.items():
        cos = torch.nn.functional.cosine_similarity(our_grads[name].flatten(), grad.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())
    print(f"peak over the model: peft {plain_peak / 2**20:.0f} MiB, expert_lora {our_peak / 2**20:.0f} MiB")
    assert our_peak < plain_peak


@pytest.mark.gpu
def test_gpu_bf16_operands_of_the_bench_shape_take_grouped_mm():
    """qwen3-moe-small's operands (hidden 2048, 128 experts of width 768, rank 16) in bf16 on CUDA: every product
    of the lever runs as one grouped_mm, never the per-expert loop with its host sync."""
    from fastload.engine.expert_lora import _factors

    plain = peft_moe("qwen3_moe", torch.bfloat16, r=16, config=dict(
        hidden_size=2048, num_experts=128, moe_intermediate_size=768, num_hidden_layers=1, num_experts_per_tok=8))
    model = plain.cuda()
    x = torch.randn(4096 * 8, 2048, device="cuda", dtype=torch.bfloat16)
    for wrapper in [m for m in model.modules() if hasattr(m, "parameter_name")]:
        weight = wrapper.get_param()
        a_t, b_t, _ = _factors(wrapper, "default")
        rows = x if weight.shape[-1] == x.shape[-1] else x[:, :weight.shape[-1]].contiguous()
        xa = torch.empty(rows.shape[0], a_t.shape[-1], device="cuda", dtype=torch.bfloat16)
        assert grouped_mm_runs(rows, weight.transpose(-2, -1)), wrapper.parameter_name
        assert grouped_mm_runs(rows, a_t.to(torch.bfloat16)), wrapper.parameter_name
        assert grouped_mm_runs(xa, b_t.to(torch.bfloat16).contiguous()), wrapper.parameter_name


def test_a_triton_kernel_that_refuses_to_compile_leaves_the_torch_ops_with_one_warning(monkeypatch, caplog):
    """Where the Triton kernels would run but one does not compile (an older Triton, a GPU it cannot target), the
    step computes with the torch ops, the same loss and gradients, and the log says so once per kernel variant."""
    import logging

    import fastload.engine.expert_lora as expert_lora
    import fastload.engine.triton.experts as triton_experts
    import fastload.engine.triton.launch as launching

    plain = peft_moe("qwen3_moe", config=dict(moe_intermediate_size=32))  # narrow experts: all three kernels apply
    ours = with_lever(plain)
    expected_loss, expected_grads = loss_and_grads(ours, tokens())

    def refuses(*args):
        raise RuntimeError("CompilationError: at 12:4: unsupported on this target")

    probed = []
    monkeypatch.setattr(launching, "_RUNS", {})
    monkeypatch.setattr(triton_experts, "_PROBES", {k: lambda *a, _k=k: (probed.append(_k), refuses())
                                                    for k in ("gate", "combine", "spread")})
    monkeypatch.setattr(expert_lora, "_fused_elementwise", lambda experts, hidden: True)
    with caplog.at_level(logging.WARNING, logger="fastload"):
        for _ in range(2):
            loss, grads = loss_and_grads(ours, tokens())
    assert sorted(set(probed)) == ["combine", "gate", "spread"] and len(probed) == 3  # once each, not per call
    warnings = [r.getMessage() for r in caplog.records if "does not run here" in r.getMessage()]
    assert len(warnings) == 3 and all("torch ops compute it instead" in w for w in warnings)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for name, grad in expected_grads.items():
        assert relative(grads[name], grad) < 1e-6, name


def gate_and_combine_match_torch(device: str, dtype) -> None:
    """The Triton gate and combine kernels against the torch ops they replace, forward and every gradient (the routing
    weights' included); fp32 agrees to round-off, 16-bit within one rounding of the torch path's."""
    from fastload.engine.triton.experts import combine_rows, experts_gate, spread_rows

    gen = torch.Generator().manual_seed(0)
    tokens_, k, width, hidden = 96, 4, 1300, 48  # a width over one column block: the kernels' loop runs twice

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    gate_up, lora, routing = leaf(tokens_ * k, 2 * width), leaf(tokens_ * k, 2 * width, scale=0.1), leaf(tokens_ * k, 1)
    rows, rows_lora, x = leaf(tokens_ * k, hidden), leaf(tokens_ * k, hidden, scale=0.1), leaf(tokens_, hidden)
    perm = torch.randperm(tokens_ * k, generator=gen).to(device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=device)
    up_grad, out_grad = leaf(tokens_ * k, width), leaf(tokens_, hidden)
    leaves = (gate_up, lora, routing, rows, rows_lora, x)

    def torch_path():
        gate, up = (gate_up + lora).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up * routing
        combined = (rows + rows_lora)[inverse].view(tokens_, k, -1).sum(dim=1)
        return h, combined, x[perm // k]

    def kernel_path():
        h = experts_gate(gate_up.detach().clone().requires_grad_(), None, None)  # no adapter, no routing: runs too
        assert h.shape == (tokens_ * k, width)
        base = gate_up * 1  # the kernel writes gate + lora over its input: not over a leaf
        return (experts_gate(base, lora, routing), combine_rows(rows, rows_lora, inverse, perm // k, k, dtype),
                spread_rows(x, perm // k, inverse, k))

    results = []
    for path in (torch_path, kernel_path):
        h, combined, spread = path()
        grads = torch.autograd.grad((h * up_grad).sum() + (combined * out_grad).sum() + (spread * rows).sum(), leaves)
        results.append([t.float() for t in (h, combined, spread, *grads)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    names = ("h", "combined", "spread", "d gate_up", "d lora", "d routing", "d rows", "d rows_lora", "d x")
    for name, theirs, ours in zip(names, *results):
        assert relative(ours, theirs) < tol, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_gate_and_combine_match_the_torch_ops(dtype):
    gate_and_combine_match_torch("cuda", dtype)


@pytest.mark.gpu
def test_gpu_kernel_probes_pass_under_no_grad_and_inference_mode(monkeypatch):
    """The first call of a variant may come from generate() (inference mode) or a checkpoint's forward: the probe
    still runs its own small forward and backward there, and finds the kernels running."""
    import fastload.engine.triton.experts as triton_experts
    import fastload.engine.triton.launch as launching

    monkeypatch.setattr(launching, "_RUNS", {})
    with torch.inference_mode():
        assert triton_experts.kernel_runs("gate", torch.device("cuda"), torch.bfloat16, 96, True, True)
    with torch.no_grad():
        assert triton_experts.kernel_runs("combine", torch.device("cuda"), torch.bfloat16, 64, 4, True)
        assert triton_experts.kernel_runs("spread", torch.device("cuda"), torch.bfloat16, 64, 4)


@pytest.mark.gpu
def test_gpu_bf16_lever_with_the_triton_kernels_matches_it_without(monkeypatch):
    """Qwen3-MoE with experts narrower than the hidden size (the bench's shape: the routing weight applied before
    down_proj, the combine kernel in use), bf16 on CUDA: the kernels launch, and loss and LoRA gradients stay as
    close to the fp32 truth as the torch ops between the grouped matmuls leave them."""
    import fastload.engine.expert_lora as expert_lora
    import fastload.engine.triton.experts as triton_experts

    config = dict(moe_intermediate_size=32)
    ids = tokens().cuda()
    truth_loss, truth_grads = loss_and_grads(peft_moe("qwen3_moe", config=config).cuda(), ids)
    model = with_lever(peft_moe("qwen3_moe", torch.bfloat16, config=config).cuda())
    launched = []
    with monkeypatch.context() as patch:
        for name in ("experts_gate", "combine_rows", "spread_rows"):
            kernel = getattr(triton_experts, name)
            patch.setattr(triton_experts, name, lambda *a, _k=kernel, _n=name: (launched.append(_n), _k(*a))[1])
        fused_loss, fused_grads = loss_and_grads(model, ids)
    assert {"experts_gate", "combine_rows", "spread_rows"} <= set(launched)
    monkeypatch.setattr(expert_lora, "_fused_elementwise", lambda experts, hidden: False)
    torch_loss, torch_grads = loss_and_grads(model, ids)
    assert abs(fused_loss - truth_loss) <= max(2 * abs(torch_loss - truth_loss), 2e-3 * truth_loss)
    for name, truth in truth_grads.items():
        assert relative(fused_grads[name], truth) <= max(2 * relative(torch_grads[name], truth), 2e-2), name


@pytest.mark.gpu
def test_gpu_retained_graph_backpropagates_twice_through_the_moe_kernels():
    """Without checkpointing, a retained graph's second backward reads what the gate kernel saved again: the
    gradients must come out twice one backward's (the kernel writes over its saved input only in recomputation)."""
    model = with_lever(peft_moe("qwen3_moe", torch.bfloat16, config=dict(moe_intermediate_size=32)).cuda())
    ids = tokens().cuda()
    _, once = loss_and_grads(model, ids)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert relative(param.grad.float(), 2 * once[name]) < 1e-2, name


# -- through FastModel: on by default, reported, and off-switchable ---------------------------------------------------

@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fastmodel_default_uses_the_lever_and_switched_off_trains_the_same(family, tmp_path):
    """Default load (NF4 attention, fused LoRA, checkpointing, fp32 on the CPU): the report lists expert_lora and
    nothing says the experts run peft's path. engine={"expert_lora": False}: the report says they do, and the loss
    and every LoRA gradient are the same within fp32 round-off (1e-5 relative)."""
    from fastload import FastModel
    from fastload.engine.expert_lora import outer_wrappers
    from fastload.model_state import is_patched

    path = make_family_checkpoint(tmp_path / family, family)
    results = []
    for engine in (True, {"expert_lora": False}):
        model, tokenizer = FastModel.from_pretrained(str(path), engine=engine)
        nonzero_lora_b(model)
        wrappers = outer_wrappers(model)
        assert wrappers and all(is_patched(model, w, LEVER) == (engine is True) for w in wrappers)
        results.append((model.fastload_engine, *loss_and_grads(model, tokens())))
    (report, loss, grads), (off_report, off_loss, off_grads) = results
    assert LEVER in report and LEVER not in report.skipped and "fused_lora" not in report.skipped
    assert LEVER not in off_report and "peft's ParamWrapper" in off_report.skipped["fused_lora"]
    assert loss == pytest.approx(off_loss, rel=1e-6)
    assert any(".experts." in n for n in grads)
    for name, grad in off_grads.items():
        assert relative(grads[name], grad) < 1e-5, name


def test_a_grouped_mm_that_refuses_falls_back_to_the_loop_for_good(monkeypatch):
    """A GPU or torch build whose grouped_mm raises for these operands: the same result through one matmul per
    expert, and grouped_mm is not tried again on that device and dtype."""
    import fastload.engine.expert_lora as expert_lora

    calls = []

    def refuses(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("grouped gemm is not supported on this device")

    x = torch.randn(12, 32)
    w = torch.randn(3, 32, 16)
    offsets = torch.tensor([4, 8, 12], dtype=torch.int32)
    expected = expert_lora._looped(x, w, offsets)
    monkeypatch.setattr(expert_lora, "_REFUSED", set())
    monkeypatch.setattr(expert_lora, "_grouped_mm", lambda: refuses)
    assert torch.allclose(expert_lora._grouped(x, w, offsets), expected)
    assert torch.allclose(expert_lora._grouped(x, w, offsets), expected)
    assert len(calls) == 1


def test_positions_are_an_arange_and_earlier_ones_stay_valid():
    """The inverse permutation's positions and the experts' ids come from one kept tensor per device and dtype:
    always 0..n-1, and a longer request grows it without freeing what an earlier (possibly graph-captured) view
    points into; a narrow dtype's ids fill it to its last value (256 experts in uint8)."""
    from fastload.engine import expert_lora

    device = torch.device("cpu")
    for dtype in (torch.int64, torch.uint8):
        expert_lora._POSITIONS.pop((device, dtype), None)
    short = expert_lora.positions(5, device)
    assert torch.equal(short, torch.arange(5))
    longer = expert_lora.positions(37, device)
    assert torch.equal(longer, torch.arange(37)) and torch.equal(short, torch.arange(5))
    assert expert_lora.positions(20, device).data_ptr() == longer.data_ptr()  # no new tensor for a shorter one
    kept = expert_lora._POSITIONS[(device, torch.int64)]
    assert len(kept) == 2 and kept[0].data_ptr() == short.data_ptr()
    ids = expert_lora.positions(256, device, torch.uint8)
    assert ids.dtype == torch.uint8 and torch.equal(ids.long(), torch.arange(256))
