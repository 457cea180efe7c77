"""Families whose layers break the usual assumptions, as a user meets them with the defaults.

- Mamba: the mixer multiplies by dt_proj's weight directly and hands out_proj's to a fused kernel, so LoRA leaves
  them alone (and peft's refusal of out_proj comes before any layer is wrapped), and dt_proj stays 16-bit.
- Mamba-2 mixers (Bamba, Granite-4-H, Zamba2, ...): with mamba_ssm installed their training forward hands out_proj's
  weight to a fused kernel; then out_proj stays 16-bit and unadapted, and without it runs as a 4-bit layer with LoRA.
- GPT-2: Conv1D weights are stored (in, out); the 4-bit layers are (out, in). A merge into the 16-bit original
  must add each delta transposed, or the merged checkpoint does not load.
- Mixture-of-experts sources keep one tensor per expert (the hub's Qwen3-MoE and Mixtral files, transformers'
  save_pretrained) where the model trains fused experts: a merge into that source adds each expert its slice of
  the fused delta and keeps the source's layout.
- JetMoe: transformers cannot checkpoint it; the load says so once and trains without it.
- Sparse-attention indexers (HY-V4, DeepSeek-V3.2): they pick keys by top-k, so no gradient reaches them; LoRA
  leaves them alone and says so.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from family_shapes import make_family_checkpoint  # noqa: E402


def test_mamba_layers_read_directly_stay_16bit_and_unadapted(tmp_path, caplog):
    import bitsandbytes as bnb
    import torch

    from fastload import FastModel

    path = make_family_checkpoint(tmp_path / "mamba", "mamba")
    with caplog.at_level(logging.INFO, logger="fastload"):
        model, _ = FastModel.from_pretrained(str(path))
    mixer = model.get_base_model().backbone.layers[0].mixer
    assert type(mixer.dt_proj) is torch.nn.Linear  # kept 16-bit: its weight is multiplied as it is
    assert isinstance(mixer.in_proj.base_layer, bnb.nn.Linear4bit)
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"in_proj", "x_proj"}, adapted
    assert "kept 16-bit: dt_proj" in caplog.text
    assert "out_proj left alone" in caplog.text and "dt_proj left alone" in caplog.text


def test_mamba_out_proj_target_refused_before_any_layer_is_wrapped(tmp_path):
    from fastload import FastModel
    from fastload.errors import AdapterError

    path = make_family_checkpoint(tmp_path / "mamba", "mamba")
    with pytest.raises(AdapterError) as err:
        FastModel.from_pretrained(str(path), lora={"target_modules": ["in_proj", "out_proj"]})
    assert "out_proj cannot carry LoRA in a mamba model" in err.value.found
    assert "['in_proj', 'x_proj']" in err.value.fix  # what the default would adapt
    bare, _ = FastModel.from_pretrained(str(path), lora=None)
    with pytest.raises(AdapterError):
        FastModel.get_peft_model(bare, target_modules=["in_proj", "out_proj"])
    assert not [n for n, m in bare.named_modules() if hasattr(m, "lora_A")]  # the user's model is untouched


@pytest.mark.parametrize("mamba_ssm", [False, True], ids=["without_mamba_ssm", "with_mamba_ssm"])
def test_mamba2_out_proj_follows_whether_the_fused_kernel_would_read_it(mamba_ssm, tmp_path, caplog, monkeypatch):
    import bitsandbytes as bnb
    import torch

    from fastload import FastModel, layer_rules

    real = layer_rules.installed
    monkeypatch.setattr(layer_rules, "installed",
                        lambda package: mamba_ssm if package == "mamba_ssm" else real(package))
    path = make_family_checkpoint(tmp_path / "bamba", "bamba")
    with caplog.at_level(logging.INFO, logger="fastload"):
        model, _ = FastModel.from_pretrained(str(path), store=False)
    out_proj = model.get_base_model().model.layers[0].mamba.out_proj
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    if mamba_ssm:
        assert type(out_proj) is torch.nn.Linear and "out_proj" not in adapted
        assert "kept 16-bit: out_proj" in caplog.text and "mamba_ssm installed" in caplog.text
    else:
        assert isinstance(out_proj.base_layer, bnb.nn.Linear4bit) and "out_proj" in adapted
    assert {"in_proj", "q_proj", "gate_proj"} <= adapted


def test_gpt2_merge_into_the_16bit_original_adds_each_delta_transposed(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fastload import FastModel
    from tiny import nonzero_lora_b

    path = make_family_checkpoint(tmp_path / "gpt2", "gpt2")
    model, tokenizer = FastModel.from_pretrained(str(path))
    nonzero_lora_b(model)
    FastModel.save_merged(model, tmp_path / "merged", tokenizer=tokenizer, source="16bit", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)  # loads: shapes right
    original = load_file(str(path / "model.safetensors"))
    written = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.0.mlp.c_fc"):
        layer = model.get_submodule(f"base_model.model.{name}")
        delta = layer.get_delta_weight("default").float()  # (out, in), as the 4-bit layer computes
        torch.testing.assert_close(written[f"{name}.weight"], original[f"{name}.weight"] + delta.t())
    assert merged.transformer.h[0].attn.c_attn.weight.shape == original["transformer.h.0.attn.c_attn.weight"].shape


@pytest.mark.parametrize("family, prefix, gate, up, down", [
    ("qwen3_moe", "model.layers.{layer}.mlp.experts", "gate_proj", "up_proj", "down_proj"),
    ("mixtral", "model.layers.{layer}.block_sparse_moe.experts", "w1", "w3", "w2")])
def test_an_moe_merge_into_a_per_expert_source_adds_each_expert_its_slice(family, prefix, gate, up, down, tmp_path,
                                                                          caplog):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fastload import FastModel
    from fastload.save.merged import Deltas
    from tiny import nonzero_lora_b

    path = make_family_checkpoint(tmp_path / family, family)
    model, tokenizer = FastModel.from_pretrained(str(path))
    nonzero_lora_b(model)
    with caplog.at_level(logging.INFO, logger="fastload"):
        FastModel.save_merged(model, tmp_path / "merged", tokenizer=tokenizer, source="16bit", dtype="float32")
    assert "merging the LoRA adapter into the 16-bit source" in caplog.text
    original = load_file(str(path / "model.safetensors"))
    written = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(written) == set(original)  # the source's names and layout
    deltas = Deltas(model)
    for layer in range(model.config.num_hidden_layers):
        gate_up = deltas.modules[f"model.layers.{layer}.mlp.experts.gate_up_proj"].get_delta_weight("default").float()
        down_delta = deltas.modules[f"model.layers.{layer}.mlp.experts.down_proj"].get_delta_weight("default").float()
        width = gate_up.shape[1] // 2
        assert gate_up.abs().sum() > 0 and down_delta.abs().sum() > 0
        for expert in range(gate_up.shape[0]):
            name = f"{prefix.format(layer=layer)}.{expert}"
            for projection, delta in ((gate, gate_up[expert, :width]), (up, gate_up[expert, width:]),
                                      (down, down_delta[expert])):
                key = f"{name}.{projection}.weight"
                torch.testing.assert_close(written[key], original[key].float() + delta)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)  # transformers reads it
    first_down = written[f"{prefix.format(layer=0)}.1.{down}.weight"]
    assert torch.equal(merged.model.layers[0].mlp.experts.down_proj[1], first_down)


def test_jetmoe_trains_without_checkpointing_and_says_so_once(tmp_path, caplog):
    import torch

    from fastload import FastModel

    path = make_family_checkpoint(tmp_path / "jetmoe", "jetmoe")
    with caplog.at_level(logging.WARNING, logger="fastload"):
        model, tokenizer = FastModel.from_pretrained(str(path))
        FastModel.for_inference(model)
        FastModel.for_training(model)
    said = [r for r in caplog.records if "gradient checkpointing: off" in r.message]
    assert len(said) == 1 and "JetMoeForCausalLM" in said[0].message
    ids = tokenizer(["hello world"], return_tensors="pt")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) for n, p in model.named_parameters()
               if "lora_B" in n)  # B starts at zero: its gradient is the first to be non-zero


@pytest.mark.parametrize("kind", ["t5", "llava"])
def test_a_model_fastload_cannot_train_says_what_kind_it_is(kind, tmp_path):
    """An encoder-decoder (T5) or an image-text model (LLaVA) has no causal LM: the error says which kind it is and
    what to use instead, rather than calling a text generator "not a text generator"."""
    import torch
    from transformers import AutoConfig, AutoModel

    from fastload import FastModel
    from fastload.errors import UnsupportedArchitecture
    from tiny import make_tokenizer

    tok = make_tokenizer()
    if kind == "t5":
        config = AutoConfig.for_model("t5", d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                      vocab_size=len(tok))
    else:
        config = AutoConfig.for_model(
            "llava", image_token_index=len(tok) - 1,
            text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok)),
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14))
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(tmp_path / kind)
    tok.save_pretrained(tmp_path / kind)
    with pytest.raises(UnsupportedArchitecture) as err:
        FastModel.from_pretrained(str(tmp_path / kind))
    expected = "an encoder-decoder model" if kind == "t5" else "an image-text model"
    assert expected in err.value.found and "not a text generator" not in err.value.found
    assert "Seq2SeqTrainer" in err.value.fix if kind == "t5" else "text-only sibling" in err.value.fix


def test_fp32_lm_head_under_a_bf16_decoder_gets_the_fused_loss_of_the_models_own_forward(tmp_path):
    """Hunyuan-V4 keeps lm_head fp32 and casts the decoder's bf16 output up before it. The fused loss (lm_head and
    cross-entropy in chunks) must do the same: it failed with a dtype mismatch on the first training step. Its loss
    equals the model's own (engine off) within bf16 round-off."""
    import torch

    from fastload import FastModel
    from tiny import nonzero_lora_b

    path = make_family_checkpoint(tmp_path / "hy_v4", "hy_v4")
    losses = []
    for engine in (True, False):
        model, tokenizer = FastModel.from_pretrained(str(path), dtype="bfloat16", engine=engine)
        assert model.get_base_model().lm_head.weight.dtype == torch.float32
        assert ("fused_loss" in model.fastload_engine) == engine
        nonzero_lora_b(model)
        batch = tokenizer(["the quick brown fox jumps over the lazy dog"], return_tensors="pt")
        model.train()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)


def test_sparse_attention_indexer_gets_no_lora_and_every_adapter_trains(tmp_path, caplog):
    """HY-V4's indexer projections (wk, wq_b) had adapters that never received a gradient: the indexer picks keys by
    top-k, which no gradient crosses. They are left frozen, the log says why, and every adapter left gets one."""
    import torch

    from fastload import FastModel
    from tiny import nonzero_lora_b

    path = make_family_checkpoint(tmp_path / "hy_v4", "hy_v4")
    with caplog.at_level(logging.INFO, logger="fastload"):
        model, tokenizer = FastModel.from_pretrained(str(path))
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert adapted and not [n for n in adapted if ".indexer." in n]
    assert any(".self_attn.q_b_proj" in n for n in adapted)  # the attention's own projections keep theirs
    assert "self_attn.indexer left frozen" in caplog.text and "top-k" in caplog.text
    assert " wk," not in caplog.text.split("LoRA r=")[1].split("(")[0]  # not listed as a target either
    nonzero_lora_b(model)
    ids = torch.randint(8, len(tokenizer) - 8, (2, 64), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    untrained = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not untrained, untrained


def test_an_moe_merge_into_a_source_with_an_expert_the_model_lacks_fails_and_writes_nothing(tmp_path):
    """A per-expert source holding one expert more than the adapter's model (another base): a clear AdapterError
    naming the missing expert, and no merged folder left behind."""
    from safetensors.torch import load_file, save_file

    from fastload import FastModel
    from fastload.errors import AdapterError
    from tiny import nonzero_lora_b

    path = make_family_checkpoint(tmp_path / "qwen3_moe", "qwen3_moe")
    model, tokenizer = FastModel.from_pretrained(str(path))
    nonzero_lora_b(model)
    experts = model.config.num_experts
    tensors = load_file(str(path / "model.safetensors"))
    for projection in ("gate_proj", "up_proj", "down_proj"):
        tensors[f"model.layers.0.mlp.experts.{experts}.{projection}.weight"] = \
            tensors[f"model.layers.0.mlp.experts.0.{projection}.weight"].clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=f"has no expert {experts}"):
        FastModel.save_merged(model, tmp_path / "merged", tokenizer=tokenizer, source="16bit")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged") or "merged" in p.name]
