"""Continued pretraining on the real SmolLM2 (4-bit): raw text packed into rows, the loss falls, the embeddings
train in their own optimizer group at their own rate, and a new token survives save and reload."""

from __future__ import annotations

import warnings

import pytest

from fastload import FastModel
from fastload.errors import InvalidOption
from fastload.train.methods import pretrain

DOC = ("The fastload library loads <|fl|> models in four bits, adds LoRA adapters and trains them with 8-bit AdamW. "
       "Continued pretraining teaches a model the words of a new domain. ")


def test_pretrain_trains_embeddings_at_their_own_rate_and_new_tokens_reload(smollm2_dir, tmp_path):
    model, tok = FastModel.from_pretrained(smollm2_dir, max_seq_length=64)
    text = tmp_path / "domain.txt"
    text.write_text(DOC * 6)
    old_rows = model.get_input_embeddings().weight.shape[0]
    mean = model.get_input_embeddings().weight[:old_rows].float().mean(0)
    trainer = pretrain.build(model, tok, text, train_embeddings=True, embedding_learning_rate=5e-5,
                             new_tokens=["<|fl|>"], output_dir=tmp_path / "out", max_steps=8, learning_rate=2e-3,
                             per_device_train_batch_size=2, gradient_accumulation_steps=1, save_strategy="no")
    new = tok.convert_tokens_to_ids("<|fl|>")
    assert new >= old_rows - 1 and tok.tokenize("a <|fl|> b").count("<|fl|>") == 1
    embedding = model.get_input_embeddings().weight
    assert (embedding[new].float() - mean).abs().max().item() < 1e-3  # started at the mean embedding

    groups = trainer.optimizer.param_groups
    assert type(trainer.optimizer).__name__ == "AdamW8bitNoSync"
    embedding_groups = [g for g in groups if any(p is embedding for p in g["params"])]
    assert len(embedding_groups) == 1 and embedding_groups[0]["lr"] == 5e-5
    assert all(g["lr"] == 2e-3 for g in groups if g is not embedding_groups[0])
    assert model.get_output_embeddings().weight is embedding  # SmolLM2 ties them: one trained matrix

    rows = trainer.train_dataset
    assert all(len(r["input_ids"]) <= 64 for r in rows) and sum(len(r["input_ids"]) > 48 for r in rows) >= 2

    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses
    trained_row = embedding[new].detach().float().clone()
    assert (trained_row - mean).abs().max().item() > 1e-4  # the new token's row learned

    FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as saved:
        whole = sorted(k for k in saved.keys() if "lora_" not in k)
    # the trained matrix once per name, not beside the original and a second copy (peft's save_embedding_layers)
    assert whole == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"], whole
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again, tok2 = FastModel.from_pretrained(tmp_path / "adapter", max_seq_length=64)
    assert not [w for w in caught if "unexpected" in str(w.message).lower()], [str(w.message) for w in caught]
    assert tok2.convert_tokens_to_ids("<|fl|>") == new
    assert (again.get_input_embeddings().weight[new].float() - trained_row).abs().max().item() < 1e-5
    # still one trained matrix: training on from the saved adapter moves the head with the embedding
    assert again.get_output_embeddings().weight is again.get_input_embeddings().weight

    # merged into the 16-bit original: a checkpoint plain transformers loads, the new token's row the trained one
    import torch
    from transformers import AutoModelForCausalLM

    merged = FastModel.save_merged(again, tmp_path / "merged", tokenizer=tok2)
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert plain.config.vocab_size == plain.get_input_embeddings().weight.shape[0] == new + 1
    assert torch.allclose(plain.get_input_embeddings().weight[new], trained_row, rtol=1e-2, atol=1e-3)


def test_pretrain_reads_records_and_refuses_a_lone_embedding_rate(smollm2_dir, tmp_path):
    model, tok = FastModel.from_pretrained(smollm2_dir, max_seq_length=32)
    assert pretrain.read_texts([{"text": "one"}, {"text": "  "}, "two"]) == ["one", "two"]
    with pytest.raises(InvalidOption, match="text"):
        pretrain.read_texts([{"body": "no text field"}])
    with pytest.raises(InvalidOption, match="train_embeddings"):
        pretrain.build(model, tok, ["some text"], embedding_learning_rate=1e-5, output_dir=tmp_path, max_steps=1)


@pytest.mark.parametrize("family", ["qwen3_moe", "mistral"])
def test_trained_embeddings_meet_16bit_layers_outside_autocast_and_after_reload(family, tmp_path):
    """In bf16, the fp32 trained copies of the embedding and the head must not hand fp32 rows to 16-bit layers
    (an MoE router's linear has no cast: generation raised) nor take 16-bit hidden states into the fp32 head; the
    same after the adapter is reloaded, with every trained value as trained (peft loads the copies into the 16-bit
    original's dtype: they came back rounded) and the logits of the trained model within bf16 round-off (its
    forward stays under the Trainer's autocast)."""
    import torch
    from family_shapes import make_family_checkpoint

    checkpoint = make_family_checkpoint(tmp_path / "base", family)
    model, tok = FastModel.from_pretrained(checkpoint, dtype=torch.bfloat16, max_seq_length=64, store=False)
    trainer = pretrain.build(model, tok, [DOC] * 4, train_embeddings=True, output_dir=tmp_path / "out", max_steps=1,
                             per_device_train_batch_size=2, gradient_accumulation_steps=1, save_strategy="no")
    trainer.train()
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # no autocast here, as in generation
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert FastModel.generate(model, tok, "hello", max_new_tokens=3) is not None
    FastModel.save_adapter(model, tmp_path / "adapter", tokenizer=tok)
    again, _ = FastModel.from_pretrained(tmp_path / "adapter", dtype=torch.bfloat16, max_seq_length=64, store=False)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reloaded = {n: p for n, p in again.named_parameters() if p.requires_grad}
    assert set(reloaded) == set(trained) and any(".modules_to_save." in n for n in trained)
    assert all(reloaded[n].dtype == torch.float32 and torch.equal(reloaded[n], trained[n]) for n in trained)
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, logits, atol=2e-2, rtol=2e-2)
