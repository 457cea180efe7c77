"""Trainers around the loaded model: fastload's defaults, 8-bit AdamW unless the user chose, gradient checkpointing
that survives the trainer's own settings, SFT through TRL, and generation from the trained model."""

from __future__ import annotations

import sys

import pytest

from fastload import FastModel
from fastload.errors import BackendUnavailable, InvalidOption
from fastload.train.checkpointing import checkpointing_state, ensure_checkpointing

RECORDS = [{"messages": [{"role": "user", "content": "hello world"},
                         {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog"}]},
           {"instruction": "a stitch in time", "input": "", "output": "saves nine"},
           {"prompt": "how are you today?", "response": "fastload loads models for QLoRA fine-tuning"}] * 2


@pytest.fixture
def tiny(tiny_llama):
    return FastModel.from_pretrained(tiny_llama, max_seq_length=48)


def short_args(tmp_path, model, sft=False, **kw):
    """fastload's defaults with a run short enough for CPU tests."""
    options = dict(max_steps=4, per_device_train_batch_size=6, gradient_accumulation_steps=1, save_strategy="no",
                   disable_tqdm=True, learning_rate=5e-3)
    options.update(kw)
    return FastModel.training_arguments(tmp_path / "out", sft=sft, model=model, **options)


def dataset_loss(model, tokenizer, records) -> float:
    """Mean loss over the records' answers, in eval mode: what 'the model learned' means to a user."""
    import torch

    from fastload.data import Collator, prepare_records

    batch = Collator(tokenizer)(prepare_records(records, tokenizer, 48))
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train(was_training)
    return loss


def lora_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def eight_bit_state(optimizer) -> bool:
    """bitsandbytes keeps Adam's moments as uint8 for the LoRA matrices (the point of AdamW8bit)."""
    import bitsandbytes as bnb
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    dtypes = {v.dtype for s in inner.state.values() for k, v in s.items()
              if k.startswith("state") and torch.is_tensor(v)}
    return isinstance(inner, bnb.optim.optimizer.Optimizer8bit) and torch.uint8 in dtypes


# -- arguments ----------------------------------------------------------------------------------------------------

def test_training_arguments_carry_fastload_defaults(tiny, tmp_path):
    model, _ = tiny
    args = FastModel.training_arguments(tmp_path, model=model)
    assert str(getattr(args.optim, "value", args.optim)) == "adamw_8bit"
    assert args.learning_rate == 2e-4
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.report_to == []
    # the model's compute dtype decides: bf16 for a bf16 model on the CPU (which transformers allows only with
    # use_cpu=True), else fp32 and no emulated autocast; never fp16 on a CPU
    native_bf16 = str(model.dtype) == "torch.bfloat16"
    assert args.bf16 == native_bf16 and not args.fp16 and args.use_cpu == native_bf16
    sft = FastModel.training_arguments(tmp_path, sft=True, model=model, learning_rate=1e-4)
    assert type(sft).__name__ == "SFTConfig" and sft.max_length == 48 and sft.learning_rate == 1e-4
    assert sft.bf16 == native_bf16  # SFTConfig alone would turn bf16 on whatever the CPU
    with pytest.raises(InvalidOption, match="max_lenght"):
        FastModel.training_arguments(tmp_path, max_lenght=10)


@pytest.mark.parametrize("sft, compat", [(False, False), (True, False), (True, True)],
                         ids=["trainer", "sft", "sft-unsloth-compat"])
def test_a_keyword_no_trainer_takes_is_fastloads_error_naming_where_it_belongs(tiny_llama, tmp_path, monkeypatch,
                                                                               sft, compat):
    """get_trainer(..., train_embeddings=True) for SFT reached Trainer.__init__ as a raw TypeError; a typo the
    same. Both are refused before anything is built, the pretraining options pointed to method='pretrain' — also
    with trl.SFTTrainer replaced by fastload's Unsloth-compatible one, whose **kwargs pass everything on."""
    if sft:
        import trl

        from fastload.compat import trl_compat

        monkeypatch.setattr(trl, "SFTTrainer", trl_compat.SFTTrainer if compat else trl_compat.TrlSFTTrainer)
    model, tok = FastModel.from_pretrained(tiny_llama, store=False, max_seq_length=48)
    records = [{"prompt": "hi", "response": "hello"}] * 2
    with pytest.raises(InvalidOption, match="method='pretrain'"):
        FastModel.get_trainer(model, tok, records, sft=sft, output_dir=str(tmp_path), train_embeddings=True)
    with pytest.raises(InvalidOption, match="callbaks"):
        FastModel.get_trainer(model, tok, records, sft=sft, output_dir=str(tmp_path), callbaks=[])


def test_bf16_on_the_cpu_loads_bf16_and_trains_with_bf16_arguments(tiny_llama, tmp_path, monkeypatch):
    """FASTLOAD_CPU_BF16=1 (the choice a CPU with AMX or AVX512-BF16 makes when it is unset): bf16 compute, and
    training arguments transformers accepts on a CPU for it (bf16 with use_cpu)."""
    import torch

    monkeypatch.setenv("FASTLOAD_CPU_BF16", "1")
    model, _ = FastModel.from_pretrained(tiny_llama)
    assert model.dtype == torch.bfloat16
    args = FastModel.training_arguments(tmp_path, model=model)
    assert args.bf16 and args.use_cpu and not args.fp16
    monkeypatch.setenv("FASTLOAD_CPU_BF16", "0")
    model, _ = FastModel.from_pretrained(tiny_llama)
    assert model.dtype == torch.float32 and not FastModel.training_arguments(tmp_path, model=model).bf16


def test_sft_without_trl_is_a_clear_error(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setitem(sys.modules, "trl", None)  # what `import trl` meets when it is not installed
    with pytest.raises(BackendUnavailable, match=r"fastload\[trl\]"):
        FastModel.get_trainer(model, tok, RECORDS, sft=True)


# -- the optimizer ------------------------------------------------------------------------------------------------

def test_default_optim_becomes_adamw8bit_but_a_chosen_one_is_kept(tiny, tmp_path):
    import bitsandbytes as bnb
    from transformers import TrainingArguments

    model, tok = tiny
    plain = TrainingArguments(tmp_path / "a", report_to="none", max_steps=1)  # optim left at transformers' default
    trainer = FastModel.get_trainer(model, tok, RECORDS, args=plain)
    assert isinstance(trainer.optimizer, bnb.optim.AdamW8bit)
    # fastload's own defaults (optim="adamw_8bit") get the same lean AdamW8bit, not transformers' stock one
    trainer = FastModel.get_trainer(model, tok, RECORDS, args=FastModel.training_arguments(tmp_path / "c", max_steps=1))
    assert type(trainer.optimizer).__name__ == "AdamW8bitNoSync"
    assert trainer.optimizer.param_groups[0]["lr"] == trainer.args.learning_rate
    chosen = TrainingArguments(tmp_path / "b", report_to="none", max_steps=1, optim="adamw_torch")
    trainer = FastModel.get_trainer(model, tok, RECORDS, args=chosen)
    trainer.create_optimizer()
    assert type(trainer.optimizer).__module__.startswith("torch.optim")


def test_trainer_learns_with_8bit_adamw(tiny, tmp_path):
    model, tok = tiny
    before = dataset_loss(model, tok, RECORDS)
    trainer = FastModel.get_trainer(model, tok, RECORDS, args=short_args(tmp_path, model))
    trainer.train()
    assert eight_bit_state(trainer.optimizer)
    assert dataset_loss(model, tok, RECORDS) < before - 0.1
    state = checkpointing_state(model)
    assert state == {"enabled": True, "use_reentrant": False, "input_grads": True}


# -- gradient checkpointing ---------------------------------------------------------------------------------------

def _lora_grads(model, tok):

    from fastload.data import Collator, prepare_records

    model.train()
    model.zero_grad()
    batch = Collator(tok)(prepare_records(RECORDS[:2], tok, 48))
    model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    return sum(float(g.abs().sum()) for g in grads if g is not None)


def test_guard_restores_the_models_checkpointing_after_a_trainer_replaced_it(tiny):
    """A trainer that re-enables checkpointing its own way (reentrant, input-grad hooks removed) must not change
    what the model trains: the guard puts the model's non-reentrant functions back and LoRA gets the same grads."""
    from fastload.train.checkpointing import checkpoint_functions

    model, tok = tiny
    expected = _lora_grads(model, tok)
    saved = checkpoint_functions(model)
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})  # an old trainer's way
    base.disable_input_require_grads()
    assert checkpointing_state(model)["use_reentrant"] is True
    assert ensure_checkpointing(model, saved)
    assert checkpointing_state(model) == {"enabled": True, "use_reentrant": False, "input_grads": True}
    assert checkpoint_functions(model) == saved
    assert expected > 0 and abs(_lora_grads(model, tok) - expected) <= 1e-4 * expected


def test_checkpointing_survives_a_trainer_that_turns_it_off_in_args(tiny, tmp_path):
    model, tok = tiny
    before = lora_snapshot(model)
    trainer = FastModel.get_trainer(model, tok, RECORDS, args=short_args(tmp_path, model, gradient_checkpointing=False))
    trainer.train()
    after = lora_snapshot(model)
    assert any((after[n] - before[n]).abs().max() > 0 for n in before)  # training did happen
    assert checkpointing_state(model) == {"enabled": True, "use_reentrant": False, "input_grads": True}


def test_model_loaded_without_checkpointing_gets_it_from_the_trainer(tiny_llama, tmp_path):
    model, tok = FastModel.from_pretrained(tiny_llama, max_seq_length=48, gradient_checkpointing=False)
    assert not checkpointing_state(model)["enabled"]
    trainer = FastModel.get_trainer(model, tok, RECORDS, args=short_args(tmp_path, model, max_steps=1))
    trainer.train()
    assert checkpointing_state(model) == {"enabled": True, "use_reentrant": False, "input_grads": True}
    assert _lora_grads(model, tok) > 0


def test_a_trainer_built_by_hand_keeps_working_checkpointing(tiny, tmp_path):
    """The documented manual route: transformers' Trainer with optim='adamw_8bit'."""
    from transformers import Trainer, TrainingArguments

    from fastload.data import Collator, prepare_records

    model, tok = tiny
    args = TrainingArguments(tmp_path / "o", optim="adamw_8bit", gradient_checkpointing=True, max_steps=3,
                             per_device_train_batch_size=6, learning_rate=5e-3, report_to="none", disable_tqdm=True)
    before = dataset_loss(model, tok, RECORDS)
    trainer = Trainer(model=model, args=args, train_dataset=prepare_records(RECORDS, tok, 48),
                      data_collator=Collator(tok))
    trainer.train()
    assert checkpointing_state(model) == {"enabled": True, "use_reentrant": False, "input_grads": True}
    assert eight_bit_state(trainer.optimizer)
    assert dataset_loss(model, tok, RECORDS) < before


def test_get_trainer_brings_a_model_back_from_generation_mode(tiny, tmp_path):
    model, tok = tiny
    FastModel.for_inference(model)
    assert not checkpointing_state(model)["enabled"] and not model.training
    FastModel.get_trainer(model, tok, RECORDS, args=short_args(tmp_path, model))
    assert model.training and not model.get_base_model().config.use_cache
    assert checkpointing_state(model) == {"enabled": True, "use_reentrant": False, "input_grads": True}


# -- SFT ----------------------------------------------------------------------------------------------------------

def test_sft_trainer_takes_records_responses_only(tiny, tmp_path):
    model, tok = tiny
    args = short_args(tmp_path, model, sft=True)
    trainer = FastModel.get_trainer(model, tok, RECORDS, args=args, sft=True)
    assert trainer.args.max_length == 48
    row = trainer.train_dataset[0]
    answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tok.decode(answer) == "the quick brown fox jumps over the lazy dog<|im_end|>"
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {__import__("torch").float32}
    before = dataset_loss(model, tok, RECORDS)
    trainer.train()
    assert eight_bit_state(trainer.optimizer)
    assert dataset_loss(model, tok, RECORDS) < before - 0.1


def test_trained_embeddings_get_fastloads_optimizer_with_32bit_embedding_state(tiny_llama, tmp_path):
    """A trained embedding keeps what transformers' adamw_8bit gives it (32-bit Adam state: 8-bit state is unstable
    for embeddings) while the LoRA matrices keep 8-bit state, in fastload's lean optimizer."""
    import torch

    from fastload.train.adamw8bit import AdamW8bitNoSync

    model, tok = FastModel.from_pretrained(tiny_llama, max_seq_length=48)
    embedding = model.get_input_embeddings()
    embedding.weight.requires_grad_(True)
    trainer = FastModel.get_trainer(model, tok, RECORDS, args=FastModel.training_arguments(tmp_path, max_steps=1))
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, AdamW8bitNoSync)
    assert optimizer.state[embedding.weight]["state1"].dtype == torch.float32
    assert eight_bit_state(trainer.optimizer)


def test_sft_default_max_length_becomes_max_seq_length(tiny, tmp_path):
    from trl import SFTConfig

    model, tok = tiny
    args = SFTConfig(tmp_path / "o", report_to="none", bf16=False)
    trainer = FastModel.get_trainer(model, tok, RECORDS, args=args, sft=True)
    assert trainer.args.max_length == 48
    assert str(getattr(trainer.args.optim, "value", trainer.args.optim)) != "adamw_8bit"  # user's args untouched...
    import bitsandbytes as bnb

    assert isinstance(trainer.optimizer, bnb.optim.AdamW8bit)  # ...but the optimizer is fastload's default


@pytest.mark.parametrize("sft", [False, True])
def test_packed_rows_reach_the_model_with_position_ids(tiny, tmp_path, sft):
    from fastload.data import pack, prepare_records

    model, tok = tiny
    rows = pack(prepare_records(RECORDS, tok, 48), 48)
    trainer = FastModel.get_trainer(model, tok, rows, args=short_args(tmp_path, model, sft=sft, max_steps=1), sft=sft)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch
    assert (batch["position_ids"] == 0).sum() > batch["position_ids"].shape[0]  # several sequences per row
    trainer.train()


@pytest.mark.slow
def test_sft_on_smollm2_lowers_the_loss_with_adamw8bit(smollm2_dir, tmp_path):
    """The real SmolLM2-135M (NF4 + LoRA), SFTTrainer through get_trainer, 5 steps on a handful of examples."""
    model, tok = FastModel.from_pretrained(smollm2_dir, max_seq_length=64)
    records = [{"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
               {"prompt": "Name a primary color.", "response": "Red is a primary color."},
               {"instruction": "Greet the user", "input": "", "output": "Hello! How can I help you today?"},
               {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "2+2 is 4."}]}]
    args = FastModel.training_arguments(tmp_path / "out", sft=True, model=model, max_steps=5,
                                        per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                        learning_rate=1e-3, save_strategy="no", disable_tqdm=True)
    trainer = FastModel.get_trainer(model, tok, records, args=args, sft=True)
    assert trainer.args.max_length == 64
    before = dataset_loss(model, tok, records)
    trainer.train()
    after = dataset_loss(model, tok, records)
    assert after < before - 0.2, (before, after)
    assert eight_bit_state(trainer.optimizer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and losses[-1] < losses[0]


# -- generation ---------------------------------------------------------------------------------------------------

def test_batched_generation_pads_left_and_matches_one_by_one(tiny):
    model, tok = tiny
    prompts = ["hello", "a stitch in time saves nine, the quick brown fox"]
    together = FastModel.generate(model, tok, prompts, max_new_tokens=6)
    alone = [FastModel.generate(model, tok, p, max_new_tokens=6) for p in prompts]
    assert together == alone and all(isinstance(t, str) and t for t in together)
    assert tok.padding_side == "right"  # training's padding side is back
    assert model.training  # it was training before the call, so it is again...
    assert checkpointing_state(model) == {"enabled": True, "use_reentrant": False, "input_grads": True}


def test_right_padding_would_have_changed_the_answer(tiny):
    """Why generate pads left: with right padding the short prompt continues after pad tokens."""
    import torch

    model, tok = tiny
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in ("hello", "a stitch in time saves nine, the quick brown fox")]
    FastModel.for_inference(model)
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)  # right: the training side
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    right = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    FastModel.for_training(model)
    assert right[0] != FastModel.generate(model, tok, "hello", max_new_tokens=6)
