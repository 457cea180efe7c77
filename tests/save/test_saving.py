"""Saving what was trained, on the real SmolLM2-135M: the adapter alone (reloads to the same logits, trains on),
merged into 16-bit weights (plain transformers loads it), re-quantized (loads pre-quantized), sharded, atomic.

One trained model is shared by the module: loading and training SmolLM2 on the CPU is what costs time here.

Tolerances: merges here are written in float32 (dtype=torch.float32) so that the only difference from the reference
is float32 round-off between x @ (W + s*B@A) and x @ W + s*(x @ A^T) @ B^T over 30 layers: 1e-3 on logits of size
~10-30. The reference is what the merge started from: the loaded model itself (its NF4 weights dequantized) for
source="dequantized"; the 16-bit base with the same adapter for the 16-bit source. The two references differ by the
NF4 quantization error (logits apart by whole units), which the tests check too, so a merge into the wrong source
cannot pass.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import user_files_snapshot
from fastload import FastModel
from fastload.errors import AdapterError, FastloadError, InvalidOption, ModelNotFound

SEQ = 64
MERGE_TOLERANCE = 1e-3  # float32 round-off of merged vs unmerged LoRA arithmetic (see the module docstring)
TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"]


def encode(tok):
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc, labels


def logits_of(model, enc):
    model.eval()
    with torch.no_grad():
        return model(**enc).logits.float()


def max_diff(a, b, enc) -> float:
    """Largest logit difference on the real (unpadded) positions."""
    mask = enc["attention_mask"].bool()
    return (a[mask] - b[mask]).abs().max().item()


def plain_transformers(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)


@pytest.fixture(scope="module")
def trained(smollm2_dir, tmp_path_factory):
    """SmolLM2 in 4-bit with LoRA, trained a few steps so lora_B is no longer zero; its logits; its adapter saved."""
    root = tmp_path_factory.mktemp("saving")
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the per-test isolation: isolate here too
        mp.setenv("FASTLOAD_HOME", str(root / "home"))
        mp.setenv("HF_HOME", str(root / "hf-home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        # fp32 compute on every CPU (one with native bf16 would pick bf16): the tolerances below are fp32 round-off
        model, tok = FastModel.from_pretrained(smollm2_dir, max_seq_length=SEQ, store=False, dtype=torch.float32)
        opt = FastModel.get_optimizer(model, lr=1e-2)
        enc, labels = encode(tok)
        model.train()
        for _ in range(3):
            model(**enc, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        logits = logits_of(model, enc)
        adapter = FastModel.save_adapter(model, root / "adapter", tokenizer=tok)
        yield SimpleNamespace(model=model, tok=tok, enc=enc, logits=logits, adapter=adapter, src=smollm2_dir)


@pytest.fixture(scope="module")
def logits_16bit_lora(trained):
    """The reference for merges into the 16-bit source: the 16-bit base (in fp32) with the trained adapter, unmerged."""
    from peft import PeftModel

    base = plain_transformers(trained.src)
    return logits_of(PeftModel.from_pretrained(base, str(trained.adapter)), trained.enc)


@pytest.fixture
def saves(tmp_path) -> Path:
    """An empty folder for outputs alone (tmp_path also holds the test's store and HF cache)."""
    folder = tmp_path / "saves"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def merged16(trained, tmp_path_factory):
    """The default merge (16-bit source, written in its bf16), no tokenizer given: shared by the tests that need one."""
    return FastModel.save_merged(trained.model, tmp_path_factory.mktemp("merged16") / "merged")


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


# -- the adapter alone --------------------------------------------------------------------------------------------

def test_adapter_round_trip_gives_the_same_logits_and_trains_on(trained):
    assert any(p.abs().max() > 0 for n, p in lora_params(trained.model).items() if "lora_B" in n), "nothing trained"
    files = {f.name for f in trained.adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"} <= files
    adapter_bytes = (trained.adapter / "adapter_model.safetensors").stat().st_size
    base_bytes = (trained.src / "model.safetensors").stat().st_size
    assert adapter_bytes < base_bytes * 0.1, (adapter_bytes, base_bytes)  # ~20 MB of LoRA vs ~270 MB of base
    config = json.loads((trained.adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == trained.src  # names the 16-bit source: findable later

    model, tok = FastModel.from_pretrained(trained.adapter, max_seq_length=SEQ, store=False, dtype=torch.float32)
    assert model.fastload.plan.adapter == str(trained.adapter)
    assert max_diff(logits_of(model, trained.enc), trained.logits, trained.enc) <= 1e-6

    params = lora_params(model)
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(params)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = FastModel.get_optimizer(model, lr=1e-3)
    model.train()
    enc, labels = encode(tok)
    model(**enc, labels=labels).loss.backward()
    opt.step()
    changed = [n for n, p in params.items() if not torch.equal(p, before[n])]
    assert len(changed) > len(params) // 2, f"only {len(changed)} of {len(params)} LoRA tensors moved"


# -- merged into 16-bit weights -----------------------------------------------------------------------------------

def test_a_merge_says_what_it_merges_into_for_a_16bit_model(tiny_llama, tmp_path, caplog):
    """A model loaded 16-bit is merged into its own 16-bit weights, and the log says so (it said "the dequantized
    4-bit weights" whatever the model held)."""
    model, tok = FastModel.from_pretrained(tiny_llama, load_in_4bit=False, store=False)
    with caplog.at_level(logging.INFO, logger="fastload"):
        FastModel.save_merged(model, tmp_path / "merged", tokenizer=tok, source="dequantized")
    assert "into the model's 16-bit weights (asked for)" in caplog.text and "4-bit" not in caplog.text


def test_merge_into_dequantized_weights_matches_the_lora_model(trained, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fastload"):
        out = FastModel.save_merged(trained.model, tmp_path / "merged", tokenizer=trained.tok, source="dequantized",
                                    dtype=torch.float32)
    assert "into the model's dequantized 4-bit weights (asked for)" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors").is_file()
    merged = logits_of(plain_transformers(out), trained.enc)
    assert max_diff(merged, trained.logits, trained.enc) <= MERGE_TOLERANCE


def test_merge_into_the_16bit_source_matches_16bit_base_plus_lora(trained, logits_16bit_lora, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fastload"):
        out = FastModel.save_merged(trained.model, tmp_path / "merged", tokenizer=trained.tok, dtype=torch.float32)
    assert f"into the 16-bit source {trained.src}" in caplog.text
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = logits_of(plain_transformers(out), trained.enc)
    assert max_diff(merged, logits_16bit_lora, trained.enc) <= MERGE_TOLERANCE
    # the LoRA model computes on NF4 weights: a merge into those would be this far away, and fail the check above
    assert max_diff(merged, trained.logits, trained.enc) > 100 * MERGE_TOLERANCE


def test_default_merge_is_written_in_the_source_dtype(trained, logits_16bit_lora, merged16):
    out = merged16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()  # the source's, copied
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    # bf16 rounding of the merged weights moves logits by a few tenths at most; the predictions stay the same
    merged = logits_of(plain_transformers(out), trained.enc)
    mask = trained.enc["attention_mask"].bool()
    agree = (merged.argmax(-1)[mask] == logits_16bit_lora.argmax(-1)[mask]).float().mean().item()
    assert agree >= 0.9, agree


def test_requantized_merge_loads_prequantized_and_matches_the_merged_model(trained, merged16, tmp_path):
    out = FastModel.save_merged(trained.model, tmp_path / "merged4", tokenizer=trained.tok, quantize=True)
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["load_in_4bit"] and quantization["bnb_4bit_quant_type"] == "nf4"
    from fastload.atomic import RECORD

    assert not [f for f in out.iterdir() if f.name.startswith(".") and f.name != RECORD], "temporary files left"
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    # 4-bit projections, 16-bit embeddings: well under half the 16-bit merge (fp32 embeddings would not be)
    assert size(out) < 0.5 * size(merged16), (size(out), size(merged16))

    model, _ = FastModel.from_pretrained(out, max_seq_length=SEQ, lora=None, store=False, dtype=torch.float32)
    assert model.fastload.plan.prequantized
    # the same NF4 quantization of the same merged weights, done on the fly: what the saved checkpoint must equal
    on_the_fly, _ = FastModel.from_pretrained(merged16, max_seq_length=SEQ, lora=None, store=False,
                                              dtype=torch.float32)
    assert not on_the_fly.fastload.plan.prequantized
    assert max_diff(logits_of(model, trained.enc), logits_of(on_the_fly, trained.enc), trained.enc) <= 1e-4



def test_evaluating_in_bf16_leaves_the_4bit_weights_as_loaded(tiny_llama, saves):
    """On AVX512-BF16 CPUs bitsandbytes would repack 4-bit weights at the first no-grad forward, rounding their
    scales; fastload keeps them as loaded, so a later merge writes exactly the weights that were trained on."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    model, tok = FastModel.from_pretrained(tiny_llama, lora=None, store=False, dtype=torch.bfloat16)
    model = FastModel.get_peft_model(model)  # fresh LoRA: B = 0, so the merge must equal the dequantized weights
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    before = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    model.eval()
    with torch.no_grad():
        model(**tok(["hello world"], return_tensors="pt"))
    assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float(), before)
    out = FastModel.save_merged(model, saves / "merged", source="dequantized", dtype=torch.float32)
    written = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(written, before)

# -- shards, progress, atomicity ----------------------------------------------------------------------------------

def test_small_max_shard_size_writes_shards_and_an_index(trained, merged16, tmp_path, capsys):
    from safetensors.torch import load_file

    out = FastModel.save_merged(trained.model, tmp_path / "merged", max_shard_size="60MB")
    assert "merging LoRA into shards" in capsys.readouterr().err  # the progress bar
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 4 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    # at most 60 MB a shard (the largest tensor, the 57 MB bf16 embedding, fits)
    assert all(f.stat().st_size <= 60e6 + 1e5 for f in shards)
    # the same tensors as the one-file merge, and plain transformers reads the sharded layout
    whole = load_file(str(merged16 / "model.safetensors"))
    parts = {k: v for f in shards for k, v in load_file(str(f)).items()}
    assert parts.keys() == whole.keys() == index["weight_map"].keys()
    assert all(torch.equal(parts[k], whole[k]) for k in whole)
    model = plain_transformers(out)
    assert torch.equal(model.model.layers[29].mlp.down_proj.weight,
                       whole["model.layers.29.mlp.down_proj.weight"].float())


@pytest.mark.parametrize("interrupt", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_failure_mid_merge_leaves_nothing_half_written(trained, saves, monkeypatch, interrupt):
    import safetensors.torch

    real_save, calls = safetensors.torch.save_file, []

    def fails_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise interrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fails_on_second_shard)
    with pytest.raises(type(interrupt)):
        FastModel.save_merged(trained.model, saves / "merged", source="dequantized", max_shard_size="20MB")
    assert len(calls) == 2  # it did fail in the middle, after a shard was written
    assert list(saves.iterdir()) == [], "a folder or temporary files were left behind"


def test_a_merge_that_does_not_load_back_is_an_adapter_error_and_writes_nothing(trained, saves, monkeypatch):
    """verify loads what was written with plain transformers: a checkpoint it refuses (as one whose config named
    the vocabulary before tokens were added did) must not be left as the user's merged model."""
    import json

    from fastload.errors import AdapterError
    from fastload.save import merged as merging

    real = merging._set_config_dtype

    def stale_vocabulary(config_file, dtype):  # a config.json whose vocabulary the weights do not have
        real(config_file, dtype)
        config = json.loads(config_file.read_text())
        config["vocab_size"] -= 1
        config_file.write_text(json.dumps(config))

    monkeypatch.setattr(merging, "_set_config_dtype", stale_vocabulary)
    with pytest.raises(AdapterError, match="plain transformers") as e:
        FastModel.save_merged(trained.model, saves / "merged", source="dequantized", dtype=torch.bfloat16)
    assert "does not load" in e.value.found and "save the adapter alone" in e.value.fix
    assert list(saves.iterdir()) == []


def test_a_failed_merge_keeps_the_previous_output(trained, saves, monkeypatch):
    import safetensors.torch

    out = saves / "merged"  # what a previous save leaves (config.json marks it), small to keep the test fast
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"previous weights")
    before = user_files_snapshot(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        FastModel.save_merged(trained.model, out, source="dequantized", max_shard_size="20MB")
    assert user_files_snapshot(out) == before
    assert [f.name for f in saves.iterdir()] == ["merged"]


# -- errors a user can cause --------------------------------------------------------------------------------------

def assert_explained(error: FastloadError, *words: str):
    assert error.asked and error.found and error.fix, str(error)
    for word in words:
        assert word in str(error), (word, str(error))


def test_merging_or_saving_a_model_without_adapters_is_refused(tiny_llama, saves):
    model, _ = FastModel.from_pretrained(tiny_llama, lora=None, store=False)
    with pytest.raises(AdapterError) as e:
        FastModel.save_merged(model, saves / "merged")
    assert_explained(e.value, "no LoRA adapters", "get_peft_model")
    with pytest.raises(AdapterError):
        FastModel.save_adapter(model, saves / "adapter")
    assert list(saves.iterdir()) == []


def test_a_folder_of_other_files_or_the_source_itself_is_never_replaced(trained, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    for save in (FastModel.save_merged, FastModel.save_adapter):
        with pytest.raises(InvalidOption) as e:
            save(trained.model, folder)
        assert_explained(e.value, "not a previous save", "new or empty folder")
    assert [f.name for f in folder.iterdir()] == ["thesis.txt"]

    before = user_files_snapshot(trained.src)
    with pytest.raises(InvalidOption) as e:  # holds config.json like a previous save, but it is the original
        FastModel.save_merged(trained.model, trained.src)
    assert_explained(e.value, "holds the model it is merged from", "another folder")
    assert user_files_snapshot(trained.src) == before


def test_a_previous_save_is_replaced(trained, saves):
    from fastload.atomic import RECORD

    out = FastModel.save_adapter(trained.model, saves / "adapter")
    (out / "stale.txt").write_text("from the previous save")  # a file fastload wrote there: listed in its record
    record = json.loads((out / RECORD).read_text())
    (out / RECORD).write_text(json.dumps({**record, "files": record["files"] + ["stale.txt"]}))
    (out / "notes.md").write_text("the user's own notes")  # not fastload's: kept
    FastModel.save_adapter(trained.model, out)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "stale.txt").exists()
    assert (out / "notes.md").read_text() == "the user's own notes"
    assert [f.name for f in saves.iterdir()] == ["adapter"]


def test_an_adapter_whose_base_cannot_be_found_says_so(trained, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained.adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "nobody-knows/no-such-model-7b"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFound) as e:  # offline (HF_HUB_OFFLINE=1), not cached, not in the registry
        FastModel.from_pretrained(adapter, store=False)
    assert_explained(e.value, "nobody-knows/no-such-model-7b")


def test_bad_merge_options_are_explained(trained, saves):
    with pytest.raises(InvalidOption) as e:
        FastModel.save_merged(trained.model, saves / "m", source="fp8")
    assert_explained(e.value, "fp8", "dequantized")
    with pytest.raises(InvalidOption) as e:
        FastModel.save_merged(trained.model, saves / "m", max_shard_size="lots")
    assert_explained(e.value, "lots", "5GB")
    assert list(saves.iterdir()) == []


def test_saving_under_a_file_is_a_save_error_and_writes_nothing(trained, saves):
    """A path whose parent is a file cannot hold a folder: fastload's SaveError says where and what to do."""
    from fastload.errors import SaveError

    blocker = saves / "notes.txt"
    blocker.write_text("not a folder")
    with pytest.raises(SaveError, match="Saving to .*notes.txt/adapter") as err:
        FastModel.save_adapter(trained.model, blocker / "adapter")
    assert "what to do" in str(err.value)
    assert sorted(p.name for p in saves.iterdir()) == ["notes.txt"]
