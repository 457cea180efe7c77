"""Resolution through the registry, the Hugging Face cache and the local store, offline, for real."""

from __future__ import annotations

import os

import pytest
import torch

import fastload
from fastload import FastModel
from fastload.errors import ModelNotFound
from fastload.sources.store import Store
from hfcache import put_in_hf_cache

ORIGINAL = "meta-llama/Meta-Llama-3-8B"
PREQUANTIZED = "unsloth/llama-3-8b-bnb-4bit"


@pytest.fixture(scope="session")
def tiny_nf4(tiny_llama, tmp_path_factory):
    """The tiny Llama quantized by fastload and saved: stands in for a registry -bnb-4bit repo."""
    model, tok = FastModel.from_pretrained(tiny_llama, lora=None, store=False)
    out = tmp_path_factory.mktemp("nf4")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def hf_home() -> str:
    return os.environ["HF_HOME"]


def packed(model, name="model.layers.0.self_attn.q_proj"):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = base.get_submodule(name)
    return getattr(module, "base_layer", module).weight.data.clone()


def test_original_id_and_alias_load_the_cached_prequantized_checkpoint(tiny_nf4):
    put_in_hf_cache(hf_home(), PREQUANTIZED, tiny_nf4)
    for name in (ORIGINAL, "llama-3-8b"):
        plan = fastload.resolve(name)
        assert plan.prequantized and plan.location == PREQUANTIZED and plan.source == "hub-cache"
        assert plan.original == ORIGINAL
    model, _ = FastModel.from_pretrained("llama-3-8b")
    assert model.fastload.quantized_now is False
    assert torch.equal(packed(model), packed(FastModel.from_pretrained(tiny_nf4, lora=None)[0]))


def test_prefer_prequantized_false_skips_the_registry(tiny_nf4, tiny_llama):
    put_in_hf_cache(hf_home(), PREQUANTIZED, tiny_nf4)
    put_in_hf_cache(hf_home(), ORIGINAL, tiny_llama)
    plan = fastload.resolve(ORIGINAL, prefer_prequantized=False)
    assert not plan.prequantized and plan.location == ORIGINAL
    assert any("prefer_prequantized=False" in t for t in plan.tried)


def test_8bit_request_skips_4bit_registry_checkpoints(tiny_nf4, tiny_llama):
    put_in_hf_cache(hf_home(), PREQUANTIZED, tiny_nf4)
    put_in_hf_cache(hf_home(), ORIGINAL, tiny_llama)
    plan = fastload.resolve(ORIGINAL, load_in_4bit=False, load_in_8bit=True)
    assert not plan.prequantized and any("registry checkpoints are 4-bit" in t for t in plan.tried)


def test_quantized_name_loads_as_typed(tiny_nf4):
    put_in_hf_cache(hf_home(), PREQUANTIZED, tiny_nf4)
    plan = fastload.resolve(PREQUANTIZED)
    assert plan.prequantized and plan.location == PREQUANTIZED and plan.original == ORIGINAL


def test_without_prequantized_the_source_is_quantized_once_then_loaded_from_the_store(tiny_llama, isolated_env):
    put_in_hf_cache(hf_home(), ORIGINAL, tiny_llama)
    first = fastload.resolve(ORIGINAL)
    assert first.source == "hub-cache" and not first.prequantized and first.store_key
    model1, _ = FastModel.from_pretrained(ORIGINAL, lora=None)
    assert model1.fastload.quantized_now
    entries = Store(isolated_env).entries()
    assert len(entries) == 1 and entries[0].source == ORIGINAL
    second = fastload.resolve(ORIGINAL)
    assert second.source == "store" and second.prequantized
    model2, _ = FastModel.from_pretrained(ORIGINAL, lora=None)
    assert model2.fastload.quantized_now is False
    assert torch.equal(packed(model1), packed(model2))
    # other settings are another entry
    assert fastload.resolve(ORIGINAL, bnb_4bit_quant_type="fp4").source == "hub-cache"
    # the entry names the exact commit it was made from; a newer snapshot of the repo is quantized anew
    import json
    import shutil

    commit = first.fingerprint
    manifest = json.loads((entries[0].path / "fastload-manifest.json").read_text())
    assert commit and json.dumps(manifest).count(commit) >= 1
    repo = os.path.join(hf_home(), "hub", "models--" + ORIGINAL.replace("/", "--"))
    shutil.copytree(os.path.join(repo, "snapshots", commit), os.path.join(repo, "snapshots", "f" * 40))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write("f" * 40)
    updated = fastload.resolve(ORIGINAL)
    assert updated.source == "hub-cache" and updated.fingerprint == "f" * 40 and updated.store_key != first.store_key


def test_resolution_reads_each_cached_snapshot_once(tiny_llama, isolated_env, monkeypatch):
    """A load of a cached 16-bit repo needs its snapshot for the store key and as the source; each lookup lists
    the cache and checks its files, so one resolution asks once."""
    import fastload.sources.resolve as sources

    put_in_hf_cache(hf_home(), ORIGINAL, tiny_llama)
    asked = []
    real = sources.cached_snapshot
    monkeypatch.setattr(sources, "cached_snapshot", lambda repo, *a, **k: asked.append(repo) or real(repo, *a, **k))
    plan = fastload.resolve(ORIGINAL)
    assert plan.source == "hub-cache" and plan.store_key and plan.fingerprint
    assert sorted(asked) == sorted(set(asked)) and ORIGINAL in asked, asked


def test_store_false_opts_out(tiny_llama, isolated_env):
    FastModel.from_pretrained(tiny_llama, lora=None, store=False)
    assert Store(isolated_env).entries() == []


def test_store_argument_and_fastload_home(tiny_llama, tmp_path):
    FastModel.from_pretrained(tiny_llama, lora=None, store=tmp_path / "elsewhere")
    assert len(Store(tmp_path / "elsewhere").entries()) == 1


def test_damaged_store_entry_is_rebuilt(tiny_llama, isolated_env, caplog):
    FastModel.from_pretrained(tiny_llama, lora=None)
    entry = Store(isolated_env).entries()[0]
    weights = next(entry.path.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="fastload"):
        plan = fastload.resolve(tiny_llama)
    assert plan.source == "local" and not plan.prequantized  # the damaged entry is never trusted
    assert "damaged" in caplog.text
    model, _ = FastModel.from_pretrained(tiny_llama, lora=None)
    assert model.fastload.quantized_now
    assert [p for e, p in Store(isolated_env).verify()] == [None]


def test_store_management(tiny_llama, isolated_env):
    FastModel.from_pretrained(tiny_llama, lora=None)
    store = Store(isolated_env)
    [entry] = store.entries()
    assert entry.size_bytes > 0 and entry.manifest["quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert store.verify() == [(entry, None)]
    assert store.remove(entry.key) == [entry] and store.entries() == []


def test_unknown_name_lists_closest_and_what_was_tried():
    with pytest.raises(ModelNotFound) as err:
        fastload.resolve("meta-llama/Meta-Lama-3-8B")
    text = str(err.value)
    assert "meta-llama/Meta-Llama-3-8B" in text  # closest registry name
    assert "hub cache" in text and "offline" in text


def test_registry_name_missing_offline_says_what_was_tried():
    with pytest.raises(ModelNotFound) as err:
        fastload.resolve(ORIGINAL)
    assert PREQUANTIZED in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_online_plan_downloads_the_prequantized_checkpoint(monkeypatch):
    """With downloads allowed the plan names the registry checkpoint; resolve itself makes no network call."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    plan = fastload.resolve(ORIGINAL)
    assert plan.source == "hub-download" and plan.location == PREQUANTIZED and plan.prequantized
    with pytest.raises(ModelNotFound):
        fastload.resolve(ORIGINAL, local_files_only=True)


def test_online_a_registry_checkpoint_beats_the_cached_16bit_original(tiny_llama, monkeypatch):
    """Only the 16-bit original is cached: offline it is quantized on the fly; online the registry's pre-quantized
    copy is downloaded instead (a quarter of the bytes, no quantization work), and the plan says why."""
    put_in_hf_cache(hf_home(), ORIGINAL, tiny_llama)
    offline = fastload.resolve(ORIGINAL)
    assert offline.source == "hub-cache" and offline.location == ORIGINAL and not offline.prequantized
    monkeypatch.delenv("HF_HUB_OFFLINE")
    online = fastload.resolve(ORIGINAL)
    assert online.source == "hub-download" and online.location == PREQUANTIZED and online.prequantized
    assert any("is cached, but the registry's pre-quantized" in t for t in online.tried)
    assert fastload.resolve(ORIGINAL, prefer_prequantized=False).location == ORIGINAL  # asked for: kept


def test_embedded_smollm2_resolves_offline_through_its_package():
    plan = fastload.resolve("smollm2")
    assert plan.source == "packaged-gguf" and plan.original == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_an_adapter_trained_on_a_hub_named_model_reloads_through_the_same_resolution(tiny_llama, tmp_path):
    """The adapter names its base by hub id (not a temporary path), and loading the adapter folder resolves that
    id again (HF cache, offline) and gives the trained model's logits."""
    import json

    from tiny import nonzero_lora_b

    put_in_hf_cache(hf_home(), ORIGINAL, tiny_llama)
    model, tok = FastModel.from_pretrained(ORIGINAL, store=False, dtype=torch.float32)
    nonzero_lora_b(model, seed=5)
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    adapter = FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == ORIGINAL
    again, _ = FastModel.from_pretrained(adapter, store=False, dtype=torch.float32)
    assert again.fastload.plan.adapter == str(adapter) and again.fastload.plan.location == ORIGINAL
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, before, atol=1e-5)



def test_a_model_quantized_after_its_download_is_found_in_the_store_next_time(tiny_llama, isolated_env, monkeypatch):
    """A download's commit is known only once it is in the HF cache: the entry must be stored under the key the
    next load looks up (the snapshot's commit), or every later load quantizes again."""
    from fastload.backends.native import NativeBackend
    from fastload.load.loader import LoadOptions

    repo = "someone/tiny-llama-16bit"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    plan = fastload.resolve(repo)
    assert plan.source == "hub-download" and not plan.prequantized and plan.store_key
    put_in_hf_cache(hf_home(), repo, tiny_llama)  # what the download leaves behind
    model, tokenizer = FastModel.from_pretrained(tiny_llama, lora=None, store=False)  # (the tests forbid the network)
    NativeBackend()._store(plan, LoadOptions(), model, tokenizer, Store(isolated_env))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = fastload.resolve(repo)
    assert again.source == "store" and again.prequantized


def test_a_downloaded_checkpoint_is_found_on_disk_after_its_download(tiny_nf4, monkeypatch):
    """`fastload quantize NAME --out DIR` copies a pre-quantized download from where the download put it."""
    from fastload.load.loader import LoadOptions, local_files_of

    monkeypatch.delenv("HF_HUB_OFFLINE")
    plan = fastload.resolve(ORIGINAL)
    assert plan.source == "hub-download" and plan.location == PREQUANTIZED
    assert local_files_of(plan, LoadOptions()) is None  # not downloaded yet
    snapshot = put_in_hf_cache(hf_home(), PREQUANTIZED, tiny_nf4)
    assert local_files_of(plan, LoadOptions()) == snapshot


def test_layer_count_check_takes_the_smaller_of_two_layer_counts(tmp_path):
    """LongCat-Flash's config.json (as transformers 5.17 saves it) says num_hidden_layers=2 * num_layers: its weights
    hold num_layers stored layers, two sublayers each. That checkpoint is whole; one missing a stored layer is not."""
    from fastload.errors import CheckpointIncomplete
    from fastload.sources.checkpoint_files import check_layer_count

    names = [f"model.layers.{i}.mlp.weight" for i in range(2)] + ["model.embed_tokens.weight"]
    check_layer_count(tmp_path, {"model_type": "longcat_flash", "num_hidden_layers": 4, "num_layers": 2}, names)
    with pytest.raises(CheckpointIncomplete) as err:
        check_layer_count(tmp_path, {"model_type": "longcat_flash", "num_hidden_layers": 6, "num_layers": 3}, names)
    assert "num_layers=3" in err.value.found and "hold 2 layers" in err.value.found


def test_layer_count_check_counts_the_layers_transformers_builds_before_refusing(tmp_path):
    """Dory's config.json counts attention and MLP sublayers in num_hidden_layers (4); the model transformers builds
    from it holds half as many layers (2), which is what its weights hold: whole, loaded. One stored layer missing
    is still refused."""
    pytest.importorskip("transformers.models.dory", reason="transformers before Dory")
    from transformers import AutoConfig

    from fastload.errors import CheckpointIncomplete
    from fastload.sources.checkpoint_files import check_layer_count

    config = AutoConfig.for_model("dory", num_hidden_layers=4,
                                  layer_types=["sliding_attention", "mlp", "sliding_attention", "mlp"]).to_dict()
    assert config["num_hidden_layers"] == 4
    stored = [f"backbone.layers.{i}.mixer.weight" for i in range(2)]
    check_layer_count(tmp_path, config, stored)
    with pytest.raises(CheckpointIncomplete, match="hold 1 layers"):
        check_layer_count(tmp_path, config, stored[:1])
