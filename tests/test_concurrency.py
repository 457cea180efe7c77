"""Several processes and killed processes against one store: one entry, every model working, nothing half-written
ever trusted. Real processes (subprocess), real SIGKILL, no mocks of the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastload import FastModel
from fastload.sources.store import Store
from helpers_faults import WEIGHTS, leftover_tmp, logits

TESTS = Path(__file__).parent
IDS = [[1, 5, 9, 13, 2]]

# Loads the model after every worker has imported torch (a start file), then prints what it got as one JSON line.
LOADER = """
import json, os, sys, time
from pathlib import Path
import torch
from fastload import FastModel
go = Path(os.environ["START_FILE"])
while not go.exists():
    time.sleep(0.01)
model, tok = FastModel.from_pretrained(sys.argv[1], lora=None, gradient_checkpointing=False)
with torch.no_grad():
    out = model(torch.tensor(%r)).logits.float()
print(json.dumps({"source": model.fastload.plan.source, "quantized_now": model.fastload.quantized_now,
                  "logits": out[0, :, :8].tolist()}))
""" % (IDS,)

# Stores the model but stops at a chosen point of the write, says so through a file, and waits to be killed.
STOPPED_WRITER = """
import os, sys, time
from pathlib import Path
import fastload.sources.store
import transformers.modeling_utils as mu
from fastload import FastModel
ready, where = Path(os.environ["READY_FILE"]), os.environ["KILL_POINT"]

def wait_for_the_kill():
    ready.write_text(str(os.getpid()))
    time.sleep(120)

if where == "half-written weights":
    real_save = mu.safe_save_file
    def half_then_wait(tensors, filename, *a, **kw):
        real_save(tensors, filename, *a, **kw)
        os.truncate(filename, os.path.getsize(filename) // 2)
        wait_for_the_kill()
    mu.safe_save_file = half_then_wait
else:  # every file written, the manifest not yet, the folder not yet renamed into place
    real_hash = fastload.sources.store.file_sha256
    def wait_then_hash(path, *a, **kw):
        wait_for_the_kill()
        return real_hash(path, *a, **kw)
    fastload.sources.store.file_sha256 = wait_then_hash
FastModel.from_pretrained(sys.argv[1], lora=None, gradient_checkpointing=False)
print("not killed")
"""


def worker_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]), HF_HUB_OFFLINE="1", **extra)
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def test_three_processes_loading_one_uncached_model_make_one_entry(tiny_llama, isolated_env, tmp_path):
    start = tmp_path / "start"
    env = worker_env(START_FILE=str(start))
    procs = [subprocess.Popen([sys.executable, "-c", LOADER, str(tiny_llama)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    time.sleep(0.5)
    start.touch()  # released together: all three resolve the model while no entry exists yet
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=150)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    store = Store(isolated_env)
    [entry] = store.entries()
    assert store.verify() == [(entry, None)] and leftover_tmp(isolated_env) == []
    assert sum(r["quantized_now"] for r in results) == 1  # one quantized and stored, the others waited and read it
    assert all(r["logits"] == results[0]["logits"] for r in results)  # N working, identical models
    import torch

    model, _ = FastModel.from_pretrained(tiny_llama, lora=None, gradient_checkpointing=False)
    assert model.fastload.plan.source == "store"
    here = logits(model, torch.tensor(IDS))[0, :, :8]
    assert torch.allclose(here, torch.tensor(results[0]["logits"]), atol=1e-5)


@pytest.mark.parametrize("kill_point", ["half-written weights", "before the rename"])
def test_storing_process_killed_mid_write_then_load_succeeds(tiny_llama, isolated_env, tmp_path, kill_point):
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_WRITER, str(tiny_llama)],
                            env=worker_env(READY_FILE=str(ready), KILL_POINT=kill_point),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the writer never reached the kill point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    store = Store(isolated_env)
    [left] = leftover_tmp(isolated_env)  # the dead writer's temporary folder, never under an entry's name
    assert any((isolated_env / "tmp" / left).glob("*.safetensors"))
    assert store.entries() == []
    import fastload

    assert fastload.resolve(tiny_llama).source == "local"  # nothing stored is offered

    model, _ = FastModel.from_pretrained(tiny_llama, lora=None, gradient_checkpointing=False)  # the lock is free
    assert model.fastload.quantized_now
    [entry] = store.entries()
    assert store.verify() == [(entry, None)]
    assert leftover_tmp(isolated_env) == []  # the dead writer's folder was cleaned up
    again, _ = FastModel.from_pretrained(tiny_llama, lora=None, gradient_checkpointing=False)
    assert again.fastload.plan.source == "store" and Path(again.fastload.plan.location) == entry.path
    assert (entry.path / WEIGHTS).is_file()


# Saves into TARGET through fastload's atomic folder, stops at a chosen point, says so, and waits to be killed.
STOPPED_SAVER = """
import os, sys, time
from pathlib import Path
import fastload.save.folders as folders
target, point, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
real_rename = os.rename
def rename(src, dst):
    real_rename(src, dst)
    if point == "between renames" and Path(dst).name.startswith(".") and ".old-" in Path(dst).name:
        ready.write_text("moved aside")
        time.sleep(600)
os.rename = rename
with folders.atomic_directory(target, marker="adapter_config.json") as tmp:
    (tmp / "adapter_model.safetensors").write_bytes(b"new weights, half written")
    if point == "mid-write":
        ready.write_text("writing")
        time.sleep(600)
    (tmp / "adapter_config.json").write_text("{}")
"""


@pytest.mark.parametrize("kill_point", ["mid-write", "between renames"])
def test_a_save_killed_mid_way_is_cleaned_up_or_put_back_by_the_next_save(tmp_path, kill_point):
    """SIGKILL while saving an adapter: the previous save stays readable (put back if it had been moved aside),
    and the next save to the same place removes what the killed one left."""
    from fastload.save.folders import atomic_directory

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_config.json").write_text('{"previous": true}')
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_SAVER, str(target), kill_point, str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the saver never reached the kill point"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter."))
    assert leftovers, "the kill left nothing behind: the test did not kill mid-way"
    with atomic_directory(target, marker="adapter_config.json") as tmp:
        if kill_point == "between renames":  # the previous save was put back before this one started
            assert json.loads((target / "adapter_config.json").read_text()) == {"previous": True}
        (tmp / "adapter_config.json").write_text('{"next": true}')
    assert json.loads((target / "adapter_config.json").read_text()) == {"next": True}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter.")], "leftovers were not removed"
