"""get_trainer(method=...): preference tuning (DPO, ORPO, KTO, SimPO) and classification heads, with fastload's
defaults; the real SmolLM2 where the behaviour is the point, a tiny Llama where only the wiring is."""

from __future__ import annotations

import pytest

from fastload import FastModel
from fastload.errors import InvalidOption

PAIRS = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "London."},
         {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
         {"prompt": "Which colour is the sky?", "chosen": "Blue.", "rejected": "Green."},
         {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A hammer."}]
FAST = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "save_strategy": "no",
        "disable_tqdm": True, "logging_steps": 1}


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def assert_fastload_defaults(trainer, model) -> None:
    """fastload's AdamW8bit drives the steps and the model's non-reentrant checkpointing is still on."""
    from fastload.train.adamw8bit import AdamW8bitNoSync
    from fastload.train.checkpointing import checkpointing_state

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it once training
    assert isinstance(optimizer, AdamW8bitNoSync)
    state = checkpointing_state(model)
    assert state["enabled"] and state["use_reentrant"] is False and state["input_grads"]


# -- errors: the method and the records --------------------------------------------------------------------------

def test_an_unknown_method_names_the_accepted_ones(tiny_llama):
    model, tok = FastModel.from_pretrained(tiny_llama, store=False)
    with pytest.raises(InvalidOption) as e:
        FastModel.get_trainer(model, tok, PAIRS, method="ppo")
    assert "'ppo'" in e.value.asked and all(m in e.value.found for m in ("sft", "dpo", "orpo", "kto", "simpo",
                                                                        "classify"))


def test_a_pair_without_chosen_names_the_field_and_the_shapes(tiny_llama, tmp_path):
    model, tok = FastModel.from_pretrained(tiny_llama, store=False)
    with pytest.raises(InvalidOption) as e:
        FastModel.get_trainer(model, tok, [{"prompt": "Hi", "answer": "Hello", "rejected": "Go away"}],
                              method="dpo", output_dir=str(tmp_path))
    assert "'chosen'" in e.value.found and "prompt / chosen / rejected" in e.value.fix
    assert not any(tmp_path.iterdir())  # nothing written before the records were checked


def test_kto_record_without_label_is_refused(tiny_llama, tmp_path):
    model, tok = FastModel.from_pretrained(tiny_llama, store=False)
    with pytest.raises(InvalidOption) as e:
        FastModel.get_trainer(model, tok, [{"prompt": "Hi", "completion": "Hello"}], method="kto",
                              output_dir=str(tmp_path))
    assert "'label'" in e.value.found and "prompt / completion / label" in e.value.fix


def test_a_method_whose_module_is_absent_says_so():
    from fastload.train import methods

    methods.METHODS["future"] = "fastload.train.methods.not_written_yet:build"
    try:
        with pytest.raises(InvalidOption) as e:
            methods.builder_for("future")
        assert "not_written_yet" in e.value.found
    finally:
        del methods.METHODS["future"]


def test_sft_keyword_and_method_sft_build_todays_trainers(tiny_llama, tmp_path):
    from transformers import Trainer
    from trl import SFTTrainer

    model, tok = FastModel.from_pretrained(tiny_llama, store=False, max_seq_length=48)
    records = [{"prompt": "Hi", "response": "Hello there."}] * 2
    plain = FastModel.get_trainer(model, tok, records, output_dir=str(tmp_path), max_steps=1)
    assert isinstance(plain, Trainer) and not isinstance(plain, SFTTrainer)
    assert isinstance(FastModel.get_trainer(model, tok, records, sft=True, output_dir=str(tmp_path)), SFTTrainer)
    assert isinstance(FastModel.get_trainer(model, tok, records, method="sft", sft=True, output_dir=str(tmp_path)),
                      SFTTrainer)


# -- records: rendered with the chat template ---------------------------------------------------------------------

def test_pairs_of_every_shape_render_to_the_same_text(tiny_llama):
    from fastload.train.methods.preference import Renderer, pair_rows

    _, tok = FastModel.from_pretrained(tiny_llama, store=False, lora=None)
    user = [{"role": "user", "content": "What is 2+2?"}]
    shapes = [{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
              {"prompt": user, "chosen": [{"role": "assistant", "content": "4."}],
               "rejected": [{"from": "gpt", "value": "5."}]},
              {"chosen": user + [{"role": "assistant", "content": "4."}],
               "rejected": user + [{"role": "assistant", "content": "5."}]}]
    rows = pair_rows(shapes, Renderer(tok))
    assert rows[0] == rows[1] == rows[2]
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n") and "What is 2+2?" in rows[0]["prompt"]
    assert rows[0]["chosen"] == "4.<|im_end|>"  # the answer ends at its end-of-turn token: TRL adds no second EOS


# -- the reference model: the same 4-bit base, no copy -------------------------------------------------------------

def _parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_dpo_reference_is_the_base_with_the_adapter_off(tiny_llama, tmp_path):
    """No reference model object, no 'ref' adapter for a fresh adapter; the reference log-probs are the base's."""
    import torch

    model, tok = FastModel.from_pretrained(tiny_llama, store=False, max_seq_length=48)
    count = sum(1 for _ in model.modules())
    trainer = FastModel.get_trainer(model, tok, PAIRS, method="dpo", output_dir=str(tmp_path), max_steps=1, **FAST)
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]
    assert sum(1 for _ in model.modules()) == count  # nothing was added to the model
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[0]])
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(base, trained)  # the adapter trained, and disabling it gives the untouched base


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_the_reference_pass_leaves_the_models_checkpoint_functions_in_place(tiny_llama, tmp_path, method):
    """TRL switches checkpointing off around each reference pass and back on with the args' settings: the layers
    must come out of an evaluation (alone, or inside train()) and of every step with the functions the model trains
    with (fastload's single-use contexts here, the engine's offloading function on a GPU), not torch's plain one."""
    from fastload.train.checkpointing import _same_function, checkpoint_functions

    model, tok = FastModel.from_pretrained(tiny_llama, store=False, max_seq_length=48)
    before = checkpoint_functions(model)
    assert before and all(getattr(f, "keywords", {}).get("context_fn") for f in before.values())
    records = PAIRS if method == "dpo" else [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
                                             for p in PAIRS for key in ("chosen", "rejected")]
    trainer = FastModel.get_trainer(model, tok, records, method=method, output_dir=str(tmp_path), max_steps=2,
                                    eval_data=records, eval_strategy="steps", eval_steps=1, **FAST)
    for run in (trainer.evaluate, trainer.train):  # an evaluation alone (a baseline), then one after each step
        run()
        after = checkpoint_functions(model)
        assert set(after) == set(before)  # every layer still checkpointed
        assert all(_same_function(after[m], before[m]) for m in before), {str(f) for f in after.values()}


def test_dpo_on_a_trained_adapter_keeps_a_frozen_copy_of_its_start_as_reference(tiny_llama, tmp_path):
    from tiny import nonzero_lora_b

    model, tok = FastModel.from_pretrained(tiny_llama, store=False, max_seq_length=48)
    nonzero_lora_b(model)
    trainer = FastModel.get_trainer(model, tok, PAIRS, method="dpo", output_dir=str(tmp_path / "o"), max_steps=1,
                                    **FAST)
    assert "ref" in model.peft_config and trainer.ref_model is None
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)


# -- the real SmolLM2 ---------------------------------------------------------------------------------------------

def test_dpo_on_smollm2_widens_the_margin_with_fastload_defaults_and_reloads(smollm2_dir, tmp_path):
    """Two DPO steps on the real SmolLM2 (NF4 + LoRA): the chosen/rejected reward margin grows from 0, fastload's
    AdamW8bit and checkpointing drive it, and the saved adapter loads back with the same weights."""
    import torch

    model, tok = FastModel.from_pretrained(smollm2_dir, max_seq_length=48, store=False)
    trainer = FastModel.get_trainer(model, tok, PAIRS, method="dpo", output_dir=str(tmp_path / "out"), max_steps=2,
                                    learning_rate=5e-4, **FAST)
    trainer.train()
    margins = logged(trainer, "rewards/margins")
    assert margins[0] == 0.0 and margins[-1] > 0.05  # step 1 scores the untouched policy: equal to the reference
    assert_fastload_defaults(trainer, model)
    FastModel.save_adapter(model, tmp_path / "adapter", tok)
    again, _ = FastModel.from_pretrained(tmp_path / "adapter", store=False)
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    loaded = dict(again.named_parameters())
    assert trained and all(torch.equal(p.detach().float(), loaded[n].detach().float()) for n, p in trained.items())


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_reference_free_methods_on_smollm2_prefer_the_chosen_answer(smollm2_dir, tmp_path, method):
    model, tok = FastModel.from_pretrained(smollm2_dir, max_seq_length=48, store=False)
    trainer = FastModel.get_trainer(model, tok, PAIRS, method=method, output_dir=str(tmp_path), max_steps=3,
                                    learning_rate=5e-4, **FAST)
    trainer.train()
    if method == "simpo":
        margins = logged(trainer, "rewards/margins")
        assert margins[-1] > margins[0]
    else:  # ORPO's loss is mostly its SFT term at first: in 3 steps the loss falls and the chosen answer gains
        losses, chosen = logged(trainer, "loss"), logged(trainer, "rewards/chosen")  # (measured: the odds-ratio
        assert losses[-1] < losses[0] and chosen[-1] > chosen[0]                  # margin 0.090 -> 0.079)
    assert_fastload_defaults(trainer, model)


def test_kto_on_smollm2_separates_the_labels(smollm2_dir, tmp_path):
    model, tok = FastModel.from_pretrained(smollm2_dir, max_seq_length=48, store=False)
    trainer = FastModel.get_trainer(model, tok, PAIRS, method="kto", output_dir=str(tmp_path), max_steps=2,
                                    learning_rate=5e-4, **{**FAST, "per_device_train_batch_size": 8})
    trainer.train()
    losses = logged(trainer, "loss")
    assert losses[-1] < losses[0]
    assert_fastload_defaults(trainer, model)


# -- classification heads ------------------------------------------------------------------------------------------

SENTIMENT = [{"text": "I love this, it is wonderful and great.", "label": 1},
             {"text": "Great, wonderful, lovely day.", "label": 1},
             {"text": "I hate this, it is awful and bad.", "label": 0},
             {"text": "Awful, terrible, bad day.", "label": 0}]


def _classifier_loss(model, tok, records) -> tuple[float, float]:
    import torch
    from transformers import DataCollatorWithPadding

    from fastload.train.methods.classify import tokenize_records

    batch = DataCollatorWithPadding(tok)(tokenize_records(records, tok, model))
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    model.train()
    accuracy = (out.logits.argmax(-1) == batch["labels"]).float().mean().item()
    return out.loss.item(), accuracy


def test_classifier_on_smollm2_learns_a_separable_set_and_reloads(smollm2_dir, tmp_path):
    import torch

    model, tok = FastModel.from_pretrained(smollm2_dir, task="sequence-classification", num_labels=2,
                                           max_seq_length=32)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    assert head and all(p.dtype == torch.float32 for p in head)  # the head trains in full, in fp32
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)  # LoRA on the body
    before, _ = _classifier_loss(model, tok, SENTIMENT)
    trainer = FastModel.get_trainer(model, tok, SENTIMENT, method="classify", output_dir=str(tmp_path / "o"),
                                    max_steps=4, learning_rate=1e-3, **FAST)
    trainer.train()
    after, accuracy = _classifier_loss(model, tok, SENTIMENT)
    assert after < before and accuracy == 1.0
    assert_fastload_defaults(trainer, model)
    FastModel.save_adapter(model, tmp_path / "clf", tok)
    again, tok2 = FastModel.from_pretrained(tmp_path / "clf")  # task and num_labels come from the folder
    assert again.config.num_labels == 2
    assert _classifier_loss(again, tok2, SENTIMENT)[0] == pytest.approx(after, rel=1e-4)


def test_classification_task_needs_num_labels(tiny_llama):
    with pytest.raises(InvalidOption) as e:
        FastModel.from_pretrained(tiny_llama, task="sequence-classification")
    assert "num_labels" in e.value.found
    with pytest.raises(InvalidOption) as e:
        FastModel.from_pretrained(tiny_llama, task="token-classification", num_labels=2)
    assert "sequence-classification" in e.value.found


def test_classify_method_refuses_a_language_model(tiny_llama, tmp_path):
    model, tok = FastModel.from_pretrained(tiny_llama, store=False)
    with pytest.raises(InvalidOption) as e:
        FastModel.get_trainer(model, tok, SENTIMENT, method="classify", output_dir=str(tmp_path))
    assert "task='sequence-classification'" in e.value.fix


# -- on the GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_dpo_on_the_gpu_trains_in_bf16_against_the_base(tiny_llama, tmp_path):
    import torch

    model, tok = FastModel.from_pretrained(tiny_llama, max_seq_length=48, store=False)
    trainer = FastModel.get_trainer(model, tok, PAIRS * 4, method="dpo", output_dir=str(tmp_path), max_steps=6,
                                    learning_rate=1e-3, **FAST)
    assert trainer.args.bf16 == (torch.cuda.is_bf16_supported()) and trainer.ref_model is None
    allocated = torch.cuda.memory_allocated()
    trainer.train()
    margins = logged(trainer, "rewards/margins")
    assert margins[-1] > margins[0]
    assert_fastload_defaults(trainer, model)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert list(model.peft_config) == ["default"]
    assert torch.cuda.max_memory_allocated() < allocated + 2 * 2**30  # no second model copy on the device


# -- the command line -----------------------------------------------------------------------------------------------

def test_cli_trains_dpo_from_a_jsonl_of_pairs(tiny_llama, tmp_path, capsys):
    import json

    from fastload.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    code = main([str(a) for a in ("train", data, "--method", "dpo", "--model", tiny_llama, "--out", tmp_path / "run",
                                  "--steps", 2, "--batch", 4, "--grad-accum", 1, "--seq", 48, "--lr", "1e-3",
                                  "--json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    done = json.loads(out)
    assert done["method"] == "dpo" and done["steps"] == 2
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_cli_classify_needs_num_labels(tiny_llama, tmp_path, capsys):
    from fastload.cli import main

    data = tmp_path / "labels.jsonl"
    data.write_text('{"text": "good", "label": 1}\n')
    code = main([str(a) for a in ("train", data, "--method", "classify", "--model", tiny_llama, "--out",
                                  tmp_path / "run")])
    assert code != 0 and "--num-labels" in capsys.readouterr().err
