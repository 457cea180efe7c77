"""The direct 4-bit load (fastload.load.fast_4bit) and the background store write (fastload.load.background_store).

The reference is transformers' from_pretrained, the path every load took before (FASTLOAD_DIRECT_LOAD=0): the direct
load must give the same model bit for bit — the same module types, packed 4-bit weights, quantization states, other
weights, config and logits — on the fly and from the store.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastload import FastModel
from fastload.model_state import state_of
from fastload.sources.store import Store
from helpers_faults import drop_tensor
from tiny import make_checkpoint

OFF = {"FASTLOAD_DIRECT_LOAD": "0"}


def family_checkpoint_at(directory: Path, family: str) -> Path:
    """The matrix's tiny checkpoint of `family` (tests/train/family_shapes.py), as transformers saves it."""
    shapes = str(Path(__file__).parents[1] / "train")
    if shapes not in sys.path:
        sys.path.insert(0, shapes)
    from family_shapes import make_family_checkpoint

    return make_family_checkpoint(directory, family)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family_checkpoint(request, tmp_path_factory) -> Path:
    """A tiny bf16 checkpoint per family: Llama (tied nothing, no biases) and Qwen2 (q/k/v biases)."""
    return make_checkpoint(tmp_path_factory.mktemp(request.param) / "model", request.param)


def load(path, monkeypatch, direct: bool, **options):
    monkeypatch.setenv("FASTLOAD_DIRECT_LOAD", "1" if direct else "0")
    options = {"lora": None, "engine": False, "gradient_checkpointing": False, **options}
    model, _ = FastModel.from_pretrained(path, **options)
    return model


def assert_same_model(reference, model, device="cpu") -> None:
    """Everything a user of the loaded model could observe, compared exactly."""
    import bitsandbytes as bnb
    import torch

    assert state_of(model).direct_load and not state_of(reference, create=False).direct_load
    assert {n: type(m) for n, m in reference.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    expected, got = reference.state_dict(), model.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        other = got[name]
        assert (tensor.dtype, tensor.shape, tensor.device) == (other.dtype, other.shape, other.device), name
        assert torch.equal(tensor, other), name
    for name, module in reference.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            mine = model.get_submodule(name)
            assert (module.compute_dtype, module.quant_storage) == (mine.compute_dtype, mine.quant_storage), name
            assert module.weight.quant_state == mine.weight.quant_state, name
            assert mine.quant_state is mine.weight.quant_state
    for attr in ("is_quantized", "is_loaded_in_4bit", "quantization_method", "training", "max_seq_length"):
        assert getattr(reference, attr, None) == getattr(model, attr, None), attr
    assert type(reference.hf_quantizer) is type(model.hf_quantizer)
    assert reference.config.to_dict() == model.config.to_dict()
    assert reference.generation_config.to_dict() == model.generation_config.to_dict()
    vocab = reference.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_direct_load_on_the_fly_is_the_model_from_pretrained_makes(family_checkpoint, monkeypatch, dtype):
    import torch

    reference = load(family_checkpoint, monkeypatch, direct=False, store=False, dtype=getattr(torch, dtype))
    model = load(family_checkpoint, monkeypatch, direct=True, store=False, dtype=getattr(torch, dtype))
    assert_same_model(reference, model)


def assert_store_loads_agree(checkpoint, monkeypatch, **options) -> None:
    """A first load writes the store entry; the entry loaded through transformers and directly: the same model."""
    first = load(checkpoint, monkeypatch, direct=False, **options)
    assert first.fastload.plan.source == "local"
    reference = load(checkpoint, monkeypatch, direct=False, **options)
    model = load(checkpoint, monkeypatch, direct=True, **options)
    assert model.fastload.plan.source == "store" == reference.fastload.plan.source
    assert_same_model(reference, model)


def test_direct_load_from_the_store_is_the_model_from_pretrained_makes(family_checkpoint, monkeypatch, isolated_env):
    assert_store_loads_agree(family_checkpoint, monkeypatch)


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def per_expert_checkpoint(request, tmp_path_factory) -> Path:
    """A tiny MoE checkpoint as the hub keeps them (and transformers 5 saves them): one tensor per expert and
    projection (Mixtral's under block_sparse_moe, w1/w3/w2), which transformers stacks into fused experts."""
    from safetensors import safe_open

    path = family_checkpoint_at(tmp_path_factory.mktemp(request.param) / "model", request.param)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert any(".experts.0." in name for name in f.keys())  # per expert, not fused
    return path


@pytest.mark.parametrize("quantize_experts", [True, False])
def test_direct_load_stacks_per_expert_checkpoints_as_from_pretrained_does(per_expert_checkpoint, monkeypatch,
                                                                           quantize_experts):
    import torch

    options = dict(store=False, dtype=torch.float32, quantize_experts=quantize_experts)
    reference = load(per_expert_checkpoint, monkeypatch, direct=False, **options)
    model = load(per_expert_checkpoint, monkeypatch, direct=True, **options)
    assert_same_model(reference, model)


def test_experts_of_another_width_than_the_config_says_take_the_old_path_and_its_error(per_expert_checkpoint,
                                                                                       monkeypatch, caplog, tmp_path):
    """Stacked per-expert tensors are checked against the fused parameter's shape before anything is read: a
    config.json that does not belong to the weights is reported, never loaded into a model of the wrong shape."""
    import shutil

    from fastload.errors import CheckpointError

    damaged = tmp_path / "model"
    shutil.copytree(per_expert_checkpoint, damaged)
    config = json.loads((damaged / "config.json").read_text())
    width = "moe_intermediate_size" if "moe_intermediate_size" in config else "intermediate_size"
    config[width] *= 2
    (damaged / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("FASTLOAD_DIRECT_LOAD", "1")
    with caplog.at_level(logging.INFO, logger="fastload"), pytest.raises(CheckpointError):
        FastModel.from_pretrained(damaged, lora=None, store=False)
    assert any("direct 4-bit load not used" in r.getMessage() and "does not fit" in r.getMessage()
               for r in caplog.records)


def test_direct_load_of_a_moe_store_entry_is_the_model_from_pretrained_makes(per_expert_checkpoint, monkeypatch,
                                                                             isolated_env):
    """The entry keeps the checkpoint's 16-bit experts under their per-expert names beside the packed 4-bit layers."""
    assert_store_loads_agree(per_expert_checkpoint, monkeypatch)


def test_a_per_expert_checkpoint_missing_one_expert_takes_the_old_path_and_its_error(per_expert_checkpoint,
                                                                                    monkeypatch, caplog, tmp_path):
    import shutil

    from fastload.errors import CheckpointError

    damaged = tmp_path / "model"
    shutil.copytree(per_expert_checkpoint, damaged)
    from safetensors import safe_open

    with safe_open(str(damaged / "model.safetensors"), "pt") as f:
        victim = next(n for n in f.keys() if ".experts.1." in n)
    drop_tensor(damaged / "model.safetensors", victim)
    monkeypatch.setenv("FASTLOAD_DIRECT_LOAD", "1")
    with caplog.at_level(logging.INFO, logger="fastload"), pytest.raises(CheckpointError):
        FastModel.from_pretrained(damaged, lora=None, store=False)
    assert any("direct 4-bit load not used" in r.getMessage() for r in caplog.records)


def test_direct_load_with_lora_and_checkpointing_trains_like_from_pretrained(tiny_llama, monkeypatch):
    """The whole facade (LoRA, checkpointing, engine) on top of either load: the same first loss and gradients."""
    import torch

    losses = []
    for direct in (False, True):
        model = load(tiny_llama, monkeypatch, direct, store=False, lora={}, gradient_checkpointing=True,
                     engine=True, dtype=torch.float32)
        model.train()
        ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        losses.append((loss.item(), grads))
    assert losses[0][0] == losses[1][0]
    assert losses[0][1].keys() == losses[1][1].keys() and losses[0][1]
    assert all(torch.equal(losses[0][1][n], losses[1][1][n]) for n in losses[0][1])


def test_a_checkpoint_the_direct_load_does_not_cover_takes_the_old_path_and_its_error(tiny_copy, monkeypatch, caplog):
    """A missing tensor: the direct load steps aside (one line says why) and the user gets fastload's usual error."""
    from fastload.errors import CheckpointIncomplete

    drop_tensor(tiny_copy / "model.safetensors", "model.layers.1.mlp.down_proj.weight")
    monkeypatch.setenv("FASTLOAD_DIRECT_LOAD", "1")
    with caplog.at_level(logging.INFO, logger="fastload"), pytest.raises(CheckpointIncomplete, match="missing"):
        FastModel.from_pretrained(tiny_copy, lora=None, store=False)
    assert any("direct 4-bit load not used" in r.getMessage() and "down_proj" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("store", [False, True])
def test_a_direct_load_builds_the_model_of_its_config_once(tiny_llama, monkeypatch, isolated_env, store):
    """Each build of the model a config describes costs Python time per module (an 8B's 32 layers: ~0.1 s on the
    CPU), and the memory check, the shape check and the skeleton each used to build their own: a direct load, on
    the fly or from the store, builds it once (counted through torch's own module-registration hook)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if store:
        load(tiny_llama, monkeypatch, direct=True)  # quantizes and stores it; the second load reads the entry
    built = []
    handle = torch.nn.modules.module.register_module_module_registration_hook(
        lambda parent, name, module: built.append(name) if isinstance(module, LlamaDecoderLayer) else None)
    try:
        model = load(tiny_llama, monkeypatch, direct=True, store=store)
    finally:
        handle.remove()
    assert state_of(model).direct_load and model.fastload.plan.source == ("store" if store else "local")
    assert len(built) == model.config.num_hidden_layers


def test_a_load_says_where_its_time_went(tiny_llama, monkeypatch):
    """model.fastload.load_phases: each phase of the direct load, LoRA and checkpointing, the tokenizer read on its
    own thread meanwhile; the caller's phases add up to no more than the load took."""
    import time as clock

    started = clock.perf_counter()
    model = load(tiny_llama, monkeypatch, direct=True, store=False, lora={}, gradient_checkpointing=True)
    wall = clock.perf_counter() - started
    phases = model.fastload.load_phases
    assert {"resolve", "config", "checkpoint_checks", "module_construction", "read_wait", "host_to_device",
            "quantization", "finish", "tokenizer_wait", "tokenizer_overlapped", "lora", "checkpointing"} <= set(phases)
    assert all(seconds >= 0 for seconds in phases.values())
    assert sum(v for k, v in phases.items() if k != "tokenizer_overlapped") <= wall


def test_the_hub_switch_is_restored_when_two_threads_overlap(monkeypatch):
    """The tokenizer thread and the weights both keep the hub off; interleaved, the last one out restores it."""
    import threading

    from huggingface_hub import constants

    from fastload.sources.hub import hub_calls_off

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    inside, release = threading.Event(), threading.Event()

    def other():
        with hub_calls_off():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with hub_calls_off():
        thread.start()
        inside.wait(10)
    assert constants.HF_HUB_OFFLINE is True  # the other thread is still inside
    release.set()
    thread.join()
    assert constants.HF_HUB_OFFLINE is False


MEASURE_ANON = """
import sys
sys.path.insert(0, {tests!r})
import torch
from fastload import FastModel
from fastload.bench.loadtime import AnonPeak
options = dict(store=False, lora=None, engine=False, gradient_checkpointing=False, dtype=torch.float32)
FastModel.from_pretrained({warmup!r}, **options)  # imports and first-use caches before the baseline
with AnonPeak(every=0.001) as anon:
    model, _ = FastModel.from_pretrained({checkpoint!r}, **options)
print(anon.peak - anon.baseline, model.fastload.direct_load)
"""


@pytest.mark.slow
def test_an_on_the_fly_load_keeps_no_full_copy_in_anonymous_memory(tiny_llama, tmp_path):
    """The checkpoint is read through its file mapping and quantized tensor by tensor: the process's own memory
    grows by the 4-bit model (~0.15 of fp32) and one tensor's quantization temporaries, never by a whole 16-bit copy
    (0.5 of fp32; measured 0.38 in all). File pages of the mapped checkpoint are the page cache's, not counted.
    Measured in a fresh process, as a user's load runs: this one's allocator keeps what earlier tests freed."""
    # many small tensors: one tensor's temporaries (bitsandbytes' CPU quantizer makes ~4 fp32 copies) stay small
    deep = make_checkpoint(tmp_path / "deep", "llama", dtype="float32", hidden_size=512, intermediate_size=2048,
                           num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8)
    size = sum(f.stat().st_size for f in deep.glob("*.safetensors"))
    script = tmp_path / "measure.py"
    script.write_text(MEASURE_ANON.format(tests=str(Path(__file__).resolve().parents[1]), warmup=str(tiny_llama),
                                          checkpoint=str(deep)))
    env = dict(os.environ, FASTLOAD_DIRECT_LOAD="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, direct = out.stdout.split()[-2:]
    assert direct == "True"
    assert int(grown) < size / 2, f"{int(grown) / size:.2f} x checkpoint"


# -- the store entry written in the background -------------------------------------------------------------------

def entry_dir(home: Path) -> Path:
    (entry,) = Store(home).entries()
    return entry.path


def test_background_store_entry_loads_as_the_waited_one(family_checkpoint, monkeypatch, tmp_path):
    """The writer thread's entry (one streamed safetensors file) and save_pretrained's give the same model."""
    from fastload.load.background_store import wait_for_store_writes

    models, files = [], []
    for mode in ("wait", "background"):
        monkeypatch.setenv("FASTLOAD_STORE_WRITE", mode)
        home = tmp_path / mode
        first = load(family_checkpoint, monkeypatch, direct=True, store=home)
        assert first.fastload.quantized_now
        wait_for_store_writes()
        assert [problem for _, problem in Store(home).verify()] == [None]
        files.append({f.name for f in entry_dir(home).iterdir()})
        assert json.loads((entry_dir(home) / "config.json").read_text()) == json.loads(
            (entry_dir(tmp_path / "wait") / "config.json").read_text())
        models.append(load(family_checkpoint, monkeypatch, direct=False, store=home))
        assert models[-1].fastload.plan.source == "store"
    assert files[0] == files[1]
    waited, background = models
    ids = __import__("torch").arange(24).reshape(2, 12)
    assert waited.state_dict().keys() == background.state_dict().keys()
    assert all(__import__("torch").equal(t, background.state_dict()[k]) for k, t in waited.state_dict().items())
    assert __import__("torch").equal(waited(input_ids=ids).logits, background(input_ids=ids).logits)


def test_a_moe_first_load_writes_its_entry_before_returning(per_expert_checkpoint, monkeypatch, tmp_path):
    """Its entry keeps the checkpoint's 16-bit experts, which are stored 4-bit right after: a background writer
    would hold them on the device until after the first training step, so this entry is written on the load's
    thread, whatever FASTLOAD_STORE_WRITE asks."""
    from fastload.load.nf4_experts import is_stack

    monkeypatch.setenv("FASTLOAD_STORE_WRITE", "background")
    home = tmp_path / "home"
    model = load(per_expert_checkpoint, monkeypatch, direct=True, store=home)
    assert model.fastload.quantized_now and state_of(model).direct_load
    assert [problem for _, problem in Store(home).verify()] == [None]  # there already, no optimizer step taken
    experts = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")) and p.ndim == 3]
    assert experts and all(is_stack(p) for p in experts)


def test_a_staged_store_write_waits_until_the_load_is_ready(tiny_llama, monkeypatch, tmp_path):
    """The writer starts once from_pretrained is done: its copies would otherwise run beside the adapters' creation
    (5.9x slower LoRA set-up on an H200); released, it writes the whole entry."""
    import time

    from fastload.load.background_store import release_store_writes, start_store_write, wait_for_store_writes

    model = load(tiny_llama, monkeypatch, direct=True, store=False)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_llama)
    store = Store(tmp_path / "home")
    plan = model.fastload.plan
    writer = start_store_write(store, "k", {"id": str(tiny_llama), "location": str(tiny_llama)}, plan.quant, model,
                               tokenizer)
    time.sleep(1.0)
    assert writer.is_alive() and store.entries() == []
    release_store_writes()
    wait_for_store_writes()
    assert [problem for _, problem in store.verify()] == [None]
    assert load(entry_dir(tmp_path / "home"), monkeypatch, direct=True, store=False).fastload.plan.prequantized


def wait_for_entries(home: Path, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while not Store(home).entries() and time.monotonic() < deadline:
        time.sleep(0.05)
    return Store(home).entries()


def test_the_store_write_starts_after_the_first_optimizer_step(tiny_llama, monkeypatch, tmp_path):
    """The writer's copies and disk writes would slow the first training step (2.11 s against 1.6 s on an H200):
    nothing is written until an optimizer step has finished, then the whole entry, which loads as the model was."""
    import torch

    from fastload.load.background_store import START_AFTER_S, wait_for_store_writes

    monkeypatch.setenv("FASTLOAD_STORE_WRITE", "background")
    home = tmp_path / "home"
    first = load(tiny_llama, monkeypatch, direct=True, store=home)
    try:
        assert first.fastload.quantized_now
        time.sleep(1.5)
        assert Store(home).entries() == [] and not any((home / "tmp").glob("*/model.safetensors"))
        weight = torch.nn.Parameter(torch.zeros(3))
        weight.grad = torch.ones(3)
        torch.optim.AdamW([weight]).step()
        assert len(wait_for_entries(home, timeout=START_AFTER_S / 2)) == 1
    finally:
        wait_for_store_writes()
    assert [problem for _, problem in Store(home).verify()] == [None]
    stored = load(tiny_llama, monkeypatch, direct=True, store=home)
    assert stored.fastload.plan.source == "store"
    expected, got = first.state_dict(), stored.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(t, got[name]) for name, t in expected.items())
    ids = torch.arange(24).reshape(2, 12)
    assert torch.equal(first(input_ids=ids).logits, stored(input_ids=ids).logits)


def _train_one_step(model, optimizer) -> None:
    import torch

    model.train()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_a_lora_step_leaves_the_entry_written_and_a_trained_base_weight_leaves_none(tiny_llama, monkeypatch,
                                                                                    tmp_path, caplog):
    """The entry holds the loaded weights, written after the first step: a default LoRA run (the base frozen) gets
    it; a run that trains a base weight in place (here the final norm) would have it store the trained value as the
    checkpoint's, so none is written and the log says why."""
    import torch

    from fastload.load.background_store import wait_for_store_writes

    monkeypatch.setenv("FASTLOAD_STORE_WRITE", "background")
    for trains_norm in (False, True):
        home = tmp_path / f"home-{trains_norm}"
        model = load(tiny_llama, monkeypatch, direct=True, store=home, lora={}, gradient_checkpointing=True,
                     engine=True, dtype=torch.float32)
        if trains_norm:
            model.base_model.model.model.norm.weight.requires_grad_(True)
        optimizer = FastModel.get_optimizer(model) if not trains_norm else torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.1)
        with caplog.at_level(logging.INFO, logger="fastload"):
            _train_one_step(model, optimizer)
            wait_for_store_writes()
        entries = [problem for _, problem in Store(home).verify()]
        if trains_norm:
            assert entries == [] and not any((home / "tmp").glob("*/model.safetensors"))
            assert any("model.norm.weight was changed after the load" in r.getMessage() for r in caplog.records)
        else:
            assert entries == [None]
            stored = load(tiny_llama, monkeypatch, direct=True, store=home, dtype=torch.float32)
            assert stored.fastload.plan.source == "store"


def test_trained_biases_upcast_by_lora_leave_the_entry_written(monkeypatch, tmp_path, caplog):
    """LoRA with bias="all" trains the base biases in fp32 on new data (p.data = p.data.float()): the loaded bf16
    biases the entry holds are untouched, so a step must not cost the user the store entry."""
    import torch

    from fastload.load.background_store import wait_for_store_writes

    checkpoint = make_checkpoint(tmp_path / "qwen2", "qwen2")
    monkeypatch.setenv("FASTLOAD_STORE_WRITE", "background")
    home = tmp_path / "home"
    model = load(checkpoint, monkeypatch, direct=True, store=home, lora={"bias": "all"}, dtype=torch.bfloat16)
    bias = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias
    assert bias.requires_grad and bias.dtype == torch.float32  # the case: a trained, upcast base bias
    before = bias.detach().clone()
    with caplog.at_level(logging.INFO, logger="fastload"):
        _train_one_step(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
        wait_for_store_writes()
    assert not torch.equal(before, bias.detach())  # the step did train it
    assert [problem for _, problem in Store(home).verify()] == [None], [r.getMessage() for r in caplog.records]
    reference = load(checkpoint, monkeypatch, direct=True, store=False, dtype=torch.bfloat16)
    stored = load(checkpoint, monkeypatch, direct=True, store=home, dtype=torch.bfloat16)
    assert stored.fastload.plan.source == "store"
    expected = reference.model.layers[0].self_attn.q_proj.bias
    assert torch.equal(stored.model.layers[0].self_attn.q_proj.bias, expected)  # the checkpoint's, not the trained


EXITING_CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from fastload import FastModel
from fastload.sources.store import Store
FastModel.from_pretrained({checkpoint!r}, lora=None, engine=False, store={home!r})
time.sleep(1.5)
print("entries before exit:", len(Store({home!r}).entries()), flush=True)
"""


def test_a_process_that_loads_and_exits_writes_its_entry_at_exit(tmp_path):
    """A script that never trains: the held writer starts when the main thread ends, not START_AFTER_S later, and the
    interpreter's exit waits for a whole entry."""
    from fastload.load.background_store import START_AFTER_S

    checkpoint = make_checkpoint(tmp_path / "model", "llama")
    home = tmp_path / "home"
    script = tmp_path / "child.py"
    script.write_text(EXITING_CHILD.format(tests=str(Path(__file__).resolve().parents[1]), checkpoint=str(checkpoint),
                                           home=str(home)))
    env = dict(os.environ, FASTLOAD_STORE_WRITE="background", FASTLOAD_HOME=str(home), HF_HUB_OFFLINE="1")
    started = time.monotonic()
    child = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                           timeout=START_AFTER_S + 60)
    took = time.monotonic() - started
    assert child.returncode == 0, child.stderr[-2000:]
    assert "entries before exit: 0" in child.stdout  # held while the script ran
    assert [problem for _, problem in Store(home).verify()] == [None]  # written whole at exit
    assert not any((home / "tmp").glob("*"))  # nothing half-written left behind
    assert took < START_AFTER_S, f"{took:.1f} s: the exit waited for the deadline"


CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
import torch
from fastload import FastModel
FastModel.from_pretrained({checkpoint!r}, lora=None, engine=False, store={home!r})
print("loaded", flush=True)
torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).step()  # the first step starts the writer
time.sleep(120)
"""


def test_a_store_write_killed_mid_way_leaves_a_whole_entry_or_none(tmp_path):
    """SIGKILL while the background writer works: the store holds a whole entry or none, and the next load works."""
    checkpoint = make_checkpoint(tmp_path / "model", "llama", hidden_size=512, intermediate_size=2048)
    home = tmp_path / "home"
    script = tmp_path / "child.py"
    tests = str(Path(__file__).resolve().parents[1])
    script.write_text(CHILD.format(tests=tests, checkpoint=str(checkpoint), home=str(home)))
    env = dict(os.environ, FASTLOAD_STORE_WRITE="background", FASTLOAD_HOME=str(home), HF_HUB_OFFLINE="1")
    child = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    tmp_dir, killed_mid_write = home / "tmp", False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            writing = [d for d in tmp_dir.glob("*.*.*") if (d / "model.safetensors").exists()] \
                if tmp_dir.is_dir() else []
            if writing:
                os.kill(child.pid, signal.SIGKILL)
                killed_mid_write = not any((home / "quantized").glob("*"))
                break
            time.sleep(0.0005)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    store = Store(home)
    entries = store.entries()
    assert len(entries) <= 1
    assert all(problem is None for _, problem in store.verify())  # whole, or absent
    if killed_mid_write:
        assert entries == [] and any(tmp_dir.iterdir())  # only the dead writer's temporary folder is left
    model, _ = FastModel.from_pretrained(checkpoint, lora=None, engine=False, store=store)
    assert model.fastload.plan.source in ("local", "store")
    from fastload.load.background_store import wait_for_store_writes

    wait_for_store_writes()
    assert [problem for _, problem in store.verify()] == [None]
    assert not [d for d in tmp_dir.iterdir() if f".{child.pid}." in d.name]  # the dead writer's folder is gone


@pytest.mark.gpu
def test_direct_load_on_the_gpu_is_the_model_from_pretrained_makes(family_checkpoint, monkeypatch, isolated_env):
    assert_gpu_loads_agree(family_checkpoint, monkeypatch)


def assert_gpu_loads_agree(checkpoint, monkeypatch) -> None:
    """On CUDA in bf16, fresh and from the store entry the first load writes: the direct load is transformers' model."""
    import torch

    for store in (False, True):
        if store:
            load(checkpoint, monkeypatch, direct=False, dtype=torch.bfloat16)  # stores the entry
        reference = load(checkpoint, monkeypatch, direct=False, store=store, dtype=torch.bfloat16)
        model = load(checkpoint, monkeypatch, direct=True, store=store, dtype=torch.bfloat16)
        assert_same_model(reference, model, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["deepseek_v3", "gemma3", "qwen3_5_moe_text"])
def test_direct_load_of_more_layouts_on_the_gpu_is_the_model_from_pretrained_makes(family, tmp_path, monkeypatch,
                                                                                  isolated_env):
    """On CUDA in bf16, fresh and from the store: the DeepSeek kin (its router kept fp32), Gemma-3's renamed
    image-text names, Qwen3.5-MoE's per-expert tensors under its text model."""
    assert_gpu_loads_agree(family_checkpoint_at(tmp_path / family, family), monkeypatch)


@pytest.mark.gpu
def test_the_background_writer_copies_gpu_tensors_whole_through_its_pinned_buffer(monkeypatch, tmp_path):
    """Tensors larger than the pinned buffer, of odd sizes and several dtypes, come back from the file bit for bit."""
    import torch
    from safetensors.torch import load_file

    from fastload.load import background_store

    monkeypatch.setattr(background_store, "PINNED_BYTES", 1000)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = {"packed": torch.randint(0, 255, (4099, 3), dtype=torch.uint8, device="cuda", generator=gen),
               "weight": torch.randn(333, 7, dtype=torch.bfloat16, device="cuda", generator=gen).t(),
               "absmax": torch.randn(77, device="cuda", generator=gen), "host": torch.arange(5)}
    background_store.write_safetensors(tmp_path / "m.safetensors", tensors, torch.cuda.Stream())
    read = load_file(tmp_path / "m.safetensors")
    assert read.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(read[name], t.cpu()), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_next", "olmoe", "hunyuan_v1_moe", "phimoe", "jamba", "lfm2_moe",
                                    "qwen3_5_moe_text", "gemma3", "qwen3_5", "deepseek_v2", "deepseek_v3",
                                    "deepseek_v32", "glm_moe_dsa", "dots1", "glm4_moe", "glm4_moe_lite", "sarvam_mla",
                                    "gpt_oss", "granitemoehybrid", "gpt_neox"])
def test_direct_load_reads_each_layout_as_from_pretrained_does(family, dtype, tmp_path, monkeypatch):
    """Per-expert checkpoints of more MoE families, image-text checkpoints whose names transformers renames
    (Gemma-3's pre-5 names, Qwen3.5's text model under language_model, its tower skipped), and families whose
    modules transformers keeps in fp32 at some dtypes (DeepSeek-V3's router in bf16 and fp16, gpt-oss's norms in
    fp16): the direct load's model is transformers' own, bit for bit (these took transformers' slower loader before)."""
    import torch

    path = family_checkpoint_at(tmp_path / family, family)
    options = dict(store=False, dtype=getattr(torch, dtype))
    reference = load(path, monkeypatch, direct=False, **options)
    model = load(path, monkeypatch, direct=True, **options)
    assert_same_model(reference, model)


@pytest.mark.parametrize("family", ["gemma3", "qwen3_5", "qwen3_5_moe_text"])
def test_a_store_entry_of_an_image_text_model_loads_directly_as_from_pretrained_does(family, tmp_path, monkeypatch,
                                                                                   isolated_env):
    """transformers saves Gemma-3 under its pre-5 names (language_model.model.*) and Qwen3.5's text model under the
    image-text names, so their store entries hold each 4-bit weight and its statistics under names the model renames:
    the direct load must read them there (both fell back to transformers' loader, on an H100 too, until 2026-12-07)."""
    import torch

    assert_store_loads_agree(family_checkpoint_at(tmp_path / family, family), monkeypatch, dtype=torch.bfloat16)


def test_a_store_entry_with_fp32_kept_modules_loads_directly_as_from_pretrained_does(tmp_path, monkeypatch,
                                                                                    isolated_env):
    """DeepSeek-V3 in bf16: its store entry holds the router's weight and bias in fp32, which the direct load of a
    pre-quantized checkpoint (every other float cast to the compute dtype) must keep in fp32, as transformers does."""
    import torch

    path = family_checkpoint_at(tmp_path / "deepseek_v3", "deepseek_v3")
    assert_store_loads_agree(path, monkeypatch, dtype=torch.bfloat16)
