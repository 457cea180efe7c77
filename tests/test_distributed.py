"""Several processes under torchrun (fastload.distributed, fastload.train.fsdp): 2 gloo processes on the CPU.

One launch runs tests/dist_worker.py's suite; the one-process references run the same functions in this process.
Tolerances:
losses to rtol 1e-5 (the same rows, gloo's fp32 reductions in another order); adapters to 2e-3 absolute, a fifth of
one step at lr 1e-2 (Adam divides by the root of tiny second moments, so reduction-order noise in near-zero
gradients moves single entries by up to ~5e-4; a wrong batch split or a lost gradient moves them by a whole step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dist_worker
from fastload import distributed
from fastload.errors import InvalidOption

WORKER = Path(__file__).with_name("dist_worker.py")
LAUNCH_TIMEOUT_S = 400  # a hang fails the tests instead of blocking CI; the suite's launch takes ~1.5 min on 2 cores
LOSS_RTOL, ADAPTER_ATOL = 1e-5, 2e-3


def torchrun(out: Path, home: Path, *worker_args: str, nproc: int = 2) -> subprocess.Popen:
    """Start python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py ... with its own store and an
    offline, empty HF cache."""
    out.mkdir(parents=True, exist_ok=True)
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]  # e.g. a site of extra packages
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(WORKER.parent),
                                                        *inherited]),
           "OMP_NUM_THREADS": "1", "FASTLOAD_DIST_TIMEOUT_S": "120", "FASTLOAD_HOME": str(home),
           "HF_HOME": str(home.parent / "hf-home"), "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(WORKER), *worker_args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the launch did not end within {LAUNCH_TIMEOUT_S} s (a rank hangs?):\n{output[-3000:]}")
    return process.returncode, output, time.monotonic() - started


def results(out: Path, nproc: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert left.keys() == right.keys() and left
    return max((left[k] - right[k]).abs().max().item() for k in left)


@pytest.fixture(scope="module")
def launch(tiny_llama, tmp_path_factory):
    """One 2-process launch of dist_worker's suite (DDP training with the store race, FSDP2-QLoRA, a failing rank),
    and meanwhile, in this process, the one-process references of the first two."""
    root = tmp_path_factory.mktemp("launch")
    process = torchrun(root / "out", root / "home", "suite", str(tiny_llama), str(root / "out"))
    with pytest.MonkeyPatch.context() as m:
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            m.delenv(name, raising=False)
        m.setenv("FASTLOAD_HOME", str(root / "one-home"))
        m.setenv("HF_HUB_OFFLINE", "1")
        for part, run in (("ddp", dist_worker.train), ("fsdp", dist_worker.fsdp_loop)):
            (root / "one" / part).mkdir(parents=True)
            run(str(tiny_llama), root / "one" / part, dist_worker.SUITE_BATCH, dist_worker.SUITE_STEPS,
                "ddp" if part == "ddp" else "fsdp4bit")
    code, output, _ = finished(process)
    return {"code": code, "output": output, "out": root / "out", "one": root / "one", "home": root / "home"}


def test_ddp_trains_as_one_process_and_rank_zero_alone_writes_the_store(launch):
    out, one = launch["out"] / "ddp", launch["one"] / "ddp"
    assert (out / "rank1.json").is_file(), launch["output"][-3000:]
    rank0, rank1 = results(out)
    expected = json.loads((one / "rank0.json").read_text())["losses"]
    for got in (rank0, rank1):
        assert got["ddp"] == "DistributedDataParallel" and got["args"]["ddp_find_unused_parameters"] is False
        assert got["losses"] == pytest.approx(expected, rel=LOSS_RTOL)
    assert adapter_difference(out / "adapter", one / "adapter") < ADAPTER_ATOL
    # both ranks started with an empty store: rank 0 quantized and stored, rank 1 loaded its whole entry
    assert (rank0["store_written_here"], rank0["source"]) == (True, "local")
    assert (rank1["store_written_here"], rank1["source"]) == (False, "store")
    from fastload.sources.store import Store

    store = Store(launch["home"])
    assert [problem for _, problem in store.verify()] == [None]
    leftovers = list(store.tmp_dir.iterdir()) if store.tmp_dir.is_dir() else []
    assert leftovers == []


def test_fsdp2_qlora_shards_4bit_layers_and_trains_as_one_process(launch):
    out, one = launch["out"] / "fsdp", launch["one"] / "fsdp"
    assert (out / "rank1.json").is_file(), launch["output"][-3000:]
    expected = json.loads((one / "rank0.json").read_text())
    for got in results(out):
        assert got["sharded_params"] > 0 and got["fsdp_checkpointed_modules"] > 0 and got["gathered"] > 0
        # the packed 4-bit weights are stored in the compute dtype (fp32 on this CPU), the LoRA matrices too
        assert got["base_dtypes"] == got["trainable_dtypes"] == expected["trainable_dtypes"]
        assert got["losses"] == pytest.approx(expected["losses"], rel=LOSS_RTOL)
    assert adapter_difference(out / "adapter", one / "adapter") < ADAPTER_ATOL


def test_a_failing_rank_stops_every_rank_with_its_error(launch):
    out = launch["out"] / "fail"
    assert launch["code"] != 0  # and it ended (finished() fails the test on a hang)
    own, other = (out / "rank1.error").read_text(), (out / "rank0.error").read_text()
    assert own.startswith("ModelNotFound") and "no-such-model" in own
    assert other.startswith("RankFailed") and "rank 1 failed: ModelNotFound" in other and "no-such-model" in other
    assert not (out / "rank0.json").exists()


# -- in this process: what a launch's environment means ------------------------------------------------------------

def test_launch_advice_names_the_commands_for_several_visible_gpus():
    advice = distributed.launch_advice(4, None)
    assert "torchrun --nproc-per-node 4" in advice and "accelerate launch --num_processes 4" in advice
    assert distributed.launch_advice(1, None) is None
    assert distributed.launch_advice(4, distributed.Launch(0, 0, 4)) is None


def test_launch_read_from_the_launchers_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.current_launch() == distributed.Launch(1, 1, 2)
    assert not distributed.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.current_launch() is None and distributed.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InvalidOption, match="WORLD_SIZE"):
        distributed.current_launch()


def test_fsdp_stores_4bit_weights_in_the_compute_dtype_and_refuses_another():
    from fastload.train.fsdp import fsdp_load_options

    options, engine = fsdp_load_options({}, None, "bfloat16", "cpu", True)
    assert options["bnb_4bit_quant_storage"] == "bfloat16" and engine is False
    assert options["quantize_experts"] is False  # FSDP shards plain tensors, not fastload's packed expert stacks
    with pytest.raises(InvalidOption, match="bnb_4bit_quant_storage"):
        fsdp_load_options({"bnb_4bit_quant_storage": "uint8"}, None, "bfloat16", "cpu", True)
    with pytest.raises(InvalidOption, match="quantize_experts"):  # asked for, not silently dropped
        fsdp_load_options({"quantize_experts": True}, None, "bfloat16", "cpu", True)
    assert fsdp_load_options({"quantize_experts": False}, None, "bfloat16", "cpu", True)[0]["quantize_experts"] is False


def test_a_gathered_adapter_that_peft_finds_nothing_in_is_an_error_not_an_empty_file(tmp_path):
    """The FSDP save path hands peft the gathered tensors; a selection without adapter tensors (peft 0.22 found none
    under the checkpoint wrapper's names) must stop the save, not write an adapter file without tensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fastload.errors import AdapterError
    from fastload.train.fsdp import save_gathered_adapter
    from tiny import make_checkpoint

    base = AutoModelForCausalLM.from_pretrained(make_checkpoint(tmp_path / "ckpt"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    out = tmp_path / "adapter"
    out.mkdir()
    save_gathered_adapter(model, out, trainable)  # names as the model's: the adapter is found and written
    from safetensors.torch import load_file
    assert len(load_file(out / "adapter_model.safetensors")) == len(trainable)

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    base_only = {n: p.detach() for n, p in model.named_parameters() if "lora_" not in n}
    with pytest.raises(AdapterError, match="selected none of the .* gathered trainable tensors"):
        save_gathered_adapter(model, wrong, base_only)
    assert list(wrong.iterdir()) == []


def test_fsdp_is_read_from_accelerates_environment(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.fsdp_from_launcher()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not distributed.fsdp_from_launcher()


@pytest.mark.gpu
def test_ddp_on_two_gpus_places_each_rank_on_its_own_gpu(tiny_llama, tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "gpus"
    code, output, _ = finished(torchrun(out, tmp_path / "home", "train", str(tiny_llama), str(out), "4", "3", "ddp"))
    assert code == 0, output[-3000:]
    assert [r["device"] for r in results(out)] == ["cuda:0", "cuda:1"]


@pytest.mark.gpu
def test_fsdp2_qlora_through_the_trainer_on_two_gpus(tiny_llama, tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "fsdp-gpus"
    code, output, _ = finished(torchrun(out, tmp_path / "home", "train", str(tiny_llama), str(out), "4", "3",
                                        "fsdp4bit"))
    assert code == 0, output[-3000:]
    for got in results(out):
        assert got["sharded_params"] > 0 and got["fsdp_checkpointed_modules"] > 0
        assert got["trainable_dtypes"] == ["torch.bfloat16"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_estimate_per_gpu_for_ddp_and_fsdp(tiny_llama, capsys):
    from fastload.cli import main

    def estimate(gpus: int) -> dict:
        assert main(["estimate", str(tiny_llama), "--gpus", str(gpus), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    two, four = estimate(2), estimate(4)
    assert two["ddp_per_gpu"] == four["ddp_per_gpu"] == two["training_total_4bit"]  # DDP: the whole model each
    assert four["fsdp_per_gpu"] < two["fsdp_per_gpu"] < two["ddp_per_gpu"]
    assert two["fsdp_load_peak_per_gpu"] == two["weights_4bit"]
    assert "gpus" not in estimate(1)


@pytest.mark.gpu
def test_torchrun_on_one_gpu_trains_ddp_and_fsdp2_qlora_on_cuda(tiny_llama, tmp_path):
    """What one GPU can show of the launcher paths: the rank lands on cuda:0 by itself, DDP trains, FSDP2-QLoRA
    loads with 4-bit weights stored in bf16 (what FSDP shards) and trains bf16 adapters through the Trainer, and the
    adapter saves. (Sharding itself needs two ranks: the two-GPU tests above.)"""
    out = tmp_path / "ddp1"
    code, output, _ = finished(torchrun(out, tmp_path / "home", "train", str(tiny_llama), str(out), "4", "3", "ddp",
                                        nproc=1))
    assert code == 0, output[-3000:]
    assert [r["device"] for r in results(out, nproc=1)] == ["cuda:0"]
    out = tmp_path / "fsdp1"
    code, output, _ = finished(torchrun(out, tmp_path / "home1", "train", str(tiny_llama), str(out), "4", "3",
                                        "fsdp4bit", nproc=1))
    assert code == 0, output[-3000:]
    (got,) = results(out, nproc=1)
    assert got["device"] == "cuda:0" and got["trainable_dtypes"] == ["torch.bfloat16"]
    assert got["losses"][-1] < got["losses"][0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
