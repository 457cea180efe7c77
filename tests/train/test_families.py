"""Every model family a user reaches for, with all defaults: load, train, adapter round trip, merge, generation.

Each family is a tiny random checkpoint (tests/train/family_shapes.py) saved as real safetensors. The reference is
the plain path a user would write by hand: transformers + bitsandbytes NF4 + peft LoRA on the same targets, the same
initial adapters, bitsandbytes' AdamW8bit. Everything computes in fp32 on the CPU, so the tolerances below are
round-off: 1e-4 relative on the losses (fastload's chunked loss and lean optimizer step against transformers' and
bitsandbytes' own), 1e-4 absolute on logits after a round trip or a merge into the dequantized weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from family_shapes import FAMILIES, MOE, PEFT_EXPERTS, make_family_checkpoint  # noqa: E402

STEPS = 3
LR = 1e-3
LOSS_RTOL = 1e-4
LOGITS_ATOL = 1e-4
# cuda_graphs is opt-in
GPU_DEFAULT_LEVERS = ("fused_lora", "fused_loss", "offload_checkpointing", "kernels", "host_embedding")
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?"]


def batch_of(tokenizer):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch, labels=labels)


def plain_qlora(path: Path, fast_model):
    """The hand-written path: transformers' NF4 load, peft LoRA with fastload's targets and seed, fp32 adapters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fastload.layer_rules import kept_unquantized
    from fastload.settings import DEFAULT_SEED

    kept = sorted(kept_unquantized(fast_model.config.model_type))  # what plain bitsandbytes cannot run (Mamba)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["lm_head", *kept] if kept else None)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    round_experts_through_nf4(model)
    used = fast_model.peft_config["default"]
    config = LoraConfig(r=used.r, lora_alpha=used.lora_alpha, lora_dropout=used.lora_dropout,
                        target_modules=sorted(used.target_modules), target_parameters=used.target_parameters,
                        exclude_modules=used.exclude_modules, task_type="CAUSAL_LM")
    torch.manual_seed(DEFAULT_SEED)
    peft_model = get_peft_model(model, config)
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return peft_model


def round_experts_through_nf4(model) -> None:
    """fastload stores MoE experts 4-bit (bitsandbytes leaves them 16-bit): the reference holds the values those NF4
    bytes dequantize to, in its own dense parameters, so the comparison stays one of arithmetic."""
    import torch

    from fastload.load.experts import expert_slots
    from fastload.load.nf4_experts import quantize_stack
    from fastload.structure import decoder_layers

    with torch.no_grad():
        for module, name in expert_slots(decoder_layers(model) or [], model.config):
            weight = module._parameters[name]
            weight.copy_(quantize_stack(weight.data).dequantize())


def train(model, optimizer, batch) -> list[float]:
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def logits_of(model, batch):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def registry_families() -> set[str]:
    from fastload.sources.registry import load_registry

    return {entry.family for entry in load_registry().entries}


def test_matrix_covers_every_registry_family():
    """A family added to the registry without a tiny shape here would ship untested."""
    assert registry_families() <= set(FAMILIES), sorted(registry_families() - set(FAMILIES))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_with_defaults(family, tmp_path):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from fastload import FastModel
    from tiny import nonzero_lora_b

    path = make_family_checkpoint(tmp_path / family, family)
    model, tokenizer = FastModel.from_pretrained(str(path))
    plain = plain_qlora(path, model)
    for m in (model, plain):
        nonzero_lora_b(m)
    batch = batch_of(tokenizer)

    adapted = model.peft_config["default"].target_parameters or []
    assert bool(adapted) == (family in MOE), adapted  # experts adapted on MoE families, nothing extra on dense ones
    assert not engine_levers_unaccounted(model.fastload_engine, ("fused_lora", "fused_loss")), model.fastload_engine
    fast_losses = train(model, FastModel.get_optimizer(model, lr=LR), batch)
    plain_losses = train(plain, bnb.optim.AdamW8bit([p for p in plain.parameters() if p.requires_grad], lr=LR), batch)
    assert fast_losses == pytest.approx(plain_losses, rel=LOSS_RTOL)
    assert fast_losses[-1] < fast_losses[0]

    trained = logits_of(model, batch)
    FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tokenizer)
    reloaded, _ = FastModel.from_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(logits_of(reloaded, batch), trained, atol=LOGITS_ATOL, rtol=0)
    del reloaded

    FastModel.save_merged(model, tmp_path / "merged", tokenizer=tokenizer, source="dequantized", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(merged, batch), trained, atol=LOGITS_ATOL, rtol=0)

    FastModel.for_inference(model)
    prompt = tokenizer(["hello world"], return_tensors="pt")
    with torch.no_grad():
        fast_ids = model.generate(**prompt, max_new_tokens=6, do_sample=False)
        merged_ids = merged.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert fast_ids.tolist() == merged_ids.tolist()
    assert isinstance(FastModel.generate(model, tokenizer, "hello", max_new_tokens=3), str)


@pytest.mark.parametrize("family", ["gpt2", "gpt_bigcode", "bloom", "falcon", "mpt", "gpt_neox", "gptj", "codegen",
                                    "mamba", "falcon_mamba", "rwkv", "phi"])
def test_fused_loss_of_decoders_kept_elsewhere_and_heads_with_a_bias(family, tmp_path):
    """GPT-2, StarCoder, BLOOM, Falcon, MPT, GPT-J, CodeGen (.transformer), Pythia (.gpt_neox), Mamba and
    Falcon-Mamba (.backbone) and RWKV (.rwkv, head `head`) get the chunked loss, GPT-J, CodeGen and Phi with their
    head's bias (made non-zero); it is their own forward's loss, gradients included."""
    import torch

    from fastload import FastModel
    from tiny import nonzero_lora_b

    model, tokenizer = FastModel.from_pretrained(str(make_family_checkpoint(tmp_path / family, family)))
    assert "fused_loss" in model.fastload_engine, model.fastload_engine.skipped
    nonzero_lora_b(model)
    bias = model.get_output_embeddings().bias
    if bias is not None:  # saved as zeros by a fresh model: a dropped bias must show
        with torch.no_grad():
            bias.normal_(0, 3, generator=torch.Generator().manual_seed(0))
    batch = batch_of(tokenizer)
    model.train()
    losses, grads = [], []
    for fused in (True, False):  # return_dict=False: the model's own forward, full logits
        model.zero_grad(set_to_none=True)
        out = model(**batch) if fused else model(**batch, return_dict=False)
        loss, logits = (out.loss, out.logits) if fused else out[:2]
        assert (logits is None) == fused
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", [f for f in sorted(FAMILIES) if f in MOE])
def test_expert_adapters_train_and_change_the_output(family, tmp_path, caplog):
    """The experts' LoRA matrices receive gradients, and they alone move the output; the load says so in one line."""
    import logging

    import torch

    from fastload import FastModel
    from tiny import nonzero_lora_b

    path = make_family_checkpoint(tmp_path / family, family)
    with caplog.at_level(logging.INFO, logger="fastload"):
        model, tokenizer = FastModel.from_pretrained(str(path))
    assert [r for r in caplog.records if "LoRA" in r.message and "experts'" in r.message]
    experts = {n: p for n, p in model.named_parameters() if p.requires_grad and ".experts." in n and "lora_" in n}
    assert experts and not [n for n in experts if "router" in n or ".gate." in n]
    nonzero_lora_b(model)
    batch = batch_of(tokenizer)
    before = logits_of(model, batch)
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts.values()), \
        [n for n, p in experts.items() if p.grad is None or p.grad.abs().sum() == 0]
    with torch.no_grad():
        for p in experts.values():
            p.add_(torch.randn_like(p) * 0.05)
    assert (logits_of(model, batch) - before).abs().max() > 1e-3
    if family in PEFT_EXPERTS:  # peft's own forward, and the report says why the lever does not apply
        assert PEFT_EXPERTS[family] in model.fastload_engine.skipped["expert_lora"]
    else:
        assert "expert_lora" in model.fastload_engine  # computed per routed token, not by peft's W + s B A


def test_gemma3_lora_stays_off_the_vision_tower(tmp_path, caplog):
    """Gemma-3 4B+ holds a SigLIP tower whose attention also names its layers q_proj/k_proj/v_proj: the default LoRA
    adapts every decoder projection and nothing of the tower, and the load says so. Explicit target_modules are
    peft's own matching by name, the tower included (a user who wants it adapted asks for it)."""
    import logging

    from fastload import FastModel

    path = make_family_checkpoint(tmp_path / "gemma3", "gemma3")
    with caplog.at_level(logging.INFO, logger="fastload"):
        model, _ = FastModel.from_pretrained(str(path))
    assert "(decoder only: model.vision_tower left frozen)" in caplog.text
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    layers = model.config.text_config.num_hidden_layers
    assert all(".language_model.layers." in n for n in adapted) and len(adapted) == 7 * layers, sorted(adapted)
    asked, _ = FastModel.from_pretrained(str(path), lora={"target_modules": ["q_proj", "v_proj"]})
    adapted = {n.split(".lora_")[0] for n, p in asked.named_parameters() if p.requires_grad}
    assert any(".vision_tower." in n for n in adapted) and len(adapted) > 2 * layers


def test_gemma4_lora_stays_off_its_clipping_vision_layers(tmp_path, caplog):
    """Gemma-4 as released is image-text; its vision tower wraps each Linear in a clipping module named q_proj,
    k_proj, ..., which peft refuses to adapt: the default LoRA must leave the tower out (the load failed with peft's
    "Target module Gemma4ClippableLinear is not supported") and adapt every decoder projection."""
    import logging

    from fastload import FastModel

    path = make_family_checkpoint(tmp_path / "gemma4", "gemma4")
    with caplog.at_level(logging.INFO, logger="fastload"):
        model, _ = FastModel.from_pretrained(str(path))
    assert "(decoder only: model.vision_tower left frozen)" in caplog.text
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted and all(".language_model.layers." in n for n in adapted), sorted(adapted)
    layers = model.config.text_config.num_hidden_layers
    assert sum(n.endswith(".self_attn.q_proj") for n in adapted) == layers, sorted(adapted)


def test_qwen3_5_image_text_checkpoint_loads_its_text_model_and_says_so(tmp_path, caplog):
    """Qwen3.5 is released as one image-text checkpoint; transformers' causal LM for it is the text model alone. The
    load says the vision weights are not read, the model holds no vision module to train or to carry, and the
    checkpoint still takes the direct 4-bit load (it fell back to transformers' loader on the prefixed names)."""
    import logging

    from fastload import FastModel

    path = make_family_checkpoint(tmp_path / "qwen3_5", "qwen3_5")
    assert _holds_visual(path / "model.safetensors")  # the checkpoint as released: the tower's weights in it
    with caplog.at_level(logging.INFO, logger="fastload"):
        model, _ = FastModel.from_pretrained(str(path))
    assert "Qwen3_5ForCausalLM loads its text model only" in caplog.text
    assert not any("visual" in name for name, _ in model.named_modules())
    # read by the direct 4-bit load (its names renamed, the tower's skipped), not transformers' slower pipeline
    assert "direct 4-bit load:" in caplog.text and "direct 4-bit load not used" not in caplog.text


def _holds_visual(weights) -> bool:
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return any(".visual." in key for key in f.keys())


@pytest.mark.parametrize("asked, runs", [("sdpa", False), ("eager", True)])
def test_gemma2_attention_choice(asked, runs, tmp_path):
    """Gemma-2 has no sdpa path (its attention softcap): the default picks eager; asking sdpa names what can run."""
    from fastload import FastModel
    from fastload.errors import InvalidOption

    path = make_family_checkpoint(tmp_path / "gemma2", "gemma2")
    default, _ = FastModel.from_pretrained(str(path), lora=None)
    assert default.config._attn_implementation == "eager"
    if runs:
        model, _ = FastModel.from_pretrained(str(path), lora=None, attn_implementation=asked)
        assert model.config._attn_implementation == asked
        return
    with pytest.raises(InvalidOption) as err:
        FastModel.from_pretrained(str(path), lora=None, attn_implementation=asked)
    assert "it can run: " in err.value.found and "eager" in err.value.found and "'sdpa'" not in err.value.fix


# -- the same matrix on the GPU: every engine lever that applies against the plain path -----------------------------

def engine_levers_unaccounted(report, asked: tuple[str, ...]) -> list[str]:
    """Levers asked for that the engine report neither lists as on nor names, with a reason, as not applied."""
    on = set(report) | ({"kernels"} if {"triton_rmsnorm", "triton_swiglu", "triton_rope"} & set(report) else set())
    return [lever for lever in asked if lever not in on and lever not in report.skipped]


def merge_thresholds(model) -> tuple[int, int]:
    """Tokens per call from which the fused LoRA merges the adapter into the weight: (narrowest, widest) projection."""
    from fastload.engine.fused_lora import MERGE_MIN_TOKENS_PER_WIDTH

    widths = [min(m.base_layer.in_features, m.base_layer.out_features) for m in model.modules()
              if hasattr(m, "lora_A") and hasattr(getattr(m, "base_layer", None), "in_features")]
    return int(MERGE_MIN_TOKENS_PER_WIDTH * min(widths)), int(MERGE_MIN_TOKENS_PER_WIDTH * max(widths))


def transformers_knows(family: str) -> bool:
    from transformers import CONFIG_MAPPING

    return family in CONFIG_MAPPING


def checkpoint_of_unknown_family(directory, family: str):
    """What a user of an older transformers has in hand for a newer family: its config.json and a weight file."""
    import json

    import torch
    from safetensors.torch import save_file

    (directory / "config.json").write_text(json.dumps({"model_type": family, "hidden_size": 64}))
    save_file({"lm_head.weight": torch.zeros(8, 64)}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def test_a_family_newer_than_transformers_is_refused_naming_the_upgrade(tmp_path):
    """The GPU matrix meets families its older transformers lacks: the load ends in UnsupportedArchitecture that
    says to upgrade transformers, not in a raw transformers error."""
    from fastload import FastModel
    from fastload.errors import UnsupportedArchitecture

    assert not transformers_knows("sarvam_mla_from_the_future") and transformers_knows("llama")
    with pytest.raises(UnsupportedArchitecture, match="upgrade transformers"):
        FastModel.from_pretrained(str(checkpoint_of_unknown_family(tmp_path, "sarvam_mla_from_the_future")))


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_engine_matches_plain_on_gpu(family, tmp_path):
    """bf16 on one GPU: engine on vs off (same load otherwise), loss and LoRA gradients on a long call (every
    projection's adapter merged into its weight) and a short one (none merged), three optimizer steps, greedy
    generation. Every default lever is on or named as not applying. Tolerance: bf16 round-off (loss 2e-2 relative,
    gradient cosine > 0.98). `-rP` prints which levers each family gets."""
    import torch

    from fastload import FastModel
    from fastload.errors import UnsupportedArchitecture
    from fastload.load.transformers_floor import release_needed
    from tiny import nonzero_lora_b

    if not transformers_knows(family):  # newer than this transformers (sarvam_mla, bailing_hybrid on 5.17)
        with pytest.raises(UnsupportedArchitecture, match="upgrade transformers"):
            FastModel.from_pretrained(str(checkpoint_of_unknown_family(tmp_path, family)), device_map="cuda")
        return
    path = make_family_checkpoint(tmp_path / family, family)
    needed = release_needed(family, torch.bfloat16)
    if needed:  # this transformers cannot run the family in bf16 (DeepSeek-V4 on 5.17): the load must say so
        with pytest.raises(UnsupportedArchitecture, match=f"transformers>={needed}"):
            FastModel.from_pretrained(str(path), device_map="cuda", dtype="bfloat16")
        return
    fast, tokenizer = FastModel.from_pretrained(str(path), device_map="cuda", dtype="bfloat16")
    plain, _ = FastModel.from_pretrained(str(path), device_map="cuda", dtype="bfloat16", engine=False)
    assert list(plain.fastload_engine) == []
    print(f"{family}: {fast.fastload_engine!r}")
    assert not engine_levers_unaccounted(fast.fastload_engine, GPU_DEFAULT_LEVERS), fast.fastload_engine
    for m in (fast, plain):
        nonzero_lora_b(m)
    narrowest, widest = merge_thresholds(fast)
    # batch 2: all merged, then none (or the fewest: three tokens at least, asked of Jamba's and Gemma-3n's narrowest
    # projections: with one the loss has no token to average, NaN on the plain path; with two the one predicted token
    # attends to itself alone, so q_proj's gradient is exactly zero on both paths and their cosine says nothing)
    for length in (max(1024, widest), max(3, narrowest // 2 - 1)):
        ids = torch.randint(8, len(tokenizer) - 8, (2, length), generator=torch.Generator().manual_seed(length))
        batch = dict(input_ids=ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), labels=ids.cuda())
        losses = []
        for m in (fast, plain):
            m.train()
            m.zero_grad(set_to_none=True)
            loss = m(**batch).loss
            loss.backward()
            # None: no gradient reaches the parameter on this call (DeepSeek-V4's compressor on a short one)
            losses.append((loss.item(), {n: None if p.grad is None else p.grad.float()
                                         for n, p in m.named_parameters() if p.requires_grad}))
        (fast_loss, fast_grads), (plain_loss, plain_grads) = losses
        moe = any(".experts." in name for name in plain_grads)
        assert fast_loss == pytest.approx(plain_loss, rel=2e-2)
        for name, grad in plain_grads.items():
            assert (fast_grads[name] is None) == (grad is None), (family, length, name)
            if grad is None:
                continue
            cos = torch.nn.functional.cosine_similarity(fast_grads[name].flatten(), grad.flatten(), dim=0)
            # MoE: a bf16 near-tie in the router sends a token to another expert, which changes every gradient
            # upstream of it (H200, a few tokens: experts 0.977-0.980 in mixtral/granitemoehybrid, gpt_oss's q_proj
            # 0.944); dense families stay above 0.98
            assert cos > (0.9 if moe else 0.98), (family, length, name, cos.item())
    short = dict(batch_of(tokenizer))
    short = {k: v.cuda() for k, v in short.items()}
    fast_losses = train(fast, FastModel.get_optimizer(fast, lr=LR), short)
    plain_losses = train(plain, FastModel.get_optimizer(plain, lr=LR), short)
    assert fast_losses == pytest.approx(plain_losses, rel=2e-2)
    for m in (fast, plain):
        FastModel.for_inference(m)
    prompt = {k: v.cuda() for k, v in tokenizer(["hello world"], return_tensors="pt").items()}
    with torch.no_grad():
        generated = fast.generate(**prompt, max_new_tokens=6, do_sample=False)
        # a random tiny model's logits are nearly flat, so greedy tokens may differ on bf16 near-ties: instead each
        # token the engine chose must be (within bf16 round-off) a best token of the plain model at that position
        scores = plain(input_ids=generated).logits[0, prompt["input_ids"].shape[1] - 1:-1].float()
        chosen = scores.gather(1, generated[0, prompt["input_ids"].shape[1]:, None]).squeeze(1)
        # MoE: after three steps of slightly different bf16 training, a router tie flips one token's experts (PhiMoE on
        # an H100: router logits tied exactly, top-2/3 margin 0.0 in bf16; that token 0.12 of the scale off the plain
        # model's best on an H200 and an H100 alike, the same flow on the CPU identical)
        bound = (0.15 if moe else 0.05) * scores.abs().max()
        assert (scores.max(dim=1).values - chosen).max() < bound, (generated, scores.argmax(1))


def test_family_without_causal_lm_is_unsupported_architecture(tmp_path):
    """A checkpoint transformers cannot build as a causal LM (here a ViT image encoder) ends in fastload's error
    naming the architecture, not transformers' ValueError."""
    import torch
    from transformers import AutoConfig, AutoModel

    from fastload import FastModel
    from fastload.errors import UnsupportedArchitecture
    from tiny import make_tokenizer

    config = AutoConfig.for_model("vit", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "vit")
    make_tokenizer().save_pretrained(tmp_path / "vit")
    with pytest.raises(UnsupportedArchitecture) as err:
        FastModel.from_pretrained(str(tmp_path / "vit"))
    assert "ViT" in str(err.value)


def test_llama_3_2_vision_loads_again_and_its_adapter_reloads(tmp_path, caplog):
    """Its causal LM is the text model, whose config (MllamaTextConfig) transformers' AutoModelForCausalLM does not
    map: a store entry of it could not be loaded back (the second load failed). It is not stored; every load reads the
    image-text checkpoint, and the adapter reloads onto it."""
    import logging

    import torch
    from family_shapes import mllama_config
    from transformers import AutoModelForImageTextToText

    from fastload import FastModel
    from tiny import make_tokenizer

    tokenizer = make_tokenizer()
    config = mllama_config(dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path / "mllama")
    tokenizer.save_pretrained(tmp_path / "mllama")
    with caplog.at_level(logging.INFO, logger="fastload"):
        model, _ = FastModel.from_pretrained(str(tmp_path / "mllama"))
    assert "does not load back" in caplog.text
    assert type(model.get_base_model()).__name__ == "MllamaForCausalLM"
    batch = batch_of(tokenizer)
    train(model, FastModel.get_optimizer(model, lr=LR), batch)
    trained = logits_of(model, batch)
    FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tokenizer)
    reloaded, _ = FastModel.from_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(logits_of(reloaded, batch), trained, atol=LOGITS_ATOL, rtol=0)


def test_an_encoder_decoder_checkpoint_is_unsupported_architecture_not_a_damaged_one(tmp_path):
    """BART as released (encoder and decoder): transformers' causal LM for it is the decoder alone, which reads the
    checkpoint as one with missing weights; fastload names the kind of model and what to use instead. Its saved
    decoder-only variant (BartForCausalLM) still loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from fastload import FastModel
    from fastload.errors import UnsupportedArchitecture
    from tiny import make_tokenizer

    tokenizer = make_tokenizer()
    config = AutoConfig.for_model("bart", vocab_size=len(tokenizer), d_model=64, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                  decoder_ffn_dim=128)
    torch.manual_seed(0)
    for name, auto in (("bart", AutoModelForSeq2SeqLM), ("bart-decoder", AutoModelForCausalLM)):
        auto.from_config(config).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    with pytest.raises(UnsupportedArchitecture) as err:
        FastModel.from_pretrained(str(tmp_path / "bart"))
    assert "encoder-decoder" in str(err.value) and "Seq2SeqTrainer" in str(err.value)
    model, _ = FastModel.from_pretrained(str(tmp_path / "bart-decoder"))
    assert type(model.get_base_model()).__name__ == "BartForCausalLM"


def test_unknown_model_type_is_unsupported_architecture_naming_it(tmp_path):
    """A config.json whose model_type this transformers does not know (a newer family, or a typo) ends in fastload's
    error naming the type and what to do, before any weight is read, never in transformers' ValueError."""
    import json

    import torch
    from safetensors.torch import save_file

    from fastload import FastModel
    from fastload.errors import UnsupportedArchitecture
    from tiny import make_tokenizer

    folder = tmp_path / "newer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "frobnicator", "hidden_size": 64, "vocab_size": 384,
                                                    "architectures": ["FrobnicatorForCausalLM"]}))
    save_file({"model.embed_tokens.weight": torch.zeros(384, 64)}, str(folder / "model.safetensors"))
    make_tokenizer().save_pretrained(folder)
    with pytest.raises(UnsupportedArchitecture) as err:
        FastModel.from_pretrained(str(folder))
    assert "frobnicator" in err.value.found and "upgrade transformers" in err.value.fix


def test_offloaded_checkpointing_not_applying_says_why(tmp_path):
    """The reason the engine report gives on a GPU when offloaded checkpointing cannot apply, checked on the CPU
    models it would be given: no checkpointed layer, or LoRA dropout (recomputation would draw other numbers)."""
    from fastload import FastModel
    from fastload.engine.offloaded_checkpoint import offload_blocker
    from fastload.train.checkpointing import _base

    path = make_family_checkpoint(tmp_path / "qwen3", "qwen3")
    plain, _ = FastModel.from_pretrained(str(path), store=False, gradient_checkpointing=False)
    assert "no layer of Qwen3ForCausalLM is checkpointed" in offload_blocker(_base(plain))
    dropout, _ = FastModel.from_pretrained(str(path), store=False, lora={"lora_dropout": 0.1})
    assert offload_blocker(_base(dropout)).startswith("dropout > 0")
