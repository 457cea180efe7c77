"""A load keeps no full 16-bit copy of the model in the process's own (anonymous) memory (issue 18).

Measured in fresh processes, as a user's load runs (this test process's allocator keeps what earlier tests freed):
the peak of RssAnon (/proc/self/status, sampled every millisecond) above its level just before from_pretrained.
Pages mapped from the checkpoint or the store entry are the page cache's and do not count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MEASURE = """
import json, sys
sys.path.insert(0, {tests!r})
from fastload import FastModel
from fastload.bench.loadtime import AnonPeak
from fastload.load.background_store import wait_for_store_writes
from fastload.sources.store import Store

store = Store({home!r}) if {home!r} else False
options = dict(lora=None, engine=False, gradient_checkpointing=False, device_map={device!r})
FastModel.from_pretrained({warmup!r}, store=False, **options)  # imports and first-use caches before the baseline
with AnonPeak(every=0.001) as anon:
    model, _ = FastModel.from_pretrained({checkpoint!r}, store=store, **options)
    wait_for_store_writes()
    assert next(model.parameters()).device.type == {device!r}
state = model.fastload
print(json.dumps({{"grown": anon.peak - anon.baseline, "source": state.plan.source, "direct": state.direct_load,
                  "model_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())}}))
"""

# Llama-shaped, 306 MB of bf16 in one shard: 9 layers of 1024 x 4096 MLPs, so one tensor is small beside the whole
MID = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=9, num_attention_heads=8,
           num_key_value_heads=8, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=False)
MARGIN = 64 * 1024 ** 2  # the allocator's and the load's own bookkeeping


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> Path:
    """Written tensor by tensor by the benchmark's checkpoint maker (never the whole model in this process)."""
    from fastload.bench import models

    root = tmp_path_factory.mktemp("memory")
    models.SHAPES["test-mid"] = MID
    try:
        models.create_checkpoint("test-mid", root / "mid")
        models.create_checkpoint("tiny", root / "tiny")
    finally:
        del models.SHAPES["test-mid"]
    return root


def measure(root: Path, home: Path | None, device: str = "cpu", write: str = "wait") -> dict:
    script = root / "measure.py"
    script.write_text(MEASURE.format(tests=str(Path(__file__).resolve().parents[1]), warmup=str(root / "tiny"),
                                     checkpoint=str(root / "mid"), home=str(home) if home else "", device=device))
    env = dict(os.environ, FASTLOAD_DIRECT_LOAD="1", HF_HUB_OFFLINE="1", FASTLOAD_STORE_WRITE=write)
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_no_load_keeps_a_16_bit_copy_in_anonymous_memory(mid_checkpoint, tmp_path):
    """On the fly, on a first load that also writes the store entry, and from that entry: the process grows by the
    4-bit model (~0.28 of the bf16 bytes; from the store its pages are the entry's file, so less) plus a quarter of
    the checkpoint's 16-bit bytes for one tensor's quantization temporaries at a time, never by a whole 16-bit copy
    (+1.0). The CPU load quantizes in fp32, the user's default there: its temporaries are twice the bf16 tensor."""
    sixteen_bit = sum(f.stat().st_size for f in (mid_checkpoint / "mid").glob("*.safetensors"))
    home = tmp_path / "home"
    runs = {"on the fly": measure(mid_checkpoint, None), "first load, storing": measure(mid_checkpoint, home),
            "from the store": measure(mid_checkpoint, home)}
    assert [r["source"] for r in runs.values()] == ["local", "local", "store"]
    assert all(r["direct"] for r in runs.values())
    for what, run in runs.items():
        bound = run["model_bytes"] + sixteen_bit / 4 + MARGIN
        grown, model = run["grown"] / sixteen_bit, run["model_bytes"] / sixteen_bit
        print(f"{what}: grew {grown:.2f}x of {sixteen_bit / 1e6:.0f} MB, bound {bound / sixteen_bit:.2f}x")
        assert run["grown"] <= bound, (f"{what}: grew {grown:.2f}x the 16-bit checkpoint, bound "
                                       f"{bound / sixteen_bit:.2f}x (the 4-bit model {model:.2f}x)")


@pytest.mark.gpu
def test_no_gpu_load_keeps_a_16_bit_copy_in_host_memory(mid_checkpoint, tmp_path):
    """On a GPU the model lives in device memory: the host grows by a few tensors in flight (the readers' host
    copies on their way to the device), never by the model, let alone a 16-bit copy of it (issue 18: <= 2 GiB for
    an 8B load). The first load writes its entry in the background, as it does by default on a GPU."""
    sixteen_bit = sum(f.stat().st_size for f in (mid_checkpoint / "mid").glob("*.safetensors"))
    home = tmp_path / "home"
    runs = {"on the fly": measure(mid_checkpoint, None, "cuda"),
            "first load, storing": measure(mid_checkpoint, home, "cuda", write="background"),
            "from the store": measure(mid_checkpoint, home, "cuda")}
    assert [r["source"] for r in runs.values()] == ["local", "local", "store"]
    assert all(r["direct"] for r in runs.values())
    bound = sixteen_bit / 4 + MARGIN
    for what, run in runs.items():
        print(f"{what} (cuda): grew {run['grown'] / sixteen_bit:.2f}x of {sixteen_bit / 1e6:.0f} MB")
        assert run["grown"] <= bound, f"{what}: grew {run['grown'] / sixteen_bit:.2f}x the 16-bit checkpoint"
