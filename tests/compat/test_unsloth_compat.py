"""The Unsloth surface (fastload.compat): names, keyword names and return shapes an Unsloth notebook relies on,
on the tiny Llama; the notebooks themselves run in test_unsloth_notebooks.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from fastload import FastLanguageModel, FastModel, is_bfloat16_supported
from fastload.chat_templates import (
    get_chat_template,
    standardize_sharegpt,
    train_on_responses_only,
)
from fastload.errors import AdapterError, BackendUnavailable, InvalidOption, SaveError
from fastload.train.checkpointing import CheckpointingGuard
from tiny import make_tokenizer, nonzero_lora_b

UNSLOTH_PEFT = {"r": 16,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "lora_alpha": 16, "lora_dropout": 0, "bias": "none", "use_gradient_checkpointing": "unsloth",
                "random_state": 3407, "use_rslora": False, "loftq_config": None}
SAVE_METHODS = ("save_pretrained_merged", "save_pretrained_gguf", "push_to_hub_merged", "push_to_hub_gguf")


@pytest.fixture(autouse=True)
def restore_trl():
    """The Unsloth surface swaps trl.SFTTrainer / SFTConfig for its subclasses: put TRL's back after each test."""
    trl = pytest.importorskip("trl")
    before = trl.SFTTrainer, trl.SFTConfig
    yield
    trl.SFTTrainer, trl.SFTConfig = before


@pytest.fixture
def peft_model(tiny_llama):
    model, tok = FastLanguageModel.from_pretrained(model_name=str(tiny_llama), max_seq_length=128, dtype=None,
                                                   load_in_4bit=True, full_finetuning=False, token=None)
    return FastLanguageModel.get_peft_model(model, **UNSLOTH_PEFT, max_seq_length=96), tok


def test_from_pretrained_returns_no_adapters_and_get_peft_model_adds_them(tiny_llama):
    model, _ = FastLanguageModel.from_pretrained(model_name=str(tiny_llama), max_seq_length=128,
                                                 fast_inference=False, fix_tokenizer=True)
    assert not getattr(model, "peft_config", None)
    assert not any(p.requires_grad for p in model.parameters())
    model = FastLanguageModel.get_peft_model(model, **UNSLOTH_PEFT, max_seq_length=96)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    config = model.peft_config["default"]
    wanted = sorted(UNSLOTH_PEFT["target_modules"])
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (16, 16, wanted)
    assert model.get_base_model().is_gradient_checkpointing and model.max_seq_length == 96


def test_save_methods_are_bound_to_the_instance_not_the_class(peft_model):
    model, _ = peft_model
    for name in SAVE_METHODS:
        assert name in vars(model) and getattr(model, name).__self__ is model
        assert not hasattr(type(model), name) and not hasattr(type(model.get_base_model()), name)


def test_use_gradient_checkpointing_false_turns_it_off(tiny_llama):
    model, _ = FastLanguageModel.from_pretrained(model_name=str(tiny_llama), max_seq_length=128)
    model = FastLanguageModel.get_peft_model(model, **{**UNSLOTH_PEFT, "use_gradient_checkpointing": False})
    assert not model.get_base_model().is_gradient_checkpointing


def test_fastmodel_takes_unsloth_load_names(tiny_llama):
    model, _ = FastModel.from_pretrained(model_name=str(tiny_llama), max_seq_length=128, full_finetuning=False,
                                         use_gradient_checkpointing=False, load_in_8bit=False)
    assert model.peft_config  # FastModel keeps its one-call default
    assert not model.get_base_model().is_gradient_checkpointing
    import trl

    assert trl.SFTTrainer.__module__ == "fastload.compat.trl_compat"  # the notebook's SFTTrainer cell will run
    with pytest.raises(InvalidOption, match="full_finetuning"):
        FastModel.from_pretrained(str(tiny_llama), full_finetuning=True)


def test_fastmodel_get_peft_model_replaces_the_untrained_default_adapter(tiny_llama):
    model, _ = FastModel.from_pretrained(str(tiny_llama), max_seq_length=128)
    model = FastModel.get_peft_model(model, **{**UNSLOTH_PEFT, "r": 32, "lora_alpha": 32})
    assert model.peft_config["default"].r == 32 and list(model.peft_config) == ["default"]
    shapes = {p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert shapes == {32}  # no rank-16 layer of the old adapter left
    assert "save_pretrained_merged" in vars(model) and model.fastload.plan is not None


def test_fastmodel_get_peft_model_keeps_a_trained_adapter(tiny_llama):
    model, _ = FastModel.from_pretrained(str(tiny_llama), max_seq_length=128)
    nonzero_lora_b(model)  # as after training
    with pytest.raises(AdapterError, match="already has adapters"):
        FastModel.get_peft_model(model, **{**UNSLOTH_PEFT, "r": 32})


def test_loftq_config_is_refused_not_ignored(tiny_llama):
    model, _ = FastLanguageModel.from_pretrained(model_name=str(tiny_llama), max_seq_length=128)
    with pytest.raises(InvalidOption, match="loftq_config"):
        FastLanguageModel.get_peft_model(model, **{**UNSLOTH_PEFT, "loftq_config": {"loftq_bits": 4}})


def test_is_bfloat16_supported_says_what_the_device_computes():
    from fastload.load.devices import choose_compute_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert is_bfloat16_supported() is (choose_compute_dtype(device) == torch.bfloat16)


def test_save_pretrained_merged_writes_each_save_method(peft_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = peft_model
    nonzero_lora_b(model)
    model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 16
    model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] in ("bfloat16", "float16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.num_hidden_layers == 2 and (tmp_path / "merged" / "tokenizer_config.json").is_file()
    with pytest.raises(InvalidOption, match="save_method"):
        model.save_pretrained_merged(tmp_path / "bad", tok, save_method="merged_2bit")
    assert not (tmp_path / "bad").exists()


def test_save_pretrained_gguf_uses_the_gguf_writer_or_says_it_is_missing(peft_model, tmp_path):
    import importlib.util

    model, tok = peft_model
    if importlib.util.find_spec("fastload.export") and importlib.util.find_spec("fastload.export.gguf"):
        model.save_pretrained_gguf(tmp_path / "gguf", tok, quantization_method="f16")
        assert list((tmp_path / "gguf").glob("*.gguf"))
        return
    with pytest.raises(BackendUnavailable, match="fastload.export.gguf"):
        model.save_pretrained_gguf(tmp_path / "gguf", tok, quantization_method="q8_0")
    assert not (tmp_path / "gguf").exists()


def test_push_to_hub_merged_builds_then_fails_cleanly_offline_without_showing_the_token(peft_model, caplog):
    model, tok = peft_model
    token = "hf_SECRETsecretSECRET1234"
    before = set(Path(tempfile.gettempdir()).glob("fastload-push-*"))
    with caplog.at_level("INFO", logger="fastload"), pytest.raises(SaveError, match="me/finetune") as err:
        model.push_to_hub_merged("me/finetune", tok, save_method="lora", token=token)  # the tests allow no network
    assert "saved the LoRA adapter" in caplog.text  # the folder was built before the upload was tried
    assert token not in str(err.value) and token not in caplog.text
    assert set(Path(tempfile.gettempdir()).glob("fastload-push-*")) == before


# -- chat templates -----------------------------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "QUESTION"},
                {"role": "assistant", "content": "ANSWER"}]


@pytest.mark.parametrize("name", ["chatml", "llama-3", "llama-3.1", "zephyr", "alpaca", "mistral", "gemma", "phi-3",
                                  "qwen-2.5"])
def test_each_template_renders_the_turns_in_order_and_opens_the_answer(name):
    tok = get_chat_template(make_tokenizer(), chat_template=name)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.index("SYS") < text.index("QUESTION") < text.index("ANSWER")
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and "ANSWER" not in prompt


def test_sharegpt_mapping_and_standardize_sharegpt_give_the_same_text():
    sharegpt = [{"from": "human", "value": "QUESTION"}, {"from": "gpt", "value": "ANSWER"}]
    mapped = get_chat_template(make_tokenizer(), "chatml",
                               mapping={"role": "from", "content": "value", "user": "human", "assistant": "gpt"})
    plain = get_chat_template(make_tokenizer(), "chatml")
    standard = standardize_sharegpt([{"conversations": sharegpt}])[0]["conversations"]
    assert standard == [{"role": "user", "content": "QUESTION"}, {"role": "assistant", "content": "ANSWER"}]
    assert mapped.apply_chat_template(sharegpt, tokenize=False) == plain.apply_chat_template(standard, tokenize=False)


def test_unknown_template_name_suggests_close_ones():
    with pytest.raises(InvalidOption, match="llama-3"):
        get_chat_template(make_tokenizer(), chat_template="llama3.9")


def test_map_eos_token_ends_generation_at_the_end_of_turn():
    tok = make_tokenizer()
    tok.eos_token = "<|endoftext|>"
    assert get_chat_template(tok, "chatml").eos_token == "<|im_end|>"


# -- trainers -----------------------------------------------------------------------------------------------------

RECORDS = [{"conversations": [{"from": "human", "value": "hello world"}, {"from": "gpt", "value": "the quick fox"},
                              {"from": "human", "value": "how are you"}, {"from": "gpt", "value": "a stitch"}]}] * 4


def unsloth_trainer(model, tok, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = get_chat_template(tok, "chatml")
    data = standardize_sharegpt(Dataset.from_list(RECORDS))
    data = data.map(lambda b: {"text": [tok.apply_chat_template(c, tokenize=False) for c in b["conversations"]]},
                    batched=True)
    return SFTTrainer(model=model, tokenizer=tok, train_dataset=data, dataset_text_field="text", max_seq_length=96,
                      packing=False, args=SFTConfig(per_device_train_batch_size=2, max_steps=1, optim="adamw_8bit",
                                                    output_dir=str(tmp_path / "out"), report_to="none"))


def test_sft_trainer_takes_unsloths_keywords_and_fastloads_parts(peft_model, tmp_path):
    model, tok = peft_model
    trainer = unsloth_trainer(model, tok, tmp_path)
    assert trainer.processing_class is tok and trainer.args.max_length == 96
    assert trainer.args.dataset_text_field == "text" and not trainer.args.fp16
    assert trainer.args.bf16 is is_bfloat16_supported()  # TRL alone would ask bf16 and fail on a CPU without it
    assert any(isinstance(c, CheckpointingGuard) for c in trainer.callback_handler.callbacks)
    assert type(trainer.optimizer).__module__.startswith("fastload")  # fastload's AdamW8bit
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_train_on_responses_only_keeps_exactly_the_answers(peft_model, tmp_path):
    model, tok = peft_model
    trainer = train_on_responses_only(unsloth_trainer(model, tok, tmp_path))
    example = trainer.train_dataset[0]
    kept = tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    assert "the quick fox" in kept and "a stitch" in kept
    assert "hello world" not in kept and "how are you" not in kept and "user" not in kept
    explicit = train_on_responses_only(unsloth_trainer(model, tok, tmp_path), instruction_part="<|im_start|>user\n",
                                       response_part="<|im_start|>assistant\n")
    assert explicit.train_dataset[0]["labels"] == example["labels"]
    trainer.train()  # the relabelled data trains


@pytest.mark.parametrize("sft", [False, True])
def test_get_trainer_routes_training_argument_fields_into_args(tiny_llama, sft):
    """The README's `FastModel.get_trainer(model, tok, records, sft=True, max_steps=100)` (crashed before)."""
    model, tok = FastModel.from_pretrained(str(tiny_llama), max_seq_length=128)
    records = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}] * 2
    trainer = FastModel.get_trainer(model, tok, records, sft=sft, max_steps=100, learning_rate=1e-3,
                                    per_device_train_batch_size=1)
    assert (trainer.args.max_steps, trainer.args.learning_rate, trainer.args.per_device_train_batch_size) == \
        (100, 1e-3, 1)
    given = FastModel.training_arguments("outputs", sft=sft, model=model, max_steps=5)
    assert FastModel.get_trainer(model, tok, records, args=given, sft=sft, max_steps=7).args.max_steps == 7
