"""The performance engine stays correct: same loss and LoRA gradients as the plain path, on the CPU in CI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastload import FastModel
from fastload.engine.fused_loss import chunked_linear_cross_entropy
from tiny import nonzero_lora_b, train_steps


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [3, 16, 1024])
def test_chunked_cross_entropy_matches_full_logits(chunk, with_bias):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 24, generator=gen, dtype=torch.float64)
    bias = torch.randn(50, generator=gen, dtype=torch.float64) * 3 if with_bias else None  # a head's (GPT-J, Phi)
    labels = torch.randint(0, 50, (37,), generator=gen)
    labels[::5] = -100
    ours = chunked_linear_cross_entropy(hidden, weight, labels, chunk=chunk, bias=bias)
    (g_ours,) = torch.autograd.grad(ours * 3.0, hidden)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref * 3.0, hidden)
    assert torch.allclose(ours, ref, rtol=1e-10)  # float64: exact up to summation order
    assert torch.allclose(g_ours, g_ref, rtol=1e-9, atol=1e-12)


def test_default_chunks_stay_within_their_memory_bound_and_still_match():
    from fastload.engine.fused_loss import CHUNK_BYTES, chunk_tokens

    assert chunk_tokens(128_256) == 256 and chunk_tokens(32_000) == 1024 and chunk_tokens(49_152) == 512
    assert chunk_tokens(128_256, bytes_per_logit=2) == 1024  # the Triton kernel keeps only the bf16 logits
    for vocab in (1_000, 32_000, 128_256, 262_144, 600_000):
        tokens = chunk_tokens(vocab)
        assert 128 <= tokens <= 4096 and (tokens * vocab * 8 <= CHUNK_BYTES or tokens == 128)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(700, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(600_000, 16, generator=gen, dtype=torch.float64) * 0.1  # 128-token chunks: 6 of them
    labels = torch.randint(0, 600_000, (700,), generator=gen)
    ref = F.cross_entropy(hidden @ weight.t(), labels)
    assert torch.allclose(chunked_linear_cross_entropy(hidden, weight, labels), ref, rtol=1e-10)


def test_num_items_in_batch_normalises_like_transformers():
    hidden = torch.randn(10, 8, dtype=torch.float64)
    weight = torch.randn(12, 8, dtype=torch.float64)
    labels = torch.randint(0, 12, (10,))
    summed = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    assert torch.allclose(chunked_linear_cross_entropy(hidden, weight, labels, num_items=40), summed / 40)


def lora_grads(model, tok):
    enc = tok(["the quick brown fox jumps over the lazy dog", "hello world"], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model.train()
    loss = model(**enc, labels=labels).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_engine_gives_the_plain_paths_loss_and_lora_gradients(tiny_llama):
    # fp32 on every CPU (one with native bf16 would otherwise pick bf16): the tolerances are fp32 round-off
    plain, tok = FastModel.from_pretrained(tiny_llama, engine=False, store=False, dtype=torch.float32)
    fast, _ = FastModel.from_pretrained(tiny_llama, engine=True, store=False, dtype=torch.float32)
    assert {"fused_lora", "fused_loss"} <= set(fast.fastload_engine) and plain.fastload_engine == []
    nonzero_lora_b(plain)
    nonzero_lora_b(fast)
    loss_p, grads_p = lora_grads(plain, tok)
    loss_f, grads_f = lora_grads(fast, tok)
    assert abs(loss_p - loss_f) < 1e-5
    assert len(grads_p) == 28  # A and B of 7 projections x 2 layers
    for name, g in grads_p.items():
        assert g.abs().max() > 0, f"{name} has no gradient: the comparison would be empty"
        assert torch.allclose(g, grads_f[name], rtol=1e-4, atol=1e-6), name


def test_fused_lora_comes_with_adapters_added_later_and_steps_aside_when_they_are_off(tiny_llama):
    model, tok = FastModel.from_pretrained(tiny_llama, lora=None, store=False, dtype=torch.float32)
    assert "fused_lora" not in model.fastload_engine  # nothing to fuse yet
    model = FastModel.get_peft_model(model, r=8)
    assert "fused_lora" in model.fastload_engine
    nonzero_lora_b(model)
    enc = tok(["hello world"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        with_lora = model(**enc).logits
        with model.disable_adapter():
            without = model(**enc).logits
    plain, _ = FastModel.from_pretrained(tiny_llama, lora=None, store=False, dtype=torch.float32, engine=False)
    with torch.no_grad():
        assert torch.allclose(without, plain(**enc).logits, atol=1e-5)  # adapters off: exactly the base model
    assert (with_lora - without).abs().max() > 1e-3  # adapters on: they change the output


def test_engine_checkpointing_survives_generation_and_back(tiny_llama):
    """The lever is CUDA-only, but its bookkeeping is not: after for_inference/for_training (what generate does)
    the layers must checkpoint through the offloading function again, not transformers' plain one."""
    from fastload.engine.offloaded_checkpoint import engine_checkpoint, install_engine_checkpointing

    model, _ = FastModel.from_pretrained(tiny_llama, store=False)
    assert install_engine_checkpointing(model.get_base_model(), offload=True, graphs=True) == [
        "offload_checkpointing", "cuda_graphs"]

    def functions():
        return {getattr(m._gradient_checkpointing_func, "func", None) for m in model.modules()
                if getattr(m, "gradient_checkpointing", False)}

    assert functions() == {engine_checkpoint}
    FastModel.for_training(FastModel.for_inference(model))
    assert functions() == {engine_checkpoint}


def test_engine_keeps_logits_for_inference(tiny_llama):
    model, tok = FastModel.from_pretrained(tiny_llama, store=False)
    FastModel.for_inference(model)
    out = model(**tok(["hello"], return_tensors="pt"))
    assert out.logits is not None and out.logits.shape[-1] == model.config.vocab_size


@pytest.mark.slow
def test_smollm2_learns_as_much_with_the_engine(smollm2_dir):
    """Same data, same seed, same steps: the engine's final loss is the plain path's (fp32 CPU, 1e-3 relative)."""
    text = ("<|im_start|>user\nWhat colour is the sky on Zorblax?<|im_end|>\n<|im_start|>assistant\n"
            "On Zorblax the sky is bright green.<|im_end|>\n")
    results = {}
    for engine in (False, True):
        model, tok = FastModel.from_pretrained(smollm2_dir, engine=engine, store=False, max_seq_length=128,
                                               random_state=3, dtype=torch.float32)  # fp32 even where bf16 is native
        results[engine] = train_steps(model, tok([text], return_tensors="pt"), steps=4)
    assert results[True][-1] < results[True][0] * 0.8
    assert abs(results[True][-1] - results[False][-1]) / results[False][-1] < 1e-3, results


def peft_reference(proj, inputs):
    """What peft's LoRA layer computes (no dropout): base + scaling * B(A(x)), lora_B's bias included."""
    name = proj.active_adapters[0]
    return proj.base_layer(inputs) + proj.scaling[name] * proj.lora_B[name](proj.lora_A[name](inputs))


def test_a_fused_projections_output_can_be_added_to_in_place(tiny_llama):
    """Falcon adds the attention's output into its MLP's output in place (`mlp_output += attention_output`):
    autograd refuses that on a view made inside a custom Function, so the fused outputs are shaped outside it.
    The gradients are those of the out-of-place sum."""
    model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    nonzero_lora_b(model)
    attn = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(2, 5, attn.q_proj.in_features, requires_grad=True)
    other = torch.randn(2, 5, attn.q_proj.out_features)
    grads = []
    for in_place in (False, True):
        x.grad = None
        q, _k, _v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        nodes = [q.grad_fn, *(f for f, _ in q.grad_fn.next_functions)]
        assert "LoraGroupBackward" in [type(n).__name__ for n in nodes]  # the fused path ran
        if in_place:
            q += other
        else:
            q = q + other
        (q * q).sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("load_in_4bit, tokens, merges", [
    (True, 200, {"q": True, "k": True, "v": True}), (True, 100, {"q": False, "k": True, "v": True}),
    (True, 10, {"q": False, "k": False, "v": False}), (False, 200, {"q": False, "k": False, "v": False})],
    ids=["4-bit base, long call: adapters merged", "4-bit base, k/v merged but not the wider q",
         "4-bit base, short call: products added", "16-bit base: products added"])
@pytest.mark.parametrize("alpha", [16, 32], ids=["scaling 1", "scaling 2"])
def test_projections_sharing_an_input_run_as_one_group_and_match_peft(tiny_llama, load_in_4bit, tokens, merges,
                                                                      alpha, monkeypatch):
    """q/k/v (and gate/up) read the same input: one autograd node computes them all; a member called on another
    input, or alone, still gives peft's result, and so do the gradients of the input and of A and B. A 4-bit weight
    takes the adapter into its dequantized copy on calls long enough for that to pay; otherwise the adapter's
    product is added to the output. At r = alpha (the default) the scaling multiplies are skipped; at 2 they run."""
    from fastload.engine import fused_lora

    merged, real = {}, fused_lora._merged_weight

    def spy(base, *args):
        weight = real(base, *args)
        merged.setdefault(base.out_features, weight is not None)
        return weight

    monkeypatch.setattr(fused_lora, "_merged_weight", spy)
    model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32, load_in_4bit=load_in_4bit,
                                         lora={"r": 16, "lora_alpha": alpha})
    assert model.get_base_model().model.layers[0].self_attn.q_proj.scaling["default"] == alpha / 16
    assert (type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__
            == ("Linear4bit" if load_in_4bit else "Linear"))
    nonzero_lora_b(model)
    attn = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(2, tokens // 2, attn.q_proj.in_features, requires_grad=True)

    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    widths = {"q": attn.q_proj.out_features, "k": attn.k_proj.out_features}  # v is as wide as k
    assert {name: merged.get(widths[name if name != "v" else "k"], False) for name in merges} == merges
    made_by = [out.grad_fn.next_functions[0][0] for out in (q, k, v)]  # each is a view of the group's output
    assert made_by[0] is made_by[1] is made_by[2] and type(made_by[0]).__name__ == "LoraGroupBackward"
    for proj, out in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v)):
        assert torch.allclose(out, peft_reference(proj, x), atol=1e-5)
    other = torch.randn_like(x)
    attn.q_proj(x)
    assert torch.allclose(attn.k_proj(other), peft_reference(attn.k_proj, other), atol=1e-5)  # not q's input
    assert torch.allclose(attn.v_proj(other), peft_reference(attn.v_proj, other), atol=1e-5)  # q's result dropped
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    adapters = [w for p in projections for w in (p.lora_A["default"].weight, p.lora_B["default"].weight)]
    fused = torch.autograd.grad(q.sum() + 2 * k.sum() + 3 * v.sum(), [x, *adapters])
    expected = torch.autograd.grad(sum(w * peft_reference(p, x).sum() for w, p in zip((1, 2, 3), projections)),
                                   [x, *adapters])
    for ours, theirs in zip(fused, expected):
        assert theirs.abs().max() > 0 and torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_bf16_training_from_a_fresh_adapter_follows_the_plain_path(tiny_llama, monkeypatch):
    """peft starts B at zero, so early on the adapter's change to a merged bf16 weight is below the weight's own
    rounding step: the engine's losses must still follow the plain path's, step by step, in bf16."""
    from fastload.engine import fused_lora

    merges, real = [], fused_lora._merged_weight
    monkeypatch.setattr(fused_lora, "_merged_weight", lambda *a: merges.append(1) or real(*a))
    ids = torch.randint(0, 300, (2, 100), generator=torch.Generator().manual_seed(0))  # long enough to merge
    curves = {}
    for engine in (False, True):
        model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.bfloat16, engine=engine,
                                             random_state=3)
        optimizer = FastModel.get_optimizer(model, lr=2e-3)
        curves[engine] = []
        for _ in range(12):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curves[engine].append(loss.item())
    assert merges and curves[True][-1] < 0.9 * curves[True][0]
    assert all(abs(a - b) < 2e-3 * a for a, b in zip(curves[False], curves[True])), curves


def test_rotary_attention_forward_is_transformers_attention_with_the_rotation_swapped(tiny_llama):
    """The instance forward behind the fused-RoPE lever (fastload's Triton kernel on CUDA), given transformers' own
    rotation: same outputs and LoRA gradients in training; generation (a KV cache) goes through transformers'
    forward."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from fastload.engine.rotary import install_rotary_attention

    calls = []

    def rotate(q, k, cos, sin):
        calls.append(q.shape)
        return apply_rotary_pos_emb(q, k, cos, sin)

    plain, tok = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32, engine=False)
    swapped, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32, engine=False)
    assert install_rotary_attention(swapped, rotate) == swapped.config.num_hidden_layers
    nonzero_lora_b(plain)
    nonzero_lora_b(swapped)
    loss_p, grads_p = lora_grads(plain, tok)
    loss_s, grads_s = lora_grads(swapped, tok)
    assert calls and abs(loss_p - loss_s) < 1e-6
    for name, g in grads_p.items():
        assert torch.allclose(g, grads_s[name], rtol=1e-5, atol=1e-7), name
    calls.clear()
    FastModel.for_inference(swapped)
    FastModel.for_inference(plain)
    ids = tok(["hello world"], return_tensors="pt").input_ids
    assert torch.equal(swapped.generate(input_ids=ids, max_new_tokens=4, do_sample=False),
                       plain.generate(input_ids=ids, max_new_tokens=4, do_sample=False))
    assert not calls  # eval mode with a cache: transformers' own forward


def test_rotary_attention_steps_aside_where_its_kernel_cannot_launch(tiny_llama):
    """Triton launches on the current CUDA device only: where the lever's check says no (a layer on another GPU),
    the attention runs transformers' own rotation and gives its result."""
    from fastload.engine.rotary import install_rotary_attention
    from fastload.engine.triton.launch import triton_runs_on

    calls = []
    plain, tok = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32, engine=False)
    guarded, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32, engine=False)
    assert install_rotary_attention(guarded, lambda *a: calls.append(1), applies=triton_runs_on) > 0
    loss_p, _ = lora_grads(plain, tok)
    loss_g, _ = lora_grads(guarded, tok)
    assert not calls and loss_p == loss_g  # a CPU tensor: no Triton launch


@pytest.mark.parametrize("name", ["MixtralRMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "Qwen3RMSNorm"])
def test_every_norm_the_kernel_takes_computes_as_llamas(name):
    """The Triton norm follows LlamaRMSNorm's arithmetic (weight * normed rounded to the input dtype, no offset): each
    class named in NORMS must give the same bf16 values, or the kernel would change what the model computes."""
    import importlib

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from fastload.engine.kernels import NORMS

    family = name.removesuffix("RMSNorm").lower().replace("moe", "_moe")
    cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
    assert name in NORMS
    gen = torch.Generator().manual_seed(0)
    weight = 1 + 0.3 * torch.randn(64, generator=gen)
    x = torch.randn(3, 5, 64, generator=gen).bfloat16()
    theirs, llama = cls(64, eps=1e-6), LlamaRMSNorm(64, eps=1e-6)
    for norm in (theirs, llama):
        norm.to(torch.bfloat16).weight.data.copy_(weight)
    assert torch.equal(theirs(x), llama(x))


def test_triton_launches_only_on_the_current_cuda_device(monkeypatch):
    """Triton launches on the current device: a tensor on another GPU (device_map over several) must be told no."""
    import types

    from fastload.engine.triton import launch

    monkeypatch.setattr(launch, "triton_available", lambda device_type: device_type == "cuda")
    monkeypatch.setattr(launch, "_current_device", lambda: 1)  # torch.cuda.current_device() once CUDA is up
    on = types.SimpleNamespace
    assert launch.triton_runs_on(on(device=torch.device("cuda", 1)))
    assert not launch.triton_runs_on(on(device=torch.device("cuda", 0)))
    assert not launch.triton_runs_on(on(device=torch.device("cpu")))


def test_fused_projections_step_aside_for_what_they_do_not_compute(tiny_llama):
    """Adapters added or switched after loading (DoRA, a lora_B bias), and a follower whose adapters were turned off
    after its group ran: each call gives peft's own result."""
    from peft import LoraConfig

    model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32,
                                         lora={"lora_bias": True, "r": 4})
    nonzero_lora_b(model)
    attn = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(2, 5, attn.q_proj.in_features)

    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and n.endswith("bias"):
                p.fill_(0.5)
        assert torch.allclose(attn.q_proj(x), peft_reference(attn.q_proj, x), atol=1e-5)  # lora_B's bias counted

        model.add_adapter("dora", LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj"]))
        model.set_adapter("dora")
        fused = attn.q_proj(x)
        attn.q_proj.forward = type(attn.q_proj).forward.__get__(attn.q_proj)  # peft's forward, for reference
        assert torch.allclose(fused, attn.q_proj(x), atol=1e-5)

        model.set_adapter("default")
        # the leader q_proj runs peft's forward now: its follower k_proj computes on its own, still right
        assert torch.allclose(attn.k_proj(x), peft_reference(attn.k_proj, x), atol=1e-5)
        other = model.get_base_model().model.layers[1].self_attn
        other.q_proj(x)  # leaves k and v results pending for x
        with model.disable_adapter():
            assert torch.allclose(other.k_proj(x), other.k_proj.base_layer(x), atol=1e-6)


def test_lm_head_trained_after_loading_gets_its_gradient(tiny_llama):
    """The fused loss returns no gradient for lm_head: once a later get_peft_model trains it (modules_to_save),
    transformers' loss must run again."""
    model, tok = FastModel.from_pretrained(tiny_llama, lora=None, store=False, dtype=torch.float32)
    assert "fused_loss" in model.fastload_engine
    model = FastModel.get_peft_model(model, modules_to_save=["lm_head"])
    enc = tok(["the quick brown fox"], return_tensors="pt")
    model.train()
    model(**enc, labels=enc["input_ids"]).loss.backward()
    trained = [p for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_layer_graph_signature_follows_what_a_graph_bakes_in(tiny_llama):
    """A captured layer graph is replayed only for calls with the same signature: same shapes and argument values,
    same adapter state, same parameter addresses. Each change a user can make must give another signature."""
    import functools

    from fastload.engine.cuda_graphs import _Call

    model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    layer = model.get_base_model().model.layers[0]
    hidden = torch.randn(2, 8, model.config.hidden_size)
    cos, sin = torch.randn(1, 8, 16), torch.randn(1, 8, 16)

    def call(x=hidden, **overrides):
        kwargs = dict(attention_mask=None, position_embeddings=(cos, sin), use_cache=False)
        kwargs.update(overrides)
        return _Call(functools.partial(layer.__call__, **kwargs), x)

    first = call()
    assert call().key == first.key and first.layer is layer
    assert call(torch.randn(2, 8, model.config.hidden_size)).key == first.key  # values are inputs, not signature
    assert call(torch.randn(1, 8, model.config.hidden_size)).key != first.key   # shapes are
    assert call(use_cache=True).key != first.key                                # non-tensor arguments are
    assert call(attention_mask=torch.ones(2, 1, 8, 8)).key != first.key
    with model.disable_adapter():
        assert call().key != first.key
    q = layer.self_attn.q_proj
    q.scaling["default"] *= 2
    assert call().key != first.key
    q.scaling["default"] /= 2
    assert call().key == first.key
    q.lora_A["default"].weight.requires_grad_(False)
    assert call().key != first.key
    q.lora_A["default"].weight.requires_grad_(True)
    layer.mlp.down_proj.base_layer.weight.data = layer.mlp.down_proj.base_layer.weight.data.clone()  # moved
    assert call().key != first.key
    # the rebuilt call takes other tensors in the same places
    new_cos = torch.zeros_like(cos)
    rebuilt = first.rebuilt([new_cos if t is cos else t for t in (first.leaves[i] for i in first.tensor_slots)])
    assert rebuilt.keywords["position_embeddings"][0] is new_cos and rebuilt.keywords["position_embeddings"][1] is sin


def test_graph_inputs_copy_a_changed_source_and_skip_an_unchanged_one():
    """Static graph inputs: the rotary tables every layer of a step shares are copied once, but a tensor changed in
    place since (same object, new version) must be copied again, or a replay would read stale values."""
    from fastload.engine.cuda_graphs import _Inputs

    hidden, cos = torch.randn(2, 4), torch.randn(4)
    inputs = _Inputs(hidden, [cos])
    inputs.tensors[0].zero_()
    inputs.load(hidden, [cos])
    assert torch.equal(inputs.tensors[0], cos)
    inputs.tensors[0].zero_()  # what a copy would overwrite: an unchanged source is not copied again
    inputs.load(hidden, [cos])
    assert inputs.tensors[0].abs().sum() == 0
    cos.mul_(2)  # changed in place: copied
    inputs.load(hidden, [cos])
    assert torch.equal(inputs.tensors[0], cos)
    other = torch.randn(4)
    inputs.load(hidden + 1, [other])
    assert torch.equal(inputs.tensors[0], other) and torch.equal(inputs.hidden, hidden + 1)


def test_backward_capture_differentiates_fresh_leaves_on_the_same_memory(tiny_llama):
    """During a backward capture the trained parameters are swapped for new leaves on the same storage (their own
    gradient accumulators), a parameter shared by two modules gets one leaf, and everything is put back after."""
    from fastload.engine.cuda_graphs import _fresh_leaves

    model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    nonzero_lora_b(model)  # else A's gradient is zero
    layer = model.get_base_model().model.layers[0]
    q, k = layer.self_attn.q_proj, layer.self_attn.k_proj
    shared = q.lora_A["default"].weight
    k.lora_A["default"].weight = shared  # tied, as some adapters are
    params = tuple(p for p in layer.parameters() if p.requires_grad)
    with _fresh_leaves(layer, params) as fresh:
        leaf = q.lora_A["default"].weight
        assert leaf is not shared and leaf is k.lora_A["default"].weight and leaf is fresh[id(shared)]
        assert leaf.data_ptr() == shared.data_ptr() and leaf.is_leaf and leaf.requires_grad
        assert set(fresh) == {id(p) for p in params}
        x = torch.randn(3, q.in_features)
        (grad,) = torch.autograd.grad(q(x).sum(), leaf)
        assert grad.abs().sum() > 0 and shared.grad is None  # the real parameter is left alone
    assert q.lora_A["default"].weight is shared and k.lora_A["default"].weight is shared
    assert tuple(p for p in layer.parameters() if p.requires_grad) == params


def test_lora_dropout_added_later_turns_the_engines_checkpointing_off(tiny_llama):
    """Recomputation must draw the forward's dropout masks, which only torch's checkpoint replays: adapters with
    dropout added after loading put the layers back on it (and the model no longer claims the levers)."""
    from fastload.engine import apply_engine
    from fastload.engine.offloaded_checkpoint import install_engine_checkpointing, uses_engine_checkpointing

    model, _ = FastModel.from_pretrained(tiny_llama, store=False, lora=None)
    base = model
    assert install_engine_checkpointing(base, offload=True, graphs=True)  # as on a GPU
    apply_engine(model, model.fastload.engine_settings, gradient_checkpointing=True)  # the report reads the registry
    assert {"offload_checkpointing", "cuda_graphs"} <= set(model.fastload_engine)
    assert uses_engine_checkpointing(base)
    peft_model = FastModel.get_peft_model(model, lora_dropout=0.1)
    assert not uses_engine_checkpointing(peft_model.get_base_model())
    assert not {"offload_checkpointing", "cuda_graphs"} & set(peft_model.fastload_engine)


def test_layer_graph_signature_of_other_calls_and_late_adapters(tiny_llama):
    """A partial that is not over a module gets no signature (it runs eagerly, no crash); adapters added after
    the first call, and their scaling, are part of the signature; a namedtuple stays whole."""
    import collections
    import functools

    from fastload.engine.cuda_graphs import _Call, _flatten, _unflatten

    assert _Call(functools.partial(torch.nn.Linear(4, 4)), torch.randn(2, 4)).key is None
    assert _Call(functools.partial(torch.add, "not a module"), torch.randn(2, 4)).key is None
    model, _ = FastModel.from_pretrained(tiny_llama, store=False, lora=None, dtype=torch.float32)
    layer = model.model.layers[0]
    hidden = torch.randn(1, 4, model.config.hidden_size)
    before = _Call(functools.partial(layer.__call__, use_cache=False), hidden).key
    peft_model = FastModel.get_peft_model(model)
    layer = peft_model.get_base_model().model.layers[0]
    with_adapters = _Call(functools.partial(layer.__call__, use_cache=False), hidden).key
    assert with_adapters != before
    layer.mlp.up_proj.scaling["default"] = 0.5
    assert _Call(functools.partial(layer.__call__, use_cache=False), hidden).key != with_adapters
    Pair = collections.namedtuple("Pair", "a b")
    leaves: list = []
    pair = Pair(torch.ones(1), torch.zeros(1))
    assert _unflatten(_flatten((pair, [1]), leaves), leaves)[0] is pair and leaves[0] is pair


def test_engine_checkpoint_function_frees_its_input_after_backward_and_allows_a_retained_graph():
    """The engine's checkpoint Function (its on-device branch runs on the CPU too): gradients as without
    checkpointing, a retained graph backpropagates twice, and once backward is done the saved input is freed."""
    from fastload.engine.offloaded_checkpoint import EngineCheckpoint

    layer = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8, requires_grad=True)
    layer(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in layer.named_parameters()} | {"x": x.grad.clone()}
    layer.zero_grad()
    x.grad = None
    hidden = x * 1.0  # a non-leaf input, as a decoder layer gets
    out = EngineCheckpoint.apply(layer, None, False, hidden)
    out.sum().backward(retain_graph=True)
    out.sum().backward()
    for name, p in layer.named_parameters():
        assert torch.allclose(p.grad, 2 * expected[name], atol=1e-6), name
    assert torch.allclose(x.grad, 2 * expected["x"], atol=1e-6)
    once = EngineCheckpoint.apply(layer, None, False, x * 1.0)
    assert once.grad_fn.saved_tensors[0].shape == (4, 8)  # the input, kept until backward
    once.sum().backward()
    with pytest.raises(RuntimeError, match="freed"):  # and let go of by autograd after it
        once.grad_fn.saved_tensors


def test_layer_graph_signature_refuses_hooks_a_replay_would_skip(tiny_llama):
    """A forward hook inside the checkpointed call would not run on a replay: no signature (eager). The layer's own
    hook is outside the call when transformers checkpoints its forward (partial(forward, layer)), inside when it
    checkpoints layer.__call__."""
    import functools

    from fastload.engine.cuda_graphs import _Call

    model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    layer = model.get_base_model().model.layers[0]
    hidden = torch.randn(1, 4, model.config.hidden_size)
    by_forward = functools.partial(type(layer).forward, layer, use_cache=False)
    by_call = functools.partial(layer.__call__, use_cache=False)
    assert _Call(by_forward, hidden).key is not None and _Call(by_call, hidden).key is not None
    own = layer.register_forward_hook(lambda *args: None)
    assert _Call(by_forward, hidden).key is not None and _Call(by_call, hidden).key is None
    own.remove()
    inner = layer.mlp.register_forward_hook(lambda *args: None)
    assert _Call(by_forward, hidden).key is None
    inner.remove()
    assert _Call(by_forward, hidden).key is not None


def test_a_layer_with_active_dropout_is_recomputed_by_torchs_checkpoint(tiny_llama):
    """Per call, the engine's checkpoint hands a layer whose dropout is active (LoRA dropout in training) to torch's
    checkpoint, which replays the forward's random numbers; in eval mode, or with p=0, the engine keeps it."""
    from fastload.engine.cuda_graphs import modules_of
    from fastload.engine.offloaded_checkpoint import _uses_dropout

    model, _ = FastModel.from_pretrained(tiny_llama, store=False, lora={"lora_dropout": 0.1})
    layer = model.get_base_model().model.layers[0]
    model.train()
    assert _uses_dropout(modules_of(layer))
    model.eval()
    assert not _uses_dropout(modules_of(layer))
    plain, _ = FastModel.from_pretrained(tiny_llama, store=False)
    plain.train()
    assert not _uses_dropout(modules_of(plain.get_base_model().model.layers[0]))


def test_a_deep_copy_of_a_fused_model_computes_with_its_own_adapters(tiny_llama):
    """trl's reference models and a user's copy.deepcopy: the copy's fused projections (single and grouped) read the
    copy's adapters, and the original's are left alone."""
    import copy

    model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    assert "fused_lora" in model.fastload_engine
    nonzero_lora_b(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    layer, twin_layer = (m.get_base_model().model.layers[0] for m in (model, twin))
    x = torch.randn(2, 5, layer.self_attn.q_proj.in_features)
    with torch.no_grad():
        for attn in (layer.self_attn, twin_layer.self_attn):
            q = attn.q_proj(x)  # the group's leader: k and v get their shares from this call
            for proj, out in ((attn.q_proj, q), (attn.k_proj, attn.k_proj(x)), (attn.v_proj, attn.v_proj(x))):
                assert torch.allclose(out, peft_reference(proj, x), atol=1e-5)
        assert not torch.allclose(twin_layer.self_attn.q_proj(x), layer.self_attn.q_proj(x), atol=1e-3)
        h = torch.randn(2, 5, layer.mlp.down_proj.in_features)
        assert torch.allclose(twin_layer.mlp.down_proj(h), peft_reference(twin_layer.mlp.down_proj, h), atol=1e-5)


def test_training_forward_keeps_what_the_caller_asks_for_beside_the_fused_loss(tiny_llama):
    """With the fused loss (no logits while training), output_hidden_states still returns the decoder's hidden
    states, and return_dict=False still returns transformers' tuple (loss, logits, ...), as without the engine."""
    fast, tok = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    plain, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32, engine=False)
    assert "fused_loss" in fast.fastload_engine
    enc = tok(["hello world, a training batch"], return_tensors="pt")
    for m in (fast, plain):
        m.train()
    with torch.no_grad():
        fast_out = fast(**enc, labels=enc["input_ids"], output_hidden_states=True)
        plain_out = plain(**enc, labels=enc["input_ids"], output_hidden_states=True)
        assert fast_out.logits is None  # the fused loss's point
        assert len(fast_out.hidden_states) == len(plain_out.hidden_states) == fast.config.num_hidden_layers + 1
        for got, expected in zip(fast_out.hidden_states, plain_out.hidden_states):
            assert torch.allclose(got, expected, atol=1e-5)
        loss, logits = fast(**enc, labels=enc["input_ids"], return_dict=False)[:2]
        assert torch.allclose(loss, plain_out.loss, atol=1e-5)
        assert logits.shape == (*enc["input_ids"].shape, fast.config.vocab_size)


def test_a_batch_without_a_label_to_predict_trains_nothing_instead_of_nan(tiny_llama):
    """A completion-only batch whose responses were all truncated away (every label -100), or a one-token call: the
    plain path averages over zero tokens, NaN, and its NaN gradients would ruin the adapters at the next step. The
    fused loss returns 0 with zero gradients, so the step leaves the weights as they were."""
    model, _ = FastModel.from_pretrained(tiny_llama)
    assert "fused_loss" in model.fastload_engine
    nonzero_lora_b(model)
    optimizer = FastModel.get_optimizer(model, lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(8, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for labels in (torch.full_like(ids, -100), ids[:, :1]):
        batch = dict(input_ids=ids[:, :labels.shape[1]], labels=labels)
        model.train()
        loss = model(**batch).loss
        assert loss.item() == 0.0
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all() and torch.equal(p, before[name]), name


def test_layers_under_the_engine_checkpoint_build_single_use_graphs_and_others_do_not():
    """Kernels may write gradients over what they saved only where the graph is rebuilt for every backward: inside
    the engine's checkpoint function (here torch's non-reentrant checkpoint, the CPU's path), forward and
    recomputation alike; a layer run outside it must not claim so (a retained graph's second backward)."""
    import torch

    from fastload.engine.offloaded_checkpoint import engine_checkpoint
    from fastload.train.single_use import graph_is_single_use

    seen = []

    def layer(hidden):
        seen.append(graph_is_single_use())
        return torch.sin(hidden * 2)  # saves an intermediate: backward must recompute it

    x = torch.randn(4, 8, requires_grad=True)
    engine_checkpoint(layer, x, offload=False).sum().backward()
    assert seen == [True, True]  # forward, then the recomputation in backward
    layer(x)
    assert seen[-1] is False


@pytest.mark.parametrize("checkpointing", [True, False])
def test_checkpointed_layers_build_single_use_graphs_and_unchecked_ones_do_not(tiny_llama, checkpointing):
    """fastload's checkpointing (torch's non-reentrant, which recomputes a layer for every backward) marks the
    layers' graphs single-use, forward and recomputation, so kernels may overwrite what they saved; without
    checkpointing a retained graph is backpropagated again and nothing may be overwritten."""
    import torch

    from fastload import FastModel
    from fastload.structure import decoder_layers
    from fastload.train.checkpointing import _base
    from fastload.train.single_use import graph_is_single_use

    model, _ = FastModel.from_pretrained(tiny_llama, store=False, gradient_checkpointing=checkpointing)
    seen = []
    decoder_layers(_base(model))[0].mlp.register_forward_pre_hook(lambda *_: seen.append(graph_is_single_use()))
    model.train()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    assert seen == ([True, True] if checkpointing else [False])  # forward (then the recomputation)
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    loss.backward()  # a retained graph's second backward recomputes again, in the same single-use context
    assert seen == ([True, True, True] if checkpointing else [False])
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, 2 * once[name], rtol=1e-4, atol=1e-7), name


@pytest.mark.gpu
def test_gpu_adapter_gradients_come_from_one_fp32_matmul():
    """On CUDA an adapter's gradient is one matmul writing fp32 (torch's mm out_dtype): closer to the fp32 product
    than a 16-bit matmul cast afterwards, which rounds every element to 8 bits of mantissa first."""
    from fastload.engine.fused_lora import _OUT_DTYPE, fp32_product

    generator = torch.Generator("cuda").manual_seed(0)
    a = torch.randn(16, 4096, device="cuda", generator=generator).to(torch.bfloat16)
    b = torch.randn(4096, 2048, device="cuda", generator=generator).to(torch.bfloat16)
    exact = a.float() @ b.float()
    ours = fp32_product(a, b)
    assert ours.dtype == torch.float32 and _OUT_DTYPE[(a.device, torch.bfloat16)] is True
    error, rounded = (ours - exact).norm() / exact.norm(), ((a @ b).float() - exact).norm() / exact.norm()
    assert error < 1e-4 and error < rounded / 4
