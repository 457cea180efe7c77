"""Data helpers: record shapes -> messages, dataset files, responses-only labels from the chat template itself,
packing that keeps sequences apart, and the padding collator."""

from __future__ import annotations

import json

import pytest

from fastload.data import (
    IGNORE_INDEX,
    Collator,
    load_records,
    pack,
    prepare_records,
    to_messages,
    tokenize_conversation,
)
from fastload.errors import InvalidOption
from tiny import make_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the quick brown fox"}, {"role": "user", "content": "how are you today?"},
        {"role": "assistant", "content": "a stitch in time saves nine"}]

# Real templates' shapes (abridged from the models' tokenizer_config.json), to show nothing is ChatML-specific.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}"
           "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "<|im_end|>"}


@pytest.fixture(scope="module")
def tokenizers():
    out = {"chatml": make_tokenizer()}
    for name, template, specials in (("llama3", LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
                                     ("gemma", GEMMA, ["<start_of_turn>", "<end_of_turn>"]),
                                     ("mistral", MISTRAL, [])):
        tok = make_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": specials})
        tok.chat_template = template
        out[name] = tok
    return out


def labelled_runs(tok, example) -> list[str]:
    """The text of each contiguous run of tokens that carry a label."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


# -- record shapes ------------------------------------------------------------------------------------------------

def test_to_messages_reads_every_common_shape():
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                  {"from": "gpt", "value": "A"}]}
    assert to_messages(sharegpt) == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                     {"role": "assistant", "content": "A"}]
    assert to_messages({"messages": CHAT}) == CHAT
    assert to_messages({"instruction": "Add", "input": "2 and 2", "output": "4"}) == [
        {"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    assert to_messages({"instruction": "Say hi", "input": "", "output": "hi"})[0]["content"] == "Say hi"
    assert to_messages({"prompt": "Q", "response": "A"}) == [{"role": "user", "content": "Q"},
                                                            {"role": "assistant", "content": "A"}]
    assert to_messages({"prompt": "Q", "completion": "A", "system": "S"})[0] == {"role": "system", "content": "S"}
    conversational = {"prompt": [{"role": "user", "content": "Q"}],
                      "completion": [{"role": "assistant", "content": "A"}]}
    assert to_messages(conversational) == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_to_messages_names_what_it_found_for_unknown_shapes():
    with pytest.raises(InvalidOption) as e:
        to_messages({"question": "Q", "answer": "A"})
    assert "answer" in str(e.value) and "question" in str(e.value) and "instruction" in str(e.value)
    with pytest.raises(InvalidOption, match="narrator"):
        to_messages({"conversations": [{"from": "narrator", "value": "x"}]})


def test_load_records_reads_jsonl_json_and_csv(tmp_path):
    rows = [{"prompt": "Q1", "response": "A1"}, {"prompt": "Q2", "response": "A,2"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"train": rows}))
    (tmp_path / "d.csv").write_text('prompt,response\nQ1,A1\nQ2,"A,2"\n')
    for name in ("d.jsonl", "d.json", "wrapped.json", "d.csv"):
        assert load_records(tmp_path / name) == rows, name


def test_load_records_points_at_the_bad_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "Q", "response": "A"}\n{"prompt": oops}\n')
    with pytest.raises(InvalidOption, match="line 2"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(InvalidOption, match="parquet"):
        load_records(tmp_path / "d.parquet")


# -- responses-only labels ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma", "mistral"])
def test_labels_cover_exactly_the_assistant_turns(tokenizers, template):
    tok = tokenizers[template]
    if template == "mistral":  # no end-of-turn token of its own: the eos closes each answer
        tok.eos_token = "<|im_end|>"
    messages = [m for m in CHAT if template != "mistral" or m["role"] != "system"]
    example = tokenize_conversation(tok, messages, max_seq_length=None)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [r.strip() for r in labelled_runs(tok, example)] == [a + END_OF_TURN[template] for a in answers]
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    # the ids are the template's own tokenization: nothing added or doubled (BOS stays single)
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)


def test_labels_on_the_real_smollm2_template(smollm2_dir):
    """SmolLM2's template inserts a default system prompt when none is given: still only the answers train."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    messages = CHAT[1:]
    example = tokenize_conversation(tok, messages, max_seq_length=512)
    assert "You are a helpful AI assistant" in tok.decode(example["input_ids"])
    assert labelled_runs(tok, example) == ["the quick brown fox<|im_end|>", "a stitch in time saves nine<|im_end|>"]


def test_full_sequence_labels_and_truncation(tokenizers):
    tok = tokenizers["chatml"]
    full = tokenize_conversation(tok, CHAT, max_seq_length=None, responses_only=False)
    assert full["labels"] == full["input_ids"]
    short = tokenize_conversation(tok, CHAT, max_seq_length=7)
    assert short["input_ids"] == full["input_ids"][:7] and len(short["labels"]) == 7


def test_no_chat_template_is_a_clear_error(tokenizers):
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(InvalidOption, match="chat_template"):
        tokenize_conversation(tok, CHAT, 64)


def test_prepare_records_drops_examples_cut_before_the_answer(tokenizers):
    tok = tokenizers["chatml"]
    records = [{"messages": CHAT}, {"prompt": "hello " * 40, "response": "fox"}]
    examples = prepare_records(records, tok, max_seq_length=40)
    assert len(examples) == 1 and examples[0]["input_ids"][:5] == tokenize_conversation(tok, CHAT)["input_ids"][:5]


# -- packing and batches ------------------------------------------------------------------------------------------

def test_pack_fills_rows_and_restarts_positions():
    examples = [{"input_ids": list(range(100, 100 + n)), "labels": list(range(100, 100 + n))}
                for n in (6, 4, 7, 3, 5, 5)]
    rows = pack(examples, max_seq_length=10)
    assert all(len(r["input_ids"]) <= 10 for r in rows)
    assert len(rows) == 3  # 30 tokens in rows of 10: best-fit decreasing fills them exactly
    seen = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        bounds = starts + [len(row["input_ids"])]
        for a, b in zip(bounds, bounds[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == IGNORE_INDEX and row["labels"][a + 1:b] == row["input_ids"][a + 1:b]
            seen.append(row["input_ids"][a:b])
    assert sorted(seen) == sorted(e["input_ids"] for e in examples)


def test_collator_pads_right_with_ignored_labels():
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    packed = Collator(pad_token_id=0)(pack([{"input_ids": [5, 6]}, {"input_ids": [7, 8, 9]}, {"input_ids": [1]}], 5))
    assert "attention_mask" not in packed and packed["use_cache"] is False
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 0, 0, 0, 0]]  # dataset order in a row
    assert packed["labels"][1].tolist() == [-100] * 5


def _loss_packed_vs_separate(model, examples, max_seq_length):
    """(packed-batch loss, token-weighted mean of the sequences' own losses, loss of the packed row seen as one)."""
    import torch

    batch = Collator(pad_token_id=0)(pack(examples, max_seq_length))
    total, count = 0.0, 0
    with torch.no_grad():
        packed = model(**batch).loss.item()
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            n = sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX)
            total += model(input_ids=ids, labels=torch.tensor([ex["labels"]]), use_cache=False).loss.item() * n
            count += n
        # the same row with an all-ones attention mask: sequences see each other (what packing must avoid)
        leaky = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                      attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).loss.item()
    return packed, total / count, leaky


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequences_do_not_see_each_other(tiny_llama, attn):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=attn).eval()
    assert model.config.use_cache  # the collator's use_cache=False is what keeps the packed mask on
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(4, 300, (n,), generator=g).tolist()} for n in (9, 5, 12, 6)]
    for ex in examples:
        ex["labels"] = list(ex["input_ids"])
    packed, separate, leaky = _loss_packed_vs_separate(model, examples, max_seq_length=32)
    assert packed == pytest.approx(separate, abs=1e-5)  # fp32: only summation order differs
    assert abs(leaky - separate) > 1e-3  # the check can fail: without the packed mask the loss changes


def test_packing_works_on_the_model_fastload_returns(tiny_llama):
    """NF4 + LoRA + the engine's chunked loss, in training mode (where the fused loss runs): packing still keeps
    the sequences apart."""
    import torch

    from fastload import FastModel
    from tiny import nonzero_lora_b

    model, _ = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    assert "fused_loss" in model.fastload_engine
    nonzero_lora_b(model)
    model.train()
    g = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(4, 300, (n,), generator=g).tolist()} for n in (9, 5, 12, 6)]
    for ex in examples:
        ex["labels"] = list(ex["input_ids"])
    packed, separate, leaky = _loss_packed_vs_separate(model, examples, max_seq_length=32)
    assert packed == pytest.approx(separate, abs=1e-5)
    assert abs(leaky - separate) > 1e-3


def test_packing_keeps_smollm2_sequences_apart(smollm2_dir):
    """The real SmolLM2 (plain transformers, fp32, sdpa): a packed batch's loss is the token-weighted mean of the
    unpacked sequences' losses; equal within 1e-4 (fp32, 30 layers, different summation order)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    records = [{"prompt": "What is the capital of France?", "response": "Paris."},
               {"prompt": "Name a primary color.", "response": "Blue is one."},
               {"instruction": "Say hello", "input": "", "output": "Hello there, friend!"}]
    examples = prepare_records(records, tok, max_seq_length=128)
    packed, separate, leaky = _loss_packed_vs_separate(model, examples, max_seq_length=256)
    assert packed == pytest.approx(separate, abs=1e-4)
    assert abs(leaky - separate) > 1e-3
