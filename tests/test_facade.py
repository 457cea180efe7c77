"""The one-line load: quantization, LoRA placement, checkpointing, optimizer, training, pre-quantized round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastload import FastModel
from fastload.errors import AdapterError, InvalidOption
from tiny import EXPECTED_TARGETS, make_checkpoint


def _linear4bit():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


def lora_leaf_names(model) -> set[str]:
    return {name.split(".")[-1] for name, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}


def batch(tokenizer, device, n=2):
    texts = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"][:n]
    enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc, labels


@pytest.mark.parametrize("family", sorted(EXPECTED_TARGETS))
def test_families_get_nf4_projections_and_lora_on_each(family, tmp_path):
    ckpt = make_checkpoint(tmp_path / family, family)
    model, tok = FastModel.from_pretrained(ckpt, max_seq_length=128)
    base = model.get_base_model()
    linear4bit = _linear4bit()
    projections = [(n, m) for n, m in base.named_modules() if n.split(".")[-1] in EXPECTED_TARGETS[family]
                   and hasattr(m, "base_layer")]
    assert projections, "no projection was wrapped by LoRA"
    for name, module in projections:
        assert isinstance(module.base_layer, linear4bit), f"{name} is {type(module.base_layer).__name__}"
        assert module.base_layer.weight.quant_state.quant_type == "nf4"
    assert lora_leaf_names(model) == set(EXPECTED_TARGETS[family])
    assert not isinstance(base.lm_head, linear4bit) and base.lm_head.weight.dtype in (torch.float32, torch.bfloat16)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert base.is_gradient_checkpointing and base.config.use_cache is False
    assert tok.pad_token is not None and tok.padding_side == "right"


def test_norms_and_embeddings_are_not_upcast_on_gpu_dtype(tmp_path):
    """Frozen non-projection weights stay in the load dtype: the plain recipe's fp32 upcast costs 2.1x speed."""
    ckpt = make_checkpoint(tmp_path / "m", "llama")
    model, _ = FastModel.from_pretrained(ckpt, dtype=torch.bfloat16, gradient_checkpointing=False)
    base = model.get_base_model()
    assert base.model.norm.weight.dtype == torch.bfloat16
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16


def test_quant_options_reach_bitsandbytes(tmp_path, tiny_llama):
    model, _ = FastModel.from_pretrained(tiny_llama, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                                         bnb_4bit_quant_storage="bfloat16", lora=None, store=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, _linear4bit())
    assert q.weight.quant_state.quant_type == "fp4"
    assert q.weight.quant_state.nested is False
    assert q.weight.dtype == torch.bfloat16  # packed storage dtype


def test_user_bitsandbytes_config_wins(tiny_llama):
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)
    model, _ = FastModel.from_pretrained(tiny_llama, quantization_config=cfg, bnb_4bit_quant_type="nf4",
                                         lora=None, store=False)
    assert model.model.layers[0].mlp.up_proj.weight.quant_state.quant_type == "fp4"


def test_8bit_loads_llm_int8(tiny_llama):
    import bitsandbytes as bnb

    model, _ = FastModel.from_pretrained(tiny_llama, load_in_8bit=True, llm_int8_threshold=5.0,
                                         store=False)
    layer = model.get_base_model().model.layers[0].self_attn.v_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert layer.state.threshold == 5.0


def test_skip_modules_keep_their_layers_and_lm_head_unquantized(tiny_llama):
    import bitsandbytes as bnb

    model, _ = FastModel.from_pretrained(tiny_llama, llm_int8_skip_modules=["v_proj"], store=False)
    layer = model.get_base_model().model.layers[0].self_attn
    assert type(layer.v_proj.base_layer) is torch.nn.Linear  # skipped, as asked (LoRA still sits on it)
    assert isinstance(layer.q_proj.base_layer, bnb.nn.Linear4bit)
    assert type(model.get_base_model().lm_head) is torch.nn.Linear  # a user's list does not quantize the head


def test_16bit_load_when_quantization_off(tiny_llama):
    model, _ = FastModel.from_pretrained(tiny_llama, load_in_4bit=False, load_in_8bit=False)
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q) is torch.nn.Linear


def test_loss_falls_and_optimizer_state_is_8bit(tiny_llama):
    import bitsandbytes as bnb

    model, tok = FastModel.from_pretrained(tiny_llama, max_seq_length=64)
    opt = FastModel.get_optimizer(model, lr=5e-3)
    assert isinstance(opt, bnb.optim.AdamW8bit)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    enc, labels = batch(tok, model.device)
    losses = []
    for _ in range(6):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses
    # bitsandbytes keeps fp32 state below min_8bit_size (4096 elements) by design; everything above is 8-bit
    large = [opt.state[p] for p in opt.state if p.numel() >= 4096]
    assert large and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in large)


def test_seeded_lora_init_is_reproducible(tiny_llama):
    a, _ = FastModel.from_pretrained(tiny_llama, random_state=7, store=False)
    b, _ = FastModel.from_pretrained(tiny_llama, random_state=7, store=False)
    c, _ = FastModel.from_pretrained(tiny_llama, random_state=8, store=False)
    name = next(n for n, _ in a.named_parameters() if "lora_A" in n)
    pa, pb, pc = (dict(m.named_parameters())[name] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_lora_options_and_get_peft_model(tiny_llama):
    from peft import LoraConfig

    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    model, _ = FastModel.from_pretrained(tiny_llama, lora=lora)
    assert lora_leaf_names(model) == {"q_proj", "v_proj"}
    assert model.peft_config["default"].r == 8

    bare, _ = FastModel.from_pretrained(tiny_llama, lora=None)
    assert not any(p.requires_grad for p in bare.parameters())
    adapted = FastModel.get_peft_model(bare, r=4)
    assert lora_leaf_names(adapted) == set(EXPECTED_TARGETS["llama"])
    assert adapted.get_base_model().is_gradient_checkpointing
    assert FastModel.get_peft_model(adapted, r=4) is adapted  # same settings: nothing to do
    with pytest.raises(AdapterError, match="already has adapters"):
        FastModel.get_peft_model(adapted, r=32)
    for other, word in (({"lora_dropout": 0.1}, "lora_dropout: has 0.0, asked 0.1"),
                        ({"use_rslora": True}, "use_rslora: has False, asked True")):
        with pytest.raises(AdapterError) as err:  # not silently the old adapters
            FastModel.get_peft_model(adapted, r=4, **other)
        assert word in err.value.found


def test_adapters_targeted_by_a_regex_are_compared_as_the_regex():
    """An adapter saved elsewhere may name its targets by a regex string: comparing its letters as a set would call
    another regex 'the same settings' and silently keep the old adapters."""
    from fastload.facade import lora_differences
    from fastload.settings import LoraSettings

    current = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none", "target_modules": "q_proj|v_proj"}
    assert lora_differences(current, LoraSettings(target_modules="q_proj|v_proj")) == []
    assert lora_differences(current, LoraSettings(target_modules="v_proj|q_proj"))
    assert lora_differences(current, LoraSettings(target_modules=["q_proj", "v_proj"]))


def test_checkpointing_off_and_inference_switch(tiny_llama):
    model, tok = FastModel.from_pretrained(tiny_llama, gradient_checkpointing=False)
    assert not model.get_base_model().is_gradient_checkpointing
    model, tok = FastModel.from_pretrained(tiny_llama)
    FastModel.for_inference(model)
    assert not model.get_base_model().is_gradient_checkpointing and model.get_base_model().config.use_cache
    out = model.generate(**tok(["the quick"], return_tensors="pt").to(model.device), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 2
    FastModel.for_training(model)
    assert model.training and model.get_base_model().is_gradient_checkpointing
    assert model.get_base_model().config.use_cache is False


def test_prequantized_checkpoint_loads_without_requantizing(tiny_llama, tmp_path):
    """Save a fastload-quantized model, load it back: the plan says pre-quantized, packed weights and logits match."""
    import fastload

    model, tok = FastModel.from_pretrained(tiny_llama, lora=None, store=False)
    out = tmp_path / "q4"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    plan = fastload.resolve(out)
    assert plan.prequantized and plan.source == "local"
    again, _ = FastModel.from_pretrained(out, lora=None)
    assert again.fastload.quantized_now is False
    a = model.model.layers[1].mlp.down_proj.weight
    b = again.model.layers[1].mlp.down_proj.weight
    assert torch.equal(a.data, b.data)
    ids = tok(["hello world"], return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_max_seq_length_is_stored(tiny_llama):
    model, tok = FastModel.from_pretrained(tiny_llama, max_seq_length=100)
    assert model.max_seq_length == 100 and tok.model_max_length == 100


def test_bad_options_are_fastload_errors(tiny_llama):
    with pytest.raises(InvalidOption, match="both"):
        FastModel.from_pretrained(tiny_llama, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(InvalidOption, match="rank"):
        FastModel.from_pretrained(tiny_llama, lora={"r": 0})
    with pytest.raises(InvalidOption, match="nf4"):
        FastModel.from_pretrained(tiny_llama, bnb_4bit_quant_type="int3")


def test_max_seq_length_beyond_the_models_positions_is_kept_with_a_warning(tiny_llama, caplog):
    with caplog.at_level("WARNING", logger="fastload"):
        model, tok = FastModel.from_pretrained(tiny_llama, max_seq_length=4096, store=False)
    assert model.max_seq_length == 4096 and tok.model_max_length == 4096
    assert "max_seq_length=4096 is beyond the 512 positions" in caplog.text and "rope_scaling" in caplog.text


def test_max_seq_length_beyond_learned_positions_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    """GPT-2 has one learned embedding per position: an Unsloth notebook's max_seq_length=2048 on its 1024 positions
    would fail at the first long batch (a device-side assert on a GPU). Refused at once, naming the limit; nothing
    is stored. Unset, the length is capped at the positions."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from family_shapes import make_family_checkpoint

    monkeypatch.setenv("FASTLOAD_HOME", str(tmp_path / "home"))
    path = make_family_checkpoint(tmp_path / "gpt2", "gpt2", config=dict(
        model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=384))
    with pytest.raises(InvalidOption) as err:
        FastModel.from_pretrained(str(path), max_seq_length=2048)
    assert "128 (max_position_embeddings)" in err.value.found and "max_seq_length=128" in err.value.fix
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.safetensors"))
    model, tok = FastModel.from_pretrained(str(path), store=False)
    assert model.max_seq_length == 128


def test_max_seq_length_beyond_gptjs_rotary_table_is_refused(tmp_path):
    """GPT-J computes its rotary sin/cos once, for max_position_embeddings positions: a longer call indexes past the
    table (the GPU matrix's tiny GPT-J hit a device-side assert so). Refused at load, naming the limit."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from family_shapes import make_family_checkpoint

    path = make_family_checkpoint(tmp_path / "gptj", "gptj", config=dict(
        model_type="gptj", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128, vocab_size=384))
    with pytest.raises(InvalidOption) as err:
        FastModel.from_pretrained(str(path), max_seq_length=1024, store=False)
    assert "rotary sin/cos table" in err.value.found and "128 (max_position_embeddings)" in err.value.found
    model, tok = FastModel.from_pretrained(str(path), max_seq_length=128, store=False)
    assert model.max_seq_length == 128


def test_smollm2_in_nf4_keeps_the_16bit_models_loss(smollm2_dir):
    """The real SmolLM2-135M on a fixed chat text: NF4 (double quant) stays within 3% of the 16-bit model's loss
    (measured: -0.6%); FP4, a coarser grid, lands further away (measured: +7%), so the check can tell them apart.
    fp32 compute on every CPU, so the margin is about quantization alone."""
    text = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France "
            "is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes.<|im_end|>\n<|im_start|>user\n"
            "Name three primary colours.<|im_end|>\n<|im_start|>assistant\nRed, yellow and blue.<|im_end|>\n")
    losses = {}
    for name, options in (("16-bit", {"load_in_4bit": False}), ("nf4", {}), ("fp4", {"bnb_4bit_quant_type": "fp4"})):
        model, tok = FastModel.from_pretrained(smollm2_dir, lora=None, store=False, dtype=torch.float32, **options)
        enc = tok(text, return_tensors="pt")
        model.eval()
        with torch.no_grad():
            losses[name] = model(**enc, labels=enc["input_ids"]).loss.item()
    assert losses["16-bit"] < 3.0, losses  # a trained model: it predicts this text well
    assert abs(losses["nf4"] - losses["16-bit"]) <= 0.03 * losses["16-bit"], losses
    assert abs(losses["fp4"] - losses["16-bit"]) > abs(losses["nf4"] - losses["16-bit"]), losses


def test_too_little_memory_is_refused_before_reading_weights_with_what_would_fit(tiny_llama, monkeypatch):
    """fp32 on every CPU so the sizes are fixed: the tiny Llama's weights are 5.5 MB in 16-bit, 1.4 MB in 4-bit."""
    from fastload.errors import NotEnoughMemory

    read = []
    import transformers

    def reads_weights(*args, **kwargs):
        read.append(args)
        raise AssertionError("weights were read before the memory check refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", reads_weights)
    monkeypatch.setenv("FASTLOAD_MEMORY_LIMIT_BYTES", "3000000")
    with pytest.raises(NotEnoughMemory) as err:
        FastModel.from_pretrained(tiny_llama, load_in_4bit=False, dtype=torch.float32, store=False)
    assert "0.01 GiB" in err.value.found
    assert "load_in_4bit=True needs" in err.value.fix and "which fits" in err.value.fix
    monkeypatch.setenv("FASTLOAD_MEMORY_LIMIT_BYTES", "1000000")
    with pytest.raises(NotEnoughMemory) as err:
        FastModel.from_pretrained(tiny_llama, dtype=torch.float32, store=False)
    assert "no quantization makes it fit" in err.value.fix
    assert read == []  # refused before any weights were read


def test_weights_that_fit_but_training_may_not_load_with_a_warning_naming_a_shorter_sequence(tiny_llama, monkeypatch,
                                                                                              caplog):
    monkeypatch.setenv("FASTLOAD_MEMORY_LIMIT_BYTES", "4000000")  # 1.4 MB of weights fit; training at 512 may not
    with caplog.at_level("WARNING", logger="fastload"):
        FastModel.from_pretrained(tiny_llama, dtype=torch.float32, store=False)
    assert "LoRA training at max_seq_length=512 may need" in caplog.text
    assert "try max_seq_length=128" in caplog.text
    caplog.clear()
    monkeypatch.setenv("FASTLOAD_MEMORY_LIMIT_BYTES", "1500000")  # the weights just fit; no sequence length would
    with caplog.at_level("WARNING", logger="fastload"):
        FastModel.from_pretrained(tiny_llama, dtype=torch.float32, store=False)
    assert "even max_seq_length=64 may not fit" in caplog.text and "try max_seq_length" not in caplog.text


def test_each_decision_is_one_info_line(tiny_llama, caplog):
    """What a user reads with set_verbosity("INFO"): source, quantization, LoRA targets and count, checkpointing,
    memory after load; and the defaults behind them (sdpa attention, the CPU here)."""
    with caplog.at_level("INFO", logger="fastload"):
        model, _ = FastModel.from_pretrained(tiny_llama, store=False)
    text = caplog.text
    assert f"source: {tiny_llama}" in text and "nf4" in text
    assert "LoRA r=16 alpha=16 on down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj" in text
    assert "trainable parameters" in text and "gradient checkpointing: on" in text and "ready in" in text
    assert model.config._attn_implementation == "sdpa" and next(model.parameters()).device.type == "cpu"
    caplog.clear()
    with caplog.at_level("INFO", logger="fastload"):
        FastModel.from_pretrained(tiny_llama, store=False, gradient_checkpointing=False)
    assert "gradient checkpointing: off" in caplog.text


def test_a_model_transformers_cannot_save_quantized_still_loads_and_stores_nothing(tiny_llama, isolated_env, tmp_path,
                                                                                  monkeypatch, caplog):
    """Some models' save_pretrained cannot revert their weight conversions on 4-bit weights (Ergo raised an IndexError
    from transformers' revert_weight_conversion): the store write fails, the load it follows does not. One warning
    says why and what to do; no entry and no temporary files stay."""
    import os

    from transformers import LlamaForCausalLM

    def broken_save(self, *args, **kwargs):
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", broken_save)
    with caplog.at_level("WARNING", logger="fastload"):
        model, tok = FastModel.from_pretrained(tiny_llama)
    assert "could not store the quantized model (IndexError" in caplog.text and "store=False" in caplog.text
    enc, labels = batch(tok, "cpu")
    assert torch.isfinite(model(**enc, labels=labels).loss)
    home = Path(os.environ["FASTLOAD_HOME"])
    assert not [p for p in home.rglob("*") if p.is_file() and "lock" not in p.name], \
        sorted(home.rglob("*"))
