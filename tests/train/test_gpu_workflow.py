"""The notebook path on a CUDA GPU (pytest -m gpu): Trainer and SFTTrainer, the adapter round trip, merges that plain
transformers loads, batched generation and the trip back to training. Skipped on CPU machines, never faked.

The CPU tests (test_trainer.py, test_saving.py) hold the same contracts on the real SmolLM2; here the model is a
Llama-shaped checkpoint made in-process, in bfloat16 on the GPU, so tolerances are bf16 ones where it computes.
"""

from __future__ import annotations

import pytest
import torch
from test_trainer import RECORDS, dataset_loss, eight_bit_state

from fastload import FastModel
from fastload.train.checkpointing import checkpointing_state
from tiny import make_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gpuflow") / "llama", "llama", hidden_size=256,
                           intermediate_size=704, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                           max_position_embeddings=512)


def on_cuda_in_bf16(model) -> bool:
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    return q.base_layer.weight.device.type == "cuda" and q.base_layer.compute_dtype == torch.bfloat16


def offloads(model) -> bool:
    """Every checkpointed decoder layer goes through the engine's offloading function (not a trainer's own)."""
    from fastload.engine.offloaded_checkpoint import engine_checkpoint

    layers = model.get_base_model().model.layers
    return all(getattr(layer._gradient_checkpointing_func, "func", None) is engine_checkpoint for layer in layers)


def short_args(tmp_path, model, sft=False, **kw):
    options = dict(max_steps=8, per_device_train_batch_size=6, save_strategy="no", disable_tqdm=True,
                   learning_rate=5e-3, logging_steps=1)
    options.update(kw)
    return FastModel.training_arguments(tmp_path / "out", sft=sft, model=model, **options)


@pytest.mark.parametrize("sft", [False, True], ids=["Trainer", "SFTTrainer"])
def test_trainers_learn_on_the_gpu_in_bf16_with_8bit_adamw(llama, tmp_path, sft):
    model, tok = FastModel.from_pretrained(llama, max_seq_length=64)
    assert on_cuda_in_bf16(model)
    before = dataset_loss(model, tok, RECORDS)
    args = short_args(tmp_path, model, sft=sft)
    assert args.bf16 and args.optim == "adamw_8bit"
    trainer = FastModel.get_trainer(model, tok, RECORDS, args=args, sft=sft)
    trainer.train()
    assert eight_bit_state(trainer.optimizer)
    assert dataset_loss(model, tok, RECORDS) < before - 0.1
    assert checkpointing_state(model)["enabled"]
    assert offloads(model)  # the engine's CUDA lever survived the trainer


@pytest.fixture(scope="module")
def trained(llama, tmp_path_factory):
    model, tok = FastModel.from_pretrained(llama, max_seq_length=64, store=False)
    opt = FastModel.get_optimizer(model, lr=1e-2)
    ids = tok(["the quick brown fox jumps over the lazy dog"] * 2, return_tensors="pt").input_ids.cuda()
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    root = tmp_path_factory.mktemp("gpusaves")
    return model, tok, ids, root


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel(a, b) -> float:
    return float((a - b).norm() / a.norm())


def test_adapter_round_trip_on_the_gpu_gives_the_same_logits_and_trains_on(trained):
    model, tok, ids, root = trained
    want = logits(model, ids)
    adapter = FastModel.save_adapter(model, root / "adapter", tokenizer=tok)
    again, _ = FastModel.from_pretrained(adapter, max_seq_length=64, store=False)
    assert on_cuda_in_bf16(again)
    assert rel(want, logits(again, ids)) < 1e-3  # same weights, same kernels: round-off of the adapter's fp32 copy
    assert any(p.requires_grad for n, p in again.named_parameters() if "lora_" in n)
    again.train()
    loss = again(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in again.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("source", ["16bit", "dequantized"])
def test_merged_model_loads_in_plain_transformers_and_matches(trained, source):
    from transformers import AutoModelForCausalLM

    model, tok, ids, root = trained
    want = logits(model, ids)
    out = FastModel.save_merged(model, root / f"merged-{source}", tokenizer=tok, source=source)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map={"": 0})
    got = logits(plain, ids)
    # 16bit: the 4-bit model vs its exact source weights (NF4 round-off); dequantized: the same weights, bf16 kernels
    assert rel(want, got) < (0.15 if source == "16bit" else 2e-2), rel(want, got)
    model.train()


def test_requantized_merge_loads_prequantized_on_the_gpu(trained):
    model, tok, ids, root = trained
    out = FastModel.save_merged(model, root / "merged4", tokenizer=tok, source="dequantized", quantize=True)
    loaded, _ = FastModel.from_pretrained(out, max_seq_length=64, lora=None, store=False)
    assert loaded.fastload.plan.prequantized
    assert loaded.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    # re-quantizing merged weights adds NF4 round-off of the deltas on top
    assert rel(logits(model, ids), logits(loaded, ids)) < 0.15
    model.train()


def test_batched_generation_on_the_gpu_pads_left_and_returns_to_training(llama):
    model, tok = FastModel.from_pretrained(llama, max_seq_length=64, dtype=torch.float32, store=False)
    prompts = ["hello world", "a stitch in time saves nine, they say"]
    together = FastModel.generate(model, tok, prompts, max_new_tokens=6)
    alone = [FastModel.generate(model, tok, p, max_new_tokens=6) for p in prompts]
    assert together == alone  # fp32 compute: padding on the left changes nothing the model attends to
    FastModel.for_inference(model)
    assert not model.training and model.config.use_cache
    FastModel.for_training(model)
    assert model.training and checkpointing_state(model)["enabled"]
    assert offloads(model)
    ids = tok(prompts[1], return_tensors="pt").input_ids.cuda()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
