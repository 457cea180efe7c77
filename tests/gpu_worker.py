"""Run by tests/test_gpu.py in a fresh process: train a few steps with one backend, print the losses as JSON.

Unsloth patches transformers when imported, so each backend gets its own process."""

import json
import sys

import torch

from fastload import FastModel


def main(checkpoint: str, backend: str, steps: int = 6) -> None:
    model, _ = FastModel.from_pretrained(checkpoint, max_seq_length=256, dtype=torch.bfloat16, backend=backend,
                                         store=False, random_state=0)
    opt = FastModel.get_optimizer(model, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 256), generator=gen).cuda()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    # generation mode and back, as a notebook does between training runs
    FastModel.for_inference(model)
    generated = model.generate(input_ids=ids[:1, :16], max_new_tokens=8, do_sample=False)
    FastModel.for_training(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    print(json.dumps({"backend": model.fastload.backend, "losses": losses,
                      "generated_new_tokens": generated.shape[1] - 16, "training_again": model.training,
                      "loss_after_generation": loss.item(),
                      "lora_grads_after_generation": bool(lora_grads) and all(g is not None for g in lora_grads),
                      "trainable_only_lora": all("lora_" in n for n, p in model.named_parameters() if p.requires_grad),
                      "optimizer_classes": [c.__name__ for c in type(opt).__mro__]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
