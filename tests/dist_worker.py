"""Run by tests/test_distributed.py under `python -m torch.distributed.run --nproc-per-node N` (or alone): one
fastload step of a multi-process run per mode, its results written as JSON (one file per rank) for the test.

Modes:
  train CKPT OUT GLOBAL_BATCH STEPS [fsdp]: from_pretrained + get_trainer + train + save_adapter.
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


def train(ckpt: str, out: Path, global_batch: int, steps: int, fsdp: bool) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, tok = FastModel.from_pretrained(ckpt, max_seq_length=SEQ, store=False, random_state=0,
                                           load_in_4bit=not fsdp, fsdp=fsdp or None)
    args = FastModel.training_arguments(out / "trainer", model=model, per_device_train_batch_size=global_batch // world,
                                        gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-2,
                                        logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                                        dataloader_num_workers=0, disable_tqdm=True)
    trainer = FastModel.get_trainer(model, tok, examples(model.config.vocab_size), args=args)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    FastModel.save_adapter(model, out / "adapter")
    write(out, {"losses": losses, "args": {"ddp_find_unused_parameters": args.ddp_find_unused_parameters,
                                           "fsdp": bool(args.fsdp), "world": world},
                "device": str(next(p for p in model.parameters()).device),
                "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})})


def load(ckpt: str, out: Path) -> None:
    started = time.time()
    model, _ = FastModel.from_pretrained(ckpt, max_seq_length=SEQ, lora=None)
    write(out, {"source": model.fastload_plan.source, "location": model.fastload_plan.location,
                "quantized_now": bool(getattr(model, "fastload_quantized_now", False)), "started": started,
                "finished": time.time()})


def fail(ckpt: str, out: Path, bad_rank: int) -> None:
    name = str(out / "no-such-model") if rank() == bad_rank else ckpt
    FastModel.from_pretrained(name, max_seq_length=SEQ, store=False)
    write(out, {"loaded": True})


if __name__ == "__main__":
    mode, ckpt, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if mode == "train":
        train(ckpt, out, int(sys.argv[4]), int(sys.argv[5]), len(sys.argv) > 6 and sys.argv[6] == "fsdp")
    elif mode == "load":
        load(ckpt, out)
    else:
        fail(ckpt, out, int(sys.argv[4]))
