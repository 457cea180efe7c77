"""Run by tests/test_distributed.py under `python -m torch.distributed.run --nproc-per-node N` (or alone): one
fastload step of a multi-process run per mode, its results written as JSON (one file per rank) for the test.

Modes:
  suite CKPT OUT: train (ddp, store on) into OUT/ddp, fsdp-loop (fsdp4bit) into OUT/fsdp, fail (rank 1) into
    OUT/fail: one launch for the CPU tests (each launch costs ~30 s of imports on 2 cores).
  train CKPT OUT GLOBAL_BATCH STEPS [ddp|fsdp|fsdp4bit]: from_pretrained + get_trainer + train + save_adapter.
  fsdp-loop CKPT OUT GLOBAL_BATCH STEPS fsdp|fsdp4bit: from_pretrained(fsdp=True) + shard + a plain loop.
  load CKPT OUT: from_pretrained only (the store race: which rank wrote the entry, what each loaded).
  fail CKPT OUT BAD_RANK: rank BAD_RANK loads a missing model; every rank must exit with the same error.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

from fastload import FastModel

SEQ = 32
EXAMPLES = 16


def examples(vocab: int) -> list[dict]:
    """Equal-length rows (no padding): each rank's mean loss then weighs as the one-process mean does."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (EXAMPLES, SEQ), generator=gen).tolist()
    return [{"input_ids": row, "labels": row, "attention_mask": [1] * SEQ} for row in ids]


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def write(out: Path, data: dict) -> None:
    (out / f"rank{rank()}.json").write_text(json.dumps(data))


def train(ckpt: str, out: Path, global_batch: int, steps: int, how: str) -> None:
    """how: "ddp" (4-bit, store on), "fsdp" (16-bit base + LoRA) or "fsdp4bit" (QLoRA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = how.startswith("fsdp")
    model, tok = FastModel.from_pretrained(ckpt, max_seq_length=SEQ, store=not fsdp, random_state=0,
                                           load_in_4bit=how != "fsdp", fsdp=fsdp or None)
    args = FastModel.training_arguments(out / "trainer", model=model, per_device_train_batch_size=global_batch // world,
                                        gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-2,
                                        logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                                        dataloader_num_workers=0, disable_tqdm=True)
    trainer = FastModel.get_trainer(model, tok, examples(model.config.vocab_size), args=args)
    trainer.train()
    wrapped = trainer.model_wrapped
    sharded = [n for n, p in wrapped.named_parameters() if type(p).__name__ == "DTensor"]
    checkpointed = sum("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_modules())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    FastModel.save_adapter(model, out / "adapter")
    write(out, {"losses": losses, "sharded_params": len(sharded), "fsdp_checkpointed_modules": checkpointed,
                "ddp": type(wrapped).__name__,
                "store_written_here": bool(model.fastload.quantized_now),
                "source": model.fastload.plan.source,
                "args": {"ddp_find_unused_parameters": args.ddp_find_unused_parameters,
                         "fsdp": bool(args.fsdp), "world": world},
                "device": str(next(p for p in model.parameters()).device),
                "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})})


def fsdp_loop(ckpt: str, out: Path, global_batch: int, steps: int, how: str) -> None:
    """fsdp=True, then (launched) fastload.train.fsdp.shard and a plain loop: torch's FSDP2 on gloo, which the
    Trainer's accelerate path does not take on CPUs. Each rank trains on its slice of the same global batch."""
    from fastload.train.fsdp import full_state_dict, shard

    world, me = int(os.environ.get("WORLD_SIZE", "1")), rank()
    model, _ = FastModel.from_pretrained(ckpt, max_seq_length=SEQ, store=False, random_state=0,
                                         load_in_4bit=how == "fsdp4bit", fsdp=True)
    trainable_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    storage = sorted({str(p.dtype) for n, p in model.named_parameters() if "base_layer" in n})
    if world > 1:
        shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = torch.tensor([ex["input_ids"] for ex in examples(model.config.vocab_size)])
    per = global_batch // world
    losses = []
    for step in range(steps):
        batch = rows[step * global_batch + me * per: step * global_batch + (me + 1) * per]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean)
        losses.append(mean.item() / world)
    sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    checkpointed = sum("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
    gathered = full_state_dict(model)
    FastModel.save_adapter(model, out / "adapter")
    write(out, {"losses": losses, "sharded_params": sharded, "fsdp_checkpointed_modules": checkpointed,
                "trainable_dtypes": trainable_dtypes, "base_dtypes": storage,
                "gathered": None if gathered is None else len(gathered)})


def load(ckpt: str, out: Path) -> None:
    started = time.time()
    model, _ = FastModel.from_pretrained(ckpt, max_seq_length=SEQ, lora=None)
    write(out, {"source": model.fastload.plan.source, "location": model.fastload.plan.location,
                "quantized_now": bool(model.fastload.quantized_now), "started": started,
                "finished": time.time()})


def fail(ckpt: str, out: Path, bad_rank: int) -> None:
    name = str(out / "no-such-model") if rank() == bad_rank else ckpt
    FastModel.from_pretrained(name, max_seq_length=SEQ, store=False)
    write(out, {"loaded": True})


SUITE_BATCH, SUITE_STEPS = 4, 3


def suite(ckpt: str, out: Path) -> None:
    for part in ("ddp", "fsdp", "fail"):
        (out / part).mkdir(parents=True, exist_ok=True)
    train(ckpt, out / "ddp", SUITE_BATCH, SUITE_STEPS, "ddp")
    fsdp_loop(ckpt, out / "fsdp", SUITE_BATCH, SUITE_STEPS, "fsdp4bit")
    try:
        fail(ckpt, out / "fail", 1)
    except Exception as e:
        (out / "fail" / f"rank{rank()}.error").write_text(f"{type(e).__name__}: {e}")
        raise


def main() -> None:
    mode, ckpt, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if mode == "suite":
        suite(ckpt, out)
    elif mode == "train":
        train(ckpt, out, int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] if len(sys.argv) > 6 else "ddp")
    elif mode == "fsdp-loop":
        fsdp_loop(ckpt, out, int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    elif mode == "load":
        load(ckpt, out)
    else:
        fail(ckpt, out, int(sys.argv[4]))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # what each rank raised, for the test to compare
        if sys.argv[1] != "suite":
            Path(sys.argv[3], f"rank{rank()}.error").write_text(f"{type(e).__name__}: {e}")
        raise
