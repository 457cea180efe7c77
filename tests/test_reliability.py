"""Every user-caused failure is a fastload error that says what was asked, what was found and what to do, and leaves
the store and the user's files as they were; safe defaults (no pickle, no remote code, no token leaks, no network);
interrupted stores and saves leave nothing a later load would trust.

The table below is the contract: one row per bad input or fault, each run for real against a tiny checkpoint."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

import fastload
import fastload.settings
import fastload.sources.plan
from fastload import FastModel
from fastload.errors import (
    AdapterError,
    CheckpointCorrupt,
    CheckpointIncomplete,
    DeviceUnavailable,
    FastloadError,
    GatedModel,
    InvalidOption,
    ModelNotFound,
    NotEnoughMemory,
    StoreEntryCorrupt,
    StoreError,
    UnsafeCheckpoint,
    UnsupportedArchitecture,
)
from fastload.sources.store import MANIFEST, Store
from helpers_faults import (
    WEIGHTS,
    drop_tensor,
    edit_config,
    leftover_tmp,
    logits,
    read_safetensors,
    tree_snapshot,
    write_safetensors,
)

SECRET = "hf_secretTOKENdoNotLeak0123456789"


def load(name, **options):
    options.setdefault("lora", None)
    return FastModel.from_pretrained(name, **options)


# -- the table ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    error: type
    words: tuple[str, ...]          # key words the message must contain (case-insensitive)
    act: Callable                   # act(ctx) damages ctx.model as the case needs, returns the failing call
    chained: bool = False           # the error must chain the exception that revealed the problem


CASES: list[Case] = []


def case(error: type, *words: str, chained: bool = False):
    def register(act):
        CASES.append(Case(act.__name__.removeprefix("case_"), error, words, act, chained))
        return act
    return register


# names that do not lead to a model
@case(ModelNotFound, "closest registry names", "meta-llama/Meta-Llama-3-8B")
def case_misspelled_repo_id(ctx):
    return lambda: load("meta-llama/Meta-Lama-3-8B")


@case(ModelNotFound, "closest registry names", "llama-3")
def case_misspelled_alias(ctx):
    return lambda: load("llama-3-8bb")


@case(ModelNotFound, "no such file or directory")
def case_missing_path(ctx):
    return lambda: load(str(ctx.tmp / "does" / "not" / "exist") + "/")


@case(ModelNotFound, "empty name")
def case_empty_name(ctx):
    return lambda: load("  ")


@case(ModelNotFound, "not a checkpoint directory")
def case_path_to_a_weight_file(ctx):
    return lambda: load(ctx.model / WEIGHTS)


@case(ModelNotFound, "offline", "hub cache")
def case_hub_repo_not_cached_while_offline(ctx):
    return lambda: load("someone-unknown/some-model-7b")


@case(ModelNotFound, "gated", "token")
def case_gated_registry_model_while_offline(ctx):
    return lambda: load("meta-llama/Meta-Llama-3-8B")


@case(ModelNotFound, "no source could provide it")
def case_local_files_only_without_a_copy(ctx):
    return lambda: load("someone-unknown/some-model-7b", local_files_only=True)


def hub_answers(error_class, message: str):
    """Run the loader's error translation around the hub's real exception for a refusal (status 403 or 404)."""
    import httpx2  # the HTTP client huggingface_hub builds its errors from

    from fastload.load.loader import translated_errors

    status = 403 if "restricted" in message else 404
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/owner/name"))
    plan = fastload.sources.plan.LoadPlan(name="owner/name", source="hub-download", location="owner/name",
                                          prequantized=False, quant=fastload.settings.QuantSettings(), reason="a test")

    def call():
        with translated_errors(plan):
            raise error_class(message, response=response)
    return call


@case(GatedModel, "gated", "token=", chained=True)
def case_hub_answers_gated(ctx):
    from huggingface_hub.errors import GatedRepoError

    return hub_answers(GatedRepoError, "403 Client Error: access to model owner/name is restricted")


@case(ModelNotFound, "no such repository", "token=", chained=True)
def case_hub_answers_no_such_repo(ctx):
    from huggingface_hub.errors import RepositoryNotFoundError

    return hub_answers(RepositoryNotFoundError, "404 Client Error: Repository Not Found for url")


# directories that are not whole checkpoints
@case(CheckpointIncomplete, "no config.json")
def case_directory_without_config(ctx):
    (ctx.model / "config.json").unlink()
    return lambda: load(ctx.model)


@case(CheckpointIncomplete, "no weight files")
def case_directory_without_weights(ctx):
    (ctx.model / WEIGHTS).unlink()
    return lambda: load(ctx.model)


@case(CheckpointIncomplete, "no config.json")
def case_empty_directory(ctx):
    empty = ctx.tmp / "user" / "empty"
    empty.mkdir()
    return lambda: load(empty)


@case(CheckpointIncomplete, "tokenizer")
def case_no_tokenizer_files(ctx):
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ctx.model / f).unlink(missing_ok=True)
    return lambda: load(ctx.model)


@case(CheckpointIncomplete, "shard", "missing")
def case_index_names_a_missing_shard(ctx):
    header, _ = read_safetensors(ctx.model / WEIGHTS)
    weight_map = {k: "model-00002-of-00002.safetensors" for k in header if k != "__metadata__"}
    index = {"metadata": {}, "weight_map": weight_map}
    (ctx.model / "model.safetensors.index.json").write_text(json.dumps(index))
    return lambda: load(ctx.model)


@case(CheckpointCorrupt, "shard index")
def case_index_is_not_json(ctx):
    (ctx.model / "model.safetensors.index.json").write_text("{\"weight_map\": ")
    return lambda: load(ctx.model)


# config.json damaged or not matching the weights
@case(CheckpointCorrupt, "not valid json", chained=True)
def case_config_not_json(ctx):
    (ctx.model / "config.json").write_text('{"model_type": "llama", ')
    return lambda: load(ctx.model)


@case(CheckpointCorrupt, "not a transformers config")
def case_config_is_a_list(ctx):
    (ctx.model / "config.json").write_text("[1, 2, 3]")
    return lambda: load(ctx.model)


@case(CheckpointCorrupt, "hidden_size=-256")
def case_config_negative_size(ctx):
    edit_config(ctx.model, hidden_size=-256)
    return lambda: load(ctx.model)


@case(CheckpointCorrupt, "vocab_size='384'")
def case_config_size_as_string(ctx):
    edit_config(ctx.model, vocab_size="384")
    return lambda: load(ctx.model)


@case(CheckpointIncomplete, "model_type")
def case_config_without_model_type(ctx):
    edit_config(ctx.model, drop=("model_type",))
    return lambda: load(ctx.model)


@case(UnsupportedArchitecture, "upgrade transformers", chained=True)
def case_config_unknown_model_type(ctx):
    edit_config(ctx.model, model_type="fastload_no_such_architecture")
    return lambda: load(ctx.model)


@case(CheckpointIncomplete, "num_hidden_layers=3", "2 layers")
def case_config_more_layers_than_weights(ctx):
    edit_config(ctx.model, num_hidden_layers=3)
    return lambda: load(ctx.model)


@case(CheckpointIncomplete, "layers the config does not have")
def case_config_fewer_layers_than_weights(ctx):
    edit_config(ctx.model, num_hidden_layers=1)
    return lambda: load(ctx.model)


@case(CheckpointIncomplete, "do not match", "shape")
def case_config_other_hidden_size(ctx):
    edit_config(ctx.model, hidden_size=128, head_dim=32)
    return lambda: load(ctx.model)


@case(CheckpointIncomplete, "do not match", "shape")
def case_config_other_intermediate_size(ctx):
    edit_config(ctx.model, intermediate_size=1024)
    return lambda: load(ctx.model)


@case(CheckpointIncomplete, "do not match", "shape")
def case_config_other_vocab_size(ctx):
    edit_config(ctx.model, vocab_size=1000)
    return lambda: load(ctx.model)


@case(CheckpointIncomplete, "missing", "q_proj")
def case_weights_lack_a_tensor(ctx):
    drop_tensor(ctx.model / WEIGHTS, "model.layers.1.self_attn.q_proj.weight")
    return lambda: load(ctx.model)


@case(NotEnoughMemory, "GiB", "hidden_size")
def case_config_absurdly_large(ctx):
    edit_config(ctx.model, hidden_size=2 ** 30, intermediate_size=2 ** 31)
    return lambda: load(ctx.model)


# weight files damaged
@case(CheckpointCorrupt, "truncated", chained=True)
def case_safetensors_truncated(ctx):
    raw = (ctx.model / WEIGHTS).read_bytes()
    (ctx.model / WEIGHTS).write_bytes(raw[:len(raw) - 1000])
    return lambda: load(ctx.model)


@case(CheckpointCorrupt, "too short", chained=True)
def case_safetensors_four_bytes(ctx):
    (ctx.model / WEIGHTS).write_bytes(b"\x01\x02\x03\x04")
    return lambda: load(ctx.model)


@case(CheckpointCorrupt, "header length", chained=True)
def case_safetensors_header_length_too_large(ctx):
    raw = bytearray((ctx.model / WEIGHTS).read_bytes())
    raw[:8] = (len(raw) * 4).to_bytes(8, "little")
    (ctx.model / WEIGHTS).write_bytes(bytes(raw))
    return lambda: load(ctx.model)


@case(CheckpointCorrupt, "not a valid safetensors file", chained=True)
def case_safetensors_header_not_json(ctx):
    raw = bytearray((ctx.model / WEIGHTS).read_bytes())
    raw[8:16] = b"\xff\xfe{{{{{{"
    (ctx.model / WEIGHTS).write_bytes(bytes(raw))
    return lambda: load(ctx.model)


@case(CheckpointCorrupt, "trailing bytes", chained=True)
def case_safetensors_trailing_bytes(ctx):
    with open(ctx.model / WEIGHTS, "ab") as f:
        f.write(b"\0" * 64)
    return lambda: load(ctx.model)


@case(CheckpointCorrupt, "spans", chained=True)
def case_safetensors_dtype_lies(ctx):
    header, data = read_safetensors(ctx.model / WEIGHTS)
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F32"  # the bytes are bf16: the size no longer matches
    write_safetensors(ctx.model / WEIGHTS, header, data)
    return lambda: load(ctx.model)


@case(CheckpointCorrupt, "overlapping or gap", chained=True)
def case_safetensors_overlapping_offsets(ctx):
    header, data = read_safetensors(ctx.model / WEIGHTS)
    tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    a, b = tensors[0], tensors[1]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    header[a]["shape"], header[b]["shape"] = header[b]["shape"], header[a]["shape"]
    header[b]["data_offsets"] = [header[b]["data_offsets"][0] + 2, header[b]["data_offsets"][1] + 2]
    write_safetensors(ctx.model / WEIGHTS, header, data)
    return lambda: load(ctx.model)


@case(CheckpointCorrupt, "tokenizer", chained=True)
def case_tokenizer_json_damaged(ctx):
    (ctx.model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    return lambda: load(ctx.model)


# unsafe content
@case(UnsafeCheckpoint, "allow_pickle=True", "pickle")
def case_pickle_weights_only(ctx):
    (ctx.model / WEIGHTS).rename(ctx.model / "pytorch_model.bin")
    return lambda: load(ctx.model)


@case(UnsafeCheckpoint, "trust_remote_code=True", chained=True)
def case_config_needs_remote_code(ctx):
    write_remote_code(ctx.model, ctx.tmp / "marker")
    return lambda: load(ctx.model)


# options that cannot work
@case(InvalidOption, "load_in_4bit", "load_in_8bit")
def case_4bit_and_8bit(ctx):
    return lambda: load(ctx.model, load_in_4bit=True, load_in_8bit=True)


@case(InvalidOption, "rank", "positive integer")
def case_lora_rank_zero(ctx):
    return lambda: load(ctx.model, lora={"r": 0})


@case(InvalidOption, "rank", "positive integer")
def case_lora_rank_negative(ctx):
    return lambda: FastModel.get_peft_model(object(), r=-8)


@case(InvalidOption, "lora_alpha")
def case_lora_alpha_zero(ctx):
    return lambda: load(ctx.model, lora={"r": 8, "lora_alpha": 0})


@case(InvalidOption, "lora_dropout", "[0, 1)")
def case_lora_dropout_above_one(ctx):
    return lambda: load(ctx.model, lora={"lora_dropout": 1.5})


@case(InvalidOption, "lora=", "dict")
def case_lora_not_a_config(ctx):
    return lambda: load(ctx.model, lora="all-linear")


@case(AdapterError, "no module named", "qkv")
def case_lora_targets_absent(ctx):
    # store=False: the quantization itself succeeds and would (rightly) be stored before LoRA is added
    return lambda: load(ctx.model, lora={"target_modules": ["qkv"]}, store=False)


@case(InvalidOption, "bias='some'", "none")
def case_lora_bias_unknown(ctx):
    return lambda: load(ctx.model, lora={"bias": "some"})


@case(UnsupportedArchitecture, "decoder layers", "target_modules")
def case_lora_on_a_model_without_decoder_layers(ctx):
    import torch

    return lambda: FastModel.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)))


@case(InvalidOption, "nf5", "nf4")
def case_unknown_quant_type(ctx):
    return lambda: load(ctx.model, bnb_4bit_quant_type="nf5")


@case(InvalidOption, "unknown quantization option", "bnb_4bit_quant_type")
def case_unknown_quant_option(ctx):
    return lambda: load(ctx.model, bnb_4bit_quant_typ="nf4")


@case(InvalidOption, "load_in_4bit", "true or false")
def case_quant_flag_not_bool(ctx):
    return lambda: load(ctx.model, load_in_4bit="yes")


@case(InvalidOption, "llm_int8_threshold")
def case_int8_threshold_negative(ctx):
    return lambda: load(ctx.model, load_in_4bit=False, load_in_8bit=True, llm_int8_threshold=-1)


@case(InvalidOption, "quant_storage")
def case_unknown_quant_storage(ctx):
    return lambda: load(ctx.model, bnb_4bit_quant_storage="int7")


@case(InvalidOption, "bitsandbytes only")
def case_quantization_config_of_another_method(ctx):
    return lambda: load(ctx.model, quantization_config={"quant_method": "gptq", "bits": 4})


@case(InvalidOption, "bnb_4bit_compute_dtype", "bfloat16")
def case_unknown_compute_dtype(ctx):
    return lambda: load(ctx.model, bnb_4bit_compute_dtype="int3")


@case(InvalidOption, "dtype", "float16")
def case_unknown_dtype(ctx):
    return lambda: load(ctx.model, dtype="float8")


@case(InvalidOption, "bfloat16", "capability")
def case_compute_dtype_the_gpu_lacks(ctx):
    import torch

    from fastload.load.devices import check_dtype_supported

    # a pre-Ampere GPU as torch reports it: no bf16 arithmetic
    ctx.monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    ctx.monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    return lambda: check_dtype_supported(torch.bfloat16, "cuda")


@case(InvalidOption, "max_seq_length='2048'", "positive integer")
def case_max_seq_length_as_text(ctx):
    return lambda: load(ctx.model, max_seq_length="2048")


@case(InvalidOption, "max_seq_length=0", "positive integer")
def case_max_seq_length_zero(ctx):
    return lambda: load(ctx.model, max_seq_length=0)


@case(InvalidOption, "max_seq_length='2k'")
def case_max_seq_length_not_a_number(ctx):
    return lambda: load(ctx.model, max_seq_length="2k")


@case(InvalidOption, "backend='fastest'", "native")
def case_unknown_backend(ctx):
    return lambda: load(ctx.model, backend="fastest")


@case(InvalidOption, "device_map='tpu'")
def case_unknown_device(ctx):
    return lambda: load(ctx.model, device_map="tpu")


@case(InvalidOption, "attn_implementation", chained=True)
def case_unknown_attention(ctx):
    return lambda: load(ctx.model, attn_implementation="flash_attention_9")


# hardware and memory
@case(DeviceUnavailable, "cuda", "no CUDA GPU")
def case_gpu_requested_without_gpu(ctx):
    return lambda: load(ctx.model, device_map="cuda")


@case(DeviceUnavailable, "no CUDA GPU")
def case_gpu_index_without_gpu(ctx):
    return lambda: load(ctx.model, device_map={"": 0})


@case(NotEnoughMemory, "GiB free", "4-bit")
def case_memory_limit_too_small(ctx):
    ctx.monkeypatch.setenv("FASTLOAD_MEMORY_LIMIT_BYTES", "100000")
    return lambda: load(ctx.model)


@case(InvalidOption, "FASTLOAD_MEMORY_LIMIT_BYTES", "whole number")
def case_memory_limit_not_a_number(ctx):
    ctx.monkeypatch.setenv("FASTLOAD_MEMORY_LIMIT_BYTES", "8 GB")
    return lambda: load(ctx.model)


# adapters and the store
@case(CheckpointCorrupt, "adapter_config.json", chained=True)
def case_adapter_config_damaged(ctx):
    adapter = ctx.tmp / "user" / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json")
    return lambda: load(adapter)


@case(ModelNotFound, "names no base model")
def case_adapter_without_base(ctx):
    adapter = ctx.tmp / "user" / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return lambda: load(adapter)


@case(ModelNotFound, "no such file")
def case_adapter_base_path_gone(ctx):
    adapter = ctx.tmp / "user" / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(ctx.tmp / "gone") + "/"}))
    return lambda: load(adapter)


@case(StoreError, "FASTLOAD_HOME", "store=False", chained=True)
def case_store_root_is_a_file(ctx):
    blocker = ctx.tmp / "user" / "not-a-folder"
    blocker.write_text("a user's file where the store should be")
    return lambda: load(ctx.model, store=blocker)


@case(StoreError, "disk is full", "store=False", chained=True)
def case_disk_full_while_storing(ctx):
    disk_fills_up(ctx.monkeypatch)
    return lambda: load(ctx.model)


# saving over what is not a previous save
@case(InvalidOption, "not a previous save", "new or empty folder")
def case_save_merged_over_a_folder_of_user_files(ctx):
    model, tok = FastModel.from_pretrained(ctx.model, store=False)
    notes = ctx.tmp / "user" / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("months of work")
    return lambda: FastModel.save_merged(model, notes, tokenizer=tok)


@case(InvalidOption, "a file with that name")
def case_save_adapter_onto_a_file(ctx):
    model, tok = FastModel.from_pretrained(ctx.model, store=False)
    target = ctx.tmp / "user" / "adapter.txt"
    target.write_text("a user's file")
    return lambda: FastModel.save_adapter(model, target, tokenizer=tok)


def write_remote_code(model: Path, marker: Path) -> None:
    """A config that only custom code can build, shipping code that would leave a marker file if it ever ran."""
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('remote code ran')\n"
    (model / "configuration_evil.py").write_text(code)
    (model / "modeling_evil.py").write_text(code)
    edit_config(model, model_type="evil_remote", architectures=["EvilForCausalLM"],
                auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


def disk_fills_up(monkeypatch) -> None:
    """The weight writer gets half the file onto disk, then the disk is full."""
    import transformers.modeling_utils as mu

    real = mu.safe_save_file

    def half_then_enospc(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        size = os.path.getsize(filename)
        os.truncate(filename, size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(mu, "safe_save_file", half_then_enospc)


def user_area(ctx) -> dict:
    return {**tree_snapshot(ctx.tmp / "user"),
            **{f"store/{k}": v for k, v in tree_snapshot(ctx.home, ("locks",)).items()},
            **{f"hf/{k}": v for k, v in tree_snapshot(ctx.tmp / "hf-home").items()}}


@pytest.fixture
def ctx(tiny_llama, tmp_path, isolated_env, monkeypatch):
    import shutil

    (tmp_path / "user").mkdir()
    model = tmp_path / "user" / "model"
    shutil.copytree(tiny_llama, model)
    return SimpleNamespace(model=model, tmp=tmp_path, home=isolated_env, monkeypatch=monkeypatch)


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_clear_fastload_error_and_touches_nothing(c: Case, ctx):
    call = c.act(ctx)
    before = user_area(ctx)
    with pytest.raises(FastloadError) as caught:
        call()
    err = caught.value
    assert isinstance(err, c.error), f"{type(err).__name__} instead of {c.error.__name__}: {err}"
    text = str(err).lower()
    for word in c.words:
        assert word.lower() in text, f"{word!r} not in: {err}"
    assert err.asked and err.found and err.fix, f"asked/found/what-to-do incomplete: {err}"
    if c.chained:
        assert err.__cause__ is not None, f"the cause is not chained: {err}"
    assert user_area(ctx) == before, "the store, the HF cache or the user's files changed"
    assert leftover_tmp(ctx.home) == []
    assert not (ctx.tmp / "marker").exists()


# -- safe by default ----------------------------------------------------------------------------------------------

def test_pickle_loads_only_when_allowed(tiny_copy):
    """allow_pickle=True is the only way to a .bin checkpoint; the refusal names the option."""
    import torch
    from safetensors.torch import load_file

    state = load_file(tiny_copy / WEIGHTS)
    torch.save(state, tiny_copy / "pytorch_model.bin")
    (tiny_copy / WEIGHTS).unlink()
    with pytest.raises(UnsafeCheckpoint, match="allow_pickle=True"):
        load(tiny_copy, load_in_4bit=False)
    model, _ = load(tiny_copy, load_in_4bit=False, allow_pickle=True)
    assert torch.equal(model.model.embed_tokens.weight.data, state["model.embed_tokens.weight"].to(model.dtype))


def test_remote_code_never_runs_implicitly(tiny_copy, tmp_path):
    """auto_map with an architecture only its code can build: refused, and not one line of that code ran."""
    marker = tmp_path / "marker"
    write_remote_code(tiny_copy, marker)
    with pytest.raises(UnsafeCheckpoint, match="trust_remote_code=True"):
        load(tiny_copy)
    with pytest.raises(UnsafeCheckpoint):
        fastload.FastModel.from_pretrained(tiny_copy, lora=None, load_in_4bit=False)
    assert not marker.exists()
    # a known architecture that also ships code loads with transformers' own class, still without running it
    write_remote_code(tiny_copy, marker)
    edit_config(tiny_copy, model_type="llama", architectures=["LlamaForCausalLM"])
    model, _ = load(tiny_copy, load_in_4bit=False)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_token_never_reaches_logs_errors_or_manifests(tiny_llama, tiny_copy, isolated_env, tmp_path, caplog, capfd):
    """Loads from a local folder and from the HF cache (where the token is handed to transformers), good and broken."""
    from hfcache import put_in_hf_cache

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="fastload")
    put_in_hf_cache(tmp_path / "hf-home", "someone/private-tiny", tiny_llama)
    broken = put_in_hf_cache(tmp_path / "hf-home", "someone/private-broken", tiny_llama)
    edit_config(broken, intermediate_size=1024)
    models = [load(tiny_llama, token=SECRET)[0], load("someone/private-tiny", token=SECRET)[0]]
    (tiny_copy / "config.json").unlink()
    errors = []
    for name in (tiny_copy, "someone/private-broken", "someone-unknown/private-model"):
        with pytest.raises(FastloadError) as caught:
            load(name, token=SECRET)
        errors.append(caught.value)
    captured = capfd.readouterr()
    texts = [caplog.text, captured.out, captured.err, *map(str, errors), *map(repr, errors),
             *(str(e.__cause__) for e in errors), *(m.fastload.plan.explain() for m in models),
             *(repr(m.fastload.plan) for m in models), *(repr(m.config) for m in models)]
    texts += [p.read_text(errors="replace") for p in isolated_env.rglob("*") if p.is_file() and p.suffix == ".json"]
    assert len(Store(isolated_env).entries()) == 2, "both loads should have stored their quantization"
    assert "fastload" in caplog.text  # the logs were captured at all
    for text in texts:
        assert SECRET not in text and SECRET[:12] not in text


class ConnectionLog:
    """Records every attempt to reach another machine (the conftest guard raises; someone could swallow that)."""

    def __init__(self, monkeypatch):
        self.attempts: list = []
        connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

        def logged_connect(sock, address):
            self.attempts.append(address)
            return connect(sock, address)

        def logged_getaddrinfo(host, *a, **kw):
            self.attempts.append(host)
            return getaddrinfo(host, *a, **kw)

        monkeypatch.setattr(socket.socket, "connect", logged_connect)
        monkeypatch.setattr(socket, "getaddrinfo", logged_getaddrinfo)


def test_hub_download_plan_while_offline_fails_without_a_connection_attempt(monkeypatch):
    from fastload.load.loader import LoadOptions, load_tokenizer, load_weights

    monkeypatch.delenv("HF_HUB_OFFLINE")
    plan = fastload.resolve("someone-unknown/some-model-7b")  # online: the plan is a download
    assert plan.will_download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # ...then the machine goes offline
    log = ConnectionLog(monkeypatch)
    for step in (load_weights, load_tokenizer):
        with pytest.raises(ModelNotFound, match="offline") as caught:
            step(plan, LoadOptions())
        assert "HF_HUB_OFFLINE" in caught.value.fix
    with pytest.raises(ModelNotFound):
        load("someone-unknown/some-model-7b")
    with pytest.raises(ModelNotFound):
        load("someone-unknown/some-model-7b", local_files_only=True)
    assert log.attempts == []


def test_loads_from_the_hf_cache_make_no_connection_attempt(tiny_llama, tmp_path, monkeypatch):
    """Offline means offline even where huggingface_hub would reach out on its own (headers, agent lists)."""
    from hfcache import put_in_hf_cache

    put_in_hf_cache(tmp_path / "hf-home", "someone/cached-tiny", tiny_llama)
    from huggingface_hub.utils import _detect_agent

    # forget what an earlier test's attempt left cached in-process, so this load is the one that would reach out
    monkeypatch.setattr(_detect_agent, "_registry", None, raising=False)
    log = ConnectionLog(monkeypatch)
    model, _ = load("someone/cached-tiny")
    assert model.fastload.plan.source == "hub-cache"
    assert log.attempts == []


# -- faults while storing: nothing half-written is ever trusted --------------------------------------------------

def test_disk_full_while_storing_then_space_freed(tiny_llama, isolated_env, monkeypatch):
    with monkeypatch.context() as m:
        disk_fills_up(m)
        with pytest.raises(StoreError, match="disk is full") as caught:
            load(tiny_llama)
        assert caught.value.__cause__.errno == errno.ENOSPC
    store = Store(isolated_env)
    assert store.entries() == [] and leftover_tmp(isolated_env) == []
    model, _ = load(tiny_llama)  # space freed: the next load quantizes and stores normally
    assert model.fastload.quantized_now and [p for _, p in store.verify()] == [None]


@pytest.mark.parametrize("interrupt,when", [(KeyboardInterrupt, "storing"), (RuntimeError, "storing"),
                                            (KeyboardInterrupt, "quantizing")])
def test_interrupted_quantize_or_store_leaves_no_entry(tiny_llama, isolated_env, monkeypatch, interrupt, when):
    import bitsandbytes.functional as bf
    import transformers.modeling_utils as mu

    from fastload.load import on_the_fly

    real_save, calls = mu.safe_save_file, []

    def interrupted_save(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        raise interrupt("stopped mid-store")

    def interrupting(real_quantize):  # counted over both quantizers: fastload's direct load and bitsandbytes'
        def interrupted_quantize(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5:  # a few layers in
                raise interrupt("stopped mid-quantization")
            return real_quantize(*args, **kwargs)
        return interrupted_quantize

    with monkeypatch.context() as m:
        if when == "storing":
            m.setattr(mu, "safe_save_file", interrupted_save)
        else:
            m.setattr(bf, "quantize_4bit", interrupting(bf.quantize_4bit))
            m.setattr(on_the_fly, "quantize_4bit", interrupting(on_the_fly.quantize_4bit))
        if interrupt is RuntimeError:  # an error inside the save, not an interruption: the load stands, unstored
            model, _ = load(tiny_llama)
            assert model.fastload.quantized_now
        else:
            with pytest.raises(interrupt):
                load(tiny_llama)
    assert Store(isolated_env).entries() == [] and leftover_tmp(isolated_env) == []
    assert fastload.resolve(tiny_llama).source == "local"  # nothing stored is offered to the next load
    model, _ = load(tiny_llama)
    assert model.fastload.quantized_now
    [entry] = Store(isolated_env).entries()
    again, _ = load(tiny_llama)
    assert again.fastload.plan.source == "store" and again.fastload.plan.location == str(entry.path)


def corrupt_in_place(file: Path, keep_mtime: bool = False) -> None:
    st = file.stat()
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x55
    file.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "manifest gone", "extra file", "file removed"])
def test_store_entry_changed_on_disk_is_never_loaded(tiny_llama, isolated_env, damage, caplog):
    import torch

    first, _ = load(tiny_llama, gradient_checkpointing=False)
    ids = torch.tensor([[1, 5, 9, 13]])
    expected = logits(first, ids)
    store = Store(isolated_env)
    [entry] = store.entries()
    weights = entry.path / WEIGHTS
    if damage == "flipped byte":
        corrupt_in_place(weights)
    elif damage == "truncated":
        os.truncate(weights, weights.stat().st_size - 100)
    elif damage == "manifest gone":
        (entry.path / MANIFEST).unlink()
    elif damage == "extra file":
        (entry.path / "pytorch_model.bin").write_bytes(b"not ours")
    else:
        (entry.path / "tokenizer.json").unlink()
    if damage != "manifest gone":
        with pytest.raises(StoreEntryCorrupt):
            store.check(entry.path, entry.key, full=True)
    with caplog.at_level("WARNING", logger="fastload"):
        model, _ = load(tiny_llama, gradient_checkpointing=False)
    assert "damaged" in caplog.text
    assert model.fastload.quantized_now  # rebuilt from the 16-bit source, not loaded from the damaged entry
    assert torch.equal(logits(model, ids), expected)
    assert [p for _, p in store.verify()] == [None] and len(store.entries()) == 1


def test_full_verify_finds_a_change_that_kept_size_and_mtime(tiny_llama, isolated_env):
    """Bit rot keeps size and mtime: the fast check trusts them, `verify` (fastload cache verify) hashes and finds
    it."""
    load(tiny_llama)
    store = Store(isolated_env)
    [entry] = store.entries()
    corrupt_in_place(entry.path / WEIGHTS, keep_mtime=True)
    [(_, problem)] = store.verify()
    assert problem and "changed" in problem


def test_interrupted_adapter_save_keeps_the_previous_one(tiny_llama, tmp_path, monkeypatch):
    import peft.utils.save_and_load as sl
    import transformers.modeling_utils as mu  # noqa: F401 (peft saves through safetensors directly)

    model, tok = FastModel.from_pretrained(tiny_llama, store=False)
    out = tmp_path / "adapter"
    FastModel.save_adapter(model, out, tokenizer=tok)
    before = tree_snapshot(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    import peft.peft_model as pm

    monkeypatch.setattr(pm, "safe_save_file", interrupted, raising=False)
    monkeypatch.setattr(sl, "safe_save_file", interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        FastModel.save_adapter(model, out, tokenizer=tok)
    assert tree_snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left beside it


def test_interrupted_merged_save_keeps_the_previous_one(tiny_llama, tmp_path, monkeypatch):
    import safetensors.torch

    model, tok = FastModel.from_pretrained(tiny_llama, store=False)
    out = tmp_path / "merged"
    FastModel.save_merged(model, out, tokenizer=tok)
    before = tree_snapshot(out)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(FastloadError, match="disk") as caught:
        FastModel.save_merged(model, out, tokenizer=tok)
    assert caught.value.__cause__.errno == errno.ENOSPC
    assert tree_snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    reloaded, _ = FastModel.from_pretrained(out, lora=None, load_in_4bit=False)  # the previous save still loads
    assert reloaded.config.num_hidden_layers == 2
