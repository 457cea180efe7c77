"""One multi-GPU measurement, run under torchrun by benchmarks/multi_gpu.sh (every rank runs it; rank 0 writes).

  python -m torch.distributed.run --nproc-per-node N benchmarks/multi_gpu.py ddp  IMPL MODEL_DIR OUT.json
  python -m torch.distributed.run --nproc-per-node N benchmarks/multi_gpu.py fsdp IMPL MODEL_DIR OUT.json

IMPL: `fastload` (FastModel.from_pretrained: each rank on its own GPU by itself, fsdp=True for FSDP; then
fastload.train.fsdp.shard) or `recipe` (the plain accelerate-era recipe: BitsAndBytesConfig NF4 + bf16 storage for
FSDP, device_map={"": LOCAL_RANK}, prepare_model_for_kbit_training, get_peft_model, DDP(...) or torch's fully_shard
per decoder layer with checkpoint_wrapper). Same LoRA (r=16 on every projection), AdamW8bit for DDP / torch AdamW
for FSDP (bitsandbytes' 8-bit state is not sharded by FSDP), random token ids, BATCH x SEQ per GPU.
Writes: median step seconds, tokens/s over all GPUs, peak allocated memory of every GPU, load seconds.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

SEQ = int(os.environ.get("SEQ", "2048"))
BATCH = int(os.environ.get("BATCH", "2"))
WARMUP, STEPS = int(os.environ.get("WARMUP", "3")), int(os.environ.get("STEPS", "10"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_fastload(model_dir: str, fsdp: bool):
    from fastload import FastModel

    model, _ = FastModel.from_pretrained(model_dir, max_seq_length=SEQ, dtype=torch.bfloat16, fsdp=fsdp or None,
                                         store=False)
    if fsdp:
        from fastload.train.fsdp import shard

        return shard(model), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    local = int(os.environ["LOCAL_RANK"])
    optimizer = FastModel.get_optimizer(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[local], find_unused_parameters=False), optimizer


def load_recipe(model_dir: str, fsdp: bool):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    local = int(os.environ["LOCAL_RANK"])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_quant_storage=torch.bfloat16 if fsdp else torch.uint8)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": local})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=not fsdp,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not fsdp:
        return (torch.nn.parallel.DistributedDataParallel(model, device_ids=[local]),
                bnb.optim.AdamW8bit(trainable, lr=2e-4))
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )
    from torch.distributed.fsdp import fully_shard

    for p in trainable:
        p.data = p.data.to(torch.bfloat16)
    layers = model.base_model.model.model.layers
    kind = type(layers[0])
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, kind))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)


def main(kind: str, impl: str, model_dir: str, out: str) -> None:
    fsdp = kind == "fsdp"
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():  # also for 1 process (WORLD_SIZE=1), where fastload makes no group: DDP needs one
        dist.init_process_group("nccl")
    started = time.perf_counter()
    model, optimizer = (load_fastload if impl == "fastload" else load_recipe)(model_dir, fsdp)
    load_s = time.perf_counter() - started
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab = model.module.config.vocab_size if hasattr(model, "module") else model.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(rank)
    ids = torch.randint(0, vocab, (BATCH, SEQ), device="cuda", generator=gen)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(WARMUP + STEPS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    peaks = [None] * world
    dist.all_gather_object(peaks, torch.cuda.max_memory_allocated() / 2 ** 30)
    if rank == 0:
        step_s = statistics.median(times)
        record = {"kind": kind, "impl": impl, "model": model_dir, "gpus": world, "seq": SEQ, "batch_per_gpu": BATCH,
                  "median_step_s": step_s, "tokens_per_s": world * BATCH * SEQ / step_s, "peak_gib_per_gpu": peaks,
                  "load_s": load_s, "gpu": torch.cuda.get_device_name()}
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
